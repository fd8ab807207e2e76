"""What differs between the store's two databases, said once, so that the store's statements
need not be written twice.

A statement is a template with ``{slots}`` (``queries``): ``{name}`` is the parameter
``name``, ``{now}`` the current time, and ``{name:seconds}`` the parameter ``name`` as a
span of seconds that can be taken from ``{now}``. A :class:`Dialect` renders the slots the
way its database and driver spell them (SQLite: ``:name``, PostgreSQL: ``%(name)s``), and
converts the values its columns keep differently (times, JSON). Each backend module
(``sqlite``, ``postgres``) defines its dialect next to its driver.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any


class Dialect(ABC):
    """How one database spells what the shared statements leave open."""

    name: str  # "sqlite" or "postgres": also picks the migrations' DDL (``schema``)
    placeholder: str  # a named parameter, "{}" standing for its name
    now: str  # the current time, as time columns keep it
    seconds: str  # "{}" (a parameter) as a span of seconds that ``now`` can be reduced by

    def clock(self) -> dict[str, Any]:
        """The parameters ``now`` reads, taken once as a transaction begins (none when the
        database keeps the clock)."""
        return {}

    @abstractmethod
    def dump_time(self, epoch: float) -> Any:
        """A time column's value for ``epoch`` (Unix seconds)."""

    @abstractmethod
    def load_time(self, value: Any) -> float:
        """Unix seconds of a time column's value."""

    @abstractmethod
    def dump_json(self, value: Any) -> Any:
        """A JSON column's value for ``value`` (a dict or a list)."""

    @abstractmethod
    def load_json(self, value: Any) -> Any:
        """The dict or list a JSON column keeps."""


@functools.cache
def render(template: str, dialect: Dialect) -> str:
    """``template``'s slots as ``dialect`` spells them (module docstring)."""
    return template.format_map(_Slots(dialect))


class _Slots(dict[str, Any]):
    """``str.format_map``'s view of a dialect: ``now``, else a parameter by its name."""

    def __init__(self, dialect: Dialect) -> None:
        super().__init__(now=dialect.now)
        self.dialect = dialect

    def __missing__(self, name: str) -> _Parameter:
        return _Parameter(name, self.dialect)


class _Parameter:
    def __init__(self, name: str, dialect: Dialect) -> None:
        self.name = name
        self.dialect = dialect

    def __format__(self, spec: str) -> str:
        placeholder = self.dialect.placeholder.format(self.name)
        if spec == "":
            return placeholder
        if spec == "seconds":
            return self.dialect.seconds.format(placeholder)
        raise ValueError(f"unknown slot format {spec!r} for {{{self.name}}}")
