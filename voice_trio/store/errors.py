"""The store's errors, apart so that every store module (the listener too) can raise them
without importing the records module that imports it."""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot do what was asked (unreachable, misconfigured)."""


class StaleState(StoreError):
    """``save_state`` lost a race: another instance wrote the call's state first."""

    def __init__(self, call_control_id: str, expected: int | None, actual: int | None) -> None:
        super().__init__(f"state of {call_control_id} is at version {actual}, expected {expected}")
        self.call_control_id = call_control_id
        self.expected = expected
        self.actual = actual
