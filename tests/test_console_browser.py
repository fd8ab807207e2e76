"""The operator console in a real browser: headless Chromium (Debian's ``chromium``
package, /usr/bin/chromium) driven by Playwright, against a server whose providers are the
simulators. Skipped, with the reason, when either is missing (``apt-get install chromium``;
Playwright is in the ``dev`` extra; no ``playwright install`` is needed).

Playwright's sync API runs in a worker thread (it has its own event loop); the server and
the scripted caller run in the test's Trio loop meanwhile."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import FAST_SPEECH_MS, start_lab_server

from voice_trio.sim.caller import CallerResults, HangUp, Say, ScriptedCaller, WaitForBot

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"
PATIENT = "+573001234567"
EVIL_NAME = "<script>alert('nombre')</script>"
EVIL_WORDS = "<script>alert('dicho')</script>"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')"
)
pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"no Chromium at {CHROMIUM} (Debian/Ubuntu: sudo apt-get install -y chromium)",
)


def drive_console(base: str, token: str, seen: dict[str, Any]) -> None:
    """Everything the browser does, in order, in this (worker) thread."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            dialogs: list[str] = seen.setdefault("dialogs", [])
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            errors: list[str] = seen.setdefault("console_errors", [])
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            page.goto(base + "/console/")
            assert page.url.startswith(base + "/console/login")
            page.fill("input[name=token]", token)
            page.click("button:has-text('Sign in')")
            page.wait_for_url(base + "/console/")
            page.wait_for_selector("#stream-state:has-text('live')")

            # Place the call from the form, with a name that is a script.
            page.fill("input[name=telefono]", PATIENT)
            page.fill("input[name=nombre]", EVIL_NAME)
            page.fill("textarea[name=contexto]", "Paciente <b>sin</b> cita.")
            page.click("button:has-text('Call')")
            page.wait_for_selector("#notice")
            card = page.locator("#calls section.call").first
            card.wait_for(timeout=15_000)
            lines = card.locator(".transcript li")
            lines.first.wait_for(timeout=15_000)
            first = lines.count()
            page.wait_for_function(
                "n => document.querySelectorAll('#calls section.call .transcript li').length > n",
                arg=first,
                timeout=20_000,
            )
            page.locator(".transcript li.caller", has_text=EVIL_WORDS).wait_for(timeout=20_000)
            seen["live_name"] = card.locator(".nombre").text_content()
            seen["live_lines"] = [lines.nth(i).text_content() for i in range(lines.count())]
            seen["grew_from"] = first
            page.screenshot(path=str(DOCS / "console-live.png"), full_page=True)
            page.locator("#calls section.call").first.wait_for(state="detached", timeout=30_000)

            page.goto(base + "/console/calls")
            page.screenshot(path=str(DOCS / "console-history.png"), full_page=True)
            page.locator("table.history tbody a").first.click()
            page.wait_for_selector("svg.waterfall")
            seen["stages"] = page.locator("svg.waterfall rect.stage").count()
            seen["title"] = page.locator("h1").text_content()
            seen["transcript"] = page.locator("ol.transcript").text_content()
            seen["scripts"] = page.evaluate("document.scripts.length")
            # The recording plays from the console's own route, behind the session cookie.
            page.wait_for_function(
                "() => { const a = document.querySelector('audio#recording');"
                " return a !== null && a.readyState >= 1 && a.duration > 0; }",
                timeout=15_000,
            )
            seen["audio_seconds"] = page.evaluate(
                "document.querySelector('audio#recording').duration"
            )
            page.screenshot(path=str(DOCS / "console-call.png"), full_page=True)
        finally:
            browser.close()


async def test_a_call_seen_live_and_afterwards_in_the_console(
    nursery: trio.Nursery, lab, tmp_path
) -> None:
    server = await start_lab_server(
        nursery, lab, RECORD_CALLS="true", RECORDINGS_DIR=str(tmp_path / "recordings")
    )
    token = server.app.center.settings.api_token
    patient = ScriptedCaller(
        [
            WaitForBot(min_ms_silence=300),
            Say(EVIL_WORDS, 200),
            WaitForBot(min_ms_silence=300),
            Say("Quiero una cita para el lunes.", 200),
            WaitForBot(min_ms_silence=300),
            HangUp(),
        ],
        ms_per_char=FAST_SPEECH_MS,
        turn_gap_ms=300,
        timeout_s=90,
        name="Ana",
    )
    lab.telnyx.answer_with(PATIENT, patient)
    results: list[CallerResults] = []

    async def answer() -> None:
        results.append(await patient.run())

    nursery.start_soon(answer)
    seen: dict[str, Any] = {}
    with trio.fail_after(120):
        await trio.to_thread.run_sync(drive_console, server.base, token, seen)
    assert seen["dialogs"] == []  # no script of the caller's ran
    assert seen["live_name"] == EVIL_NAME  # shown literally, as text
    assert any(EVIL_WORDS in line for line in seen["live_lines"])
    assert len(seen["live_lines"]) > seen["grew_from"]
    assert EVIL_NAME in seen["title"] and EVIL_WORDS in seen["transcript"]
    assert seen["stages"] >= 5  # the waterfall of at least one whole turn
    assert seen["scripts"] == 0  # the call page runs no script at all
    assert seen["audio_seconds"] > 3  # the whole call, caller and bot
    assert not [e for e in seen["console_errors"] if "Content Security Policy" in e]
    assert results and not results[0].errors
    server.stop.set()
