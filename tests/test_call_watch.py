"""The call's watch (``CallControls.run``): one task that reports key presses as they come,
groups them into caller turns, and says when the call's time is up (its maximum length or
the server's drain). Driven against a small ``CallLine`` on Trio's autojump clock, so every
time below is exact."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from conftest import make_settings

from voice_trio.calls.ends import CallMode, EndReason
from voice_trio.calls.registry import ActiveCall
from voice_trio.conversation.dtmf import STREAM, WEBHOOK
from voice_trio.media.controls import CallControls


class FakeLine:
    """What the watch does to the call, with the time it did it (from its start)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = make_settings(**settings)
        self.call = ActiveCall("v3:watched", mode=CallMode.MEDIA)
        self.transferring = False
        self.ending = False
        self.origin = trio.current_time()
        self.did: list[tuple[float, str]] = []

    def _note(self, what: str) -> None:
        self.did.append((round(trio.current_time() - self.origin, 3), what))

    async def caller_active(self, now: float) -> None:
        self._note("barge-in")
        await trio.sleep(0.01)  # sending the clear takes a moment

    def add_user_turn(self, text: str, t0: float) -> bool:
        self._note(text)
        return True

    async def time_up(self, reason: EndReason) -> None:
        self._note(f"time up: {reason}")

    def cut_short(self) -> None:
        self._note("cut short")


async def watch(line: FakeLine, script: Any) -> None:
    controls = CallControls(line, None)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(controls.run)
        await script(controls)
        nursery.cancel_scope.cancel()


async def test_presses_barge_in_at_once_and_a_pause_ends_the_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    line = FakeLine()

    async def script(controls: CallControls) -> None:
        await trio.sleep(1)
        controls.on_key("1", STREAM)
        await trio.sleep(0.3)
        controls.on_key("2", WEBHOOK)
        controls.on_key("2", STREAM)  # the other path's report of the same press
        await trio.sleep(2)
        controls.on_key("#", STREAM)
        await trio.sleep(2)

    await watch(line, script)
    assert line.did == [
        (1.0, "barge-in"),
        (1.3, "barge-in"),
        (2.1, "[la persona marcó 1 2 en el teclado]"),  # KEY_GAP_S after the last press
        (3.3, "barge-in"),
        (4.1, "[la persona marcó # en el teclado]"),
    ]


async def test_a_shortcut_key_cuts_short_without_a_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    line = FakeLine(DTMF_SHORTCUTS="9=end_call")

    async def script(controls: CallControls) -> None:
        await trio.sleep(1)
        controls.on_key("9", STREAM)
        await trio.sleep(2)
        assert controls.pending == "end_call"

    await watch(line, script)
    assert line.did == [(1.0, "cut short")]


@pytest.mark.parametrize("drain_at", [None, 3.0])
async def test_time_is_up_at_the_maximum_length_or_the_drain(
    autojump_clock: trio.testing.MockClock, drain_at: float | None
) -> None:
    line = FakeLine(MAX_CALL_SECONDS=5)

    async def script(controls: CallControls) -> None:
        if drain_at is not None:
            await trio.sleep(drain_at)
            line.call.wind_down.set()
        await trio.sleep_until(line.origin + 6)
        controls.on_key("5", STREAM)  # keys still barge in (cutting the goodbye)
        await trio.sleep(10)

    await watch(line, script)
    up = "time up: drain" if drain_at else "time up: max_duration"
    assert line.did == [
        (drain_at or 5.0, up),
        (6.0, "barge-in"),
        (6.8, "[la persona marcó 5 en el teclado]"),
    ]


async def test_a_drain_before_the_watch_starts_is_time_up_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    line = FakeLine()
    line.call.wind_down.set()

    async def script(controls: CallControls) -> None:
        await trio.sleep(1)

    await watch(line, script)
    assert line.did == [(0.0, "time up: drain")]
