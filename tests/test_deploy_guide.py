"""What docs/deploy.md shows but cannot run here agrees with the server it deploys.

The nginx site is run for real (``test_deploy_nginx.py``); the systemd unit, the env
file and the Caddyfile are checked here against the code: every setting named exists and
parses, the stop timeout covers the drain, the descriptor limit covers
``MAX_CONNECTIONS``, and no proxy timeout cuts a call shorter than ``MAX_CALL_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_guide import CADDYFILE, ENV_FILE, NGINX_SITE, SYSTEMD_UNIT, block, settings_of

from voice_trio.config import Settings
from voice_trio.server import drain_bound

SETTING_NAMES = {f.metadata["env"] for f in dataclasses.fields(Settings)}


def env_file() -> dict[str, str]:
    return settings_of(block(ENV_FILE))


def unit() -> dict[str, str]:
    return settings_of(block(SYSTEMD_UNIT))


def guide_settings() -> Settings:
    """The env file's settings, placeholders (``<…>``) filled with values of their form."""
    filled = {
        "API_TOKEN": "a-token-of-24-characters",
        "SERVER_SECRET": "0" * 64,
        "TELNYX_PHONE_NUMBER": "+5716000000",
        "TELNYX_PUBLIC_KEY": "",
    }
    env = {k: filled.get(k, "x") if v.startswith("<") else v for k, v in env_file().items()}
    return Settings.from_env(env, env_file=None)


def seconds(value: str) -> float:
    """nginx / Caddy durations: ``90``, ``90s``, ``20m``, ``1h``."""
    number, unit_ = re.fullmatch(r"(\d+)([smh]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "s": 1, "m": 60, "h": 3600}[unit_]


def test_the_env_file_names_only_real_settings_and_they_parse() -> None:
    unknown = set(env_file()) - SETTING_NAMES
    assert not unknown, f"docs/deploy.md's env file names settings that do not exist: {unknown}"
    settings = guide_settings()  # a bad value raises ConfigError naming it
    assert settings.host == "127.0.0.1" and settings.webhook_url.startswith("https://")
    # Behind a proxy every connection comes from it: the per-client cap must not be lower.
    assert settings.max_connections_per_client == settings.max_connections


def test_the_unit_gives_the_drain_its_time_and_calls_their_descriptors() -> None:
    service, settings = unit(), guide_settings()
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= drain_bound(settings)
    assert int(service["TimeoutStopSec"]) >= settings.drain_timeout_s + 10
    # server.fit_descriptor_limit asks for this many.
    assert int(service["LimitNOFILE"]) >= 2 * settings.max_connections + 256
    assert service["EnvironmentFile"] == ENV_FILE.removeprefix("# ")
    assert service["User"] not in ("", "root") and service["Restart"] != "no"
    assert service["ExecStart"].endswith("/.venv/bin/voice-trio serve")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_accepts_every_line_of_the_unit(tmp_path: Path) -> None:
    here = Path(sys.executable).parent / "voice-trio"
    text = block(SYSTEMD_UNIT).replace("/opt/voice-trio/.venv/bin/voice-trio", str(here))
    (tmp_path / "guide.env").write_text("PORT=3000\n")
    text = text.replace(ENV_FILE.removeprefix("# "), str(tmp_path / "guide.env"))
    path = tmp_path / "voice-trio.service"
    path.write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=30
    )
    said = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if re.search(r"unknown|ignoring|failed|invalid|not found", line, re.I)
    ]
    assert done.returncode == 0 and not said, done.stdout + done.stderr


def test_no_proxy_timeout_in_the_guide_cuts_a_call_short() -> None:
    longest = Settings.from_env({}, env_file=None).max_call_seconds
    site = block(NGINX_SITE)
    media = site[site.index("location = /stream/media") :]
    media = media[: media.index("}")]
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        found = re.search(rf"{directive} (\w+);", media)
        assert found and seconds(found.group(1)) > longest, directive
    caddy = re.search(r"stream_close_delay (\w+)", block(CADDYFILE))
    assert caddy and seconds(caddy.group(1)) > longest
