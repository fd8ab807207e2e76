import pytest

from voice_trio.cli import main
from voice_trio.config import ConfigError, Settings


def test_defaults_match_the_original_system() -> None:
    s = Settings.from_env({}, env_file=None)
    assert s.port == 3000
    assert s.host == "0.0.0.0"
    assert s.use_media_streams is True
    assert s.agent_language == "es"
    assert s.timezone == "America/Bogota"
    assert s.mode == "media"


def test_claude_api_key_is_an_alias() -> None:
    assert Settings.from_env({"CLAUDE_API_KEY": "sk-x"}, None).anthropic_api_key == "sk-x"
    both = {"CLAUDE_API_KEY": "old", "ANTHROPIC_API_KEY": "new"}
    assert Settings.from_env(both, None).anthropic_api_key == "new"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("PORT", "abc", "an integer from 0 to 65535"),
        ("PORT", "70000", "an integer from 0 to 65535"),
        ("USE_MEDIA_STREAMS", "maybe", "true or false"),
        ("LOG_FORMAT", "xml", "one of human, json"),
        ("LOG_LEVEL", "LOUD", "one of DEBUG"),
        ("TIMEZONE", "Mars/Olympus", "IANA time zone"),
        ("TELNYX_PUBLIC_KEY", "not base64!", "32-byte Ed25519"),
        ("TELNYX_PUBLIC_KEY", "AAAA", "32-byte Ed25519"),
        ("TELNYX_PHONE_NUMBER", "3001234567", "E.164"),
        ("WEBHOOK_BASE_URL", "agent.example.com", "https://"),
        ("WS_STREAM_URL", "https://x.example.com/stream", "wss://"),
        ("TRANSCRIPTION_MIN_CONFIDENCE", "2", "a number from 0.0 to 1.0"),
        ("SILENCE_TIMEOUT_MS", "-5", "an integer"),
        ("PERSONA_PROMPT_FILE", "/nonexistent/prompt.txt", "readable text file"),
        ("TRANSFER_NUMBER", "300 999 8877", "E.164"),
        ("DTMF_SHORTCUTS", "0=teleport", "key=action pairs"),
        ("DTMF_SHORTCUTS", "x=transfer", "key=action pairs"),
        ("DTMF_SHORTCUTS", "0=transfer,0=end_call", "key=action pairs"),
        ("ANSWERING_MACHINE_DETECTION", "yes", "one of disabled, detect"),
        ("AMD_WAIT_MS", "20000", "an integer from 0 to 10000"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value}, env_file=None)
    assert err.value.name == name
    assert str(err.value).startswith(f"{name}: expected")
    assert expected in str(err.value)


def test_environment_wins_over_env_file(tmp_path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=4000\nAGENT_LANGUAGE=en\n")
    s = Settings.from_env({"PORT": "5000"}, env_file=env_file)
    assert s.port == 5000
    assert s.agent_language == "en"


def test_stream_url_is_derived_from_the_webhook_base() -> None:
    s = Settings.from_env({"WEBHOOK_BASE_URL": "https://agent.example.com/"}, None)
    assert s.stream_url == "wss://agent.example.com/stream/media"
    assert s.webhook_url == "https://agent.example.com/webhook/telnyx"
    explicit = {"WEBHOOK_BASE_URL": "https://a.example.com", "WS_STREAM_URL": "wss://b/x"}
    assert Settings.from_env(explicit, None).stream_url == "wss://b/x"


def test_missing_lists_what_each_mode_lacks() -> None:
    missing = Settings.from_env({"ANTHROPIC_API_KEY": "k"}, None).missing()
    assert "DEEPGRAM_API_KEY" in missing["media"]
    assert "DEEPGRAM_API_KEY" not in missing["fallback"]
    assert "TELNYX_API_KEY" in missing["fallback"]
    assert missing["webhook signatures"] == ["TELNYX_PUBLIC_KEY"]


def test_check_config_masks_secrets(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TELNYX_API_KEY", "KEY0123456789SECRET")
    monkeypatch.setenv("API_TOKEN", "tok-very-secret-value")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "KEY0123456789SECRET" not in out
    assert "tok-very-secret-value" not in out
    assert "TELNYX_API_KEY" in out and "KEY…ET" in out
    assert "media: missing" in out


def test_bad_setting_stops_the_cli_with_the_name(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORT", "eighty")
    assert main(["serve"]) == 2
    assert "PORT: expected an integer" in capsys.readouterr().err


def test_a_short_api_token_or_a_bad_proxy_list_stops_start_up_by_name(
    tmp_path, capsys, monkeypatch
) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"API_TOKEN": "changeme"}, None)
    assert str(err.value) == "API_TOKEN: expected a random string of at least 16 characters"
    assert Settings.from_env({"API_TOKEN": "x" * 16}, None).api_token == "x" * 16
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("API_TOKEN", "letmein")
    assert main(["serve"]) == 2
    err_text = capsys.readouterr().err
    assert "API_TOKEN: expected a random string of at least 16" in err_text
    assert "letmein" not in err_text  # a secret is not echoed, even a bad one
    monkeypatch.delenv("API_TOKEN")
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1, nginx")
    assert main(["check-config"]) == 2
    assert "FORWARDED_ALLOW_IPS: expected addresses or networks" in capsys.readouterr().err


def test_forwarded_allow_ips_default_and_shown_value() -> None:
    s = Settings.from_env({}, None)
    assert "127.0.0.1" in s.forwarded_allow_ips and "::1" not in s.forwarded_allow_ips
    assert not s.api_loopback_without_token
    assert s.missing()["api"] == ["API_TOKEN"]
    s = Settings.from_env(
        {"FORWARDED_ALLOW_IPS": "10.0.0.0/8,::1", "API_LOOPBACK_WITHOUT_TOKEN": "1"}, None
    )
    shown = {name: value for name, value, _ in s.describe()}
    assert shown["FORWARDED_ALLOW_IPS"] == "10.0.0.0/8,::1"
    assert s.missing()["api"] == []
    documented = {name: default for name, default, _ in Settings.documented()}
    assert documented["FORWARDED_ALLOW_IPS"] == "127.0.0.1"
    assert documented["API_LOOPBACK_WITHOUT_TOKEN"] == "false"


def test_env_example_lists_every_setting_with_its_default_and_meaning() -> None:
    from pathlib import Path

    text = (Path(__file__).parent.parent / ".env.example").read_text()
    for name, default, doc in Settings.documented():
        assert f"# {doc}\n{name}={default}\n" in text, name


def test_transfers_and_shortcuts() -> None:
    s = Settings.from_env({}, None)
    assert s.transfer_number == "" and s.dtmf_shortcuts == (("0", "transfer"),)
    assert s.dtmf_actions == {}  # no number to transfer to: 0 is just a key
    assert s.answering_machine_detection == "disabled"
    env = {"TRANSFER_NUMBER": "+573009998877", "DTMF_SHORTCUTS": " 0=transfer, *=end_call ,"}
    s = Settings.from_env(env, None)
    assert s.dtmf_actions == {"0": "transfer", "*": "end_call"}
    shown = {name: value for name, value, _ in s.describe()}
    assert shown["DTMF_SHORTCUTS"] == "0=transfer,*=end_call"
    assert Settings.from_env({"DTMF_SHORTCUTS": ""}, None).dtmf_shortcuts == (("0", "transfer"),)
    documented = {name: default for name, default, _ in Settings.documented()}
    assert documented["DTMF_SHORTCUTS"] == "0=transfer"


def test_the_default_drain_fits_a_kubernetes_grace_period() -> None:
    from voice_trio.server import drain_bound

    # Kubernetes' default terminationGracePeriodSeconds is 30 (docs/deployment.md).
    assert drain_bound(Settings.from_env({}, None)) <= 26
    assert drain_bound(Settings.from_env({"DRAIN_TIMEOUT": "0"}, None)) <= 10  # Docker's 10 s
