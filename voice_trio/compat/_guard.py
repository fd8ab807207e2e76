"""What every compat fix shares: the releases it was checked against, and the record of
what it replaced.

A fix of someone else's code is only right for the code it was written against. Each
``Fix`` names the distribution whose installed version decides and the oldest and newest
release checked and found affected; outside that range the fix is not applied and a
warning, once per process, names the fix and the version, so that an upgrade (``make
upgrade``) is noticed instead of patching internals that may have moved. Bringing a new
release into the range is a deliberate change: run the canaries in ``tests/test_compat.py``
against it, then move ``last``.

``replace`` keeps what it overwrote, so ``shipped`` can always hand the canaries the
library's own behaviour, whether or not ``apply()`` has run in the process.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("voice_trio.compat")


@dataclass(frozen=True)
class Fix:
    """One workaround for one upstream bug (docs/upstream.md has the report for each)."""

    name: str
    """``<module>.<fix>``, as logs, tests and docs/upstream.md name it."""
    distribution: str
    """The PyPI distribution whose installed version decides whether the fix applies."""
    first: str
    """The oldest release checked and found affected (inclusive)."""
    last: str
    """The newest release checked and found affected (inclusive)."""
    summary: str
    """The upstream bug in one line, for the warning."""
    install: Callable[[], None] | None = None
    """Patches the library; ``None`` for a helper that call sites use (nothing to patch)."""
    fixed_in: str | None = None
    """The first release known not to need the fix: from there on, no warning."""


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"0.18.0"`` → ``(0, 18, 0)``.

    Anything after the release (``rc1``, ``.post1``, ``+local``) is ignored: a build of a
    checked release is still that release. Trailing zeros do not count (0.18 == 0.18.0).
    """
    match = re.match(r"\d+(?:\.\d+)*", version.strip().lstrip("vV"))
    if match is None:
        return ()
    parts = [int(part) for part in match.group().split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check(fix: Fix, version: str | None = None) -> bool:
    """Whether ``fix`` applies to the installed (or the given) version; logs why not."""
    if version is None:
        version = installed_version(fix.distribution)
    if version is None:
        log.warning("compat fix %s not applied: %s is not installed", fix.name, fix.distribution)
        return False
    have = release(version)
    if have and release(fix.first) <= have <= release(fix.last):
        return True
    if fix.fixed_in is not None and have >= release(fix.fixed_in):
        log.info(
            "compat fix %s not needed: %s %s has the upstream fix (since %s); remove it",
            fix.name,
            fix.distribution,
            version,
            fix.fixed_in,
        )
        return False
    log.warning(
        "compat fix %s not applied: %s %s is outside the releases it was checked against"
        " (%s to %s). Upstream bug: %s. Run tests/test_compat.py: if the bug is still there,"
        " move the fix's range; if not, remove the fix.",
        fix.name,
        fix.distribution,
        version,
        fix.first,
        fix.last,
        fix.summary,
    )
    return False


_verdicts: dict[str, bool] = {}


def active(fix: Fix) -> bool:
    """``check(fix)`` for the installed version, decided (and warned about) once."""
    verdict = _verdicts.get(fix.name)
    if verdict is None:
        verdict = _verdicts[fix.name] = check(fix)
    return verdict


_originals: dict[tuple[object, str], Any] = {}


def replace(owner: object, attr: str, new: object) -> None:
    """``setattr(owner, attr, new)``, keeping the library's own value for ``shipped``."""
    _originals.setdefault((owner, attr), getattr(owner, attr))
    setattr(owner, attr, new)


def shipped(owner: object, attr: str) -> Any:
    """``owner.attr`` as the library ships it, before any compat fix replaced it."""
    return _originals.get((owner, attr), getattr(owner, attr))
