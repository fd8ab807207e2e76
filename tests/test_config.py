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
        (
            "AGENT_LANGUAGE",
            "es-CO",
            "DEEPGRAM_STT_MODEL=nova-3 takes: one of es, es-419, en, en-US",
        ),
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

    # Kubernetes' default terminationGracePeriodSeconds is 30 (docs/deploy.md).
    assert drain_bound(Settings.from_env({}, None)) <= 26
    assert drain_bound(Settings.from_env({"DRAIN_TIMEOUT": "0"}, None)) <= 10  # Docker's 10 s


@pytest.mark.parametrize(
    ("env", "accepted"),
    [
        # Colombian Spanish is not a code nova-3 has: every call would lose Deepgram.
        ({"AGENT_LANGUAGE": "es-CO"}, "one of es, es-419, en, en-US"),
        # nova-3 has French, but the agent's phrases and persona do not exist in French.
        ({"AGENT_LANGUAGE": "fr"}, "one of es, es-419, en, en-US"),
        ({"DEEPGRAM_STT_MODEL": "nova-3-medical"}, "one of en, en-US"),  # English only
        ({"AGENT_LANGUAGE": "en-GB"}, "one of es, es-419, en, en-US"),
        ({"AGENT_LANGUAGE": "fr", "DEEPGRAM_STT_MODEL": "nova-2-clinic"}, "es or en"),
    ],
)
def test_agent_language_must_be_spoken_by_the_agent_and_taken_by_the_stt_model(
    env: dict[str, str], accepted: str
) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env, env_file=None)
    message = str(err.value)
    assert err.value.name == "AGENT_LANGUAGE"
    assert message.startswith("AGENT_LANGUAGE: expected a language the agent speaks")
    assert f"DEEPGRAM_STT_MODEL={env.get('DEEPGRAM_STT_MODEL', 'nova-3')}" in message
    assert accepted in message


@pytest.mark.parametrize(
    ("env", "language"),
    [
        ({"AGENT_LANGUAGE": "es-419"}, "es-419"),
        ({"AGENT_LANGUAGE": "ES-419"}, "es-419"),  # spelt as Deepgram spells it
        ({"AGENT_LANGUAGE": "en-gb", "DEEPGRAM_STT_MODEL": "nova-2"}, "en-GB"),
        # A model whose list is not known here: only the agent's side is checked.
        ({"AGENT_LANGUAGE": "es-CO", "DEEPGRAM_STT_MODEL": "nova-2-clinic"}, "es-CO"),
        # No Deepgram in fallback mode (Telnyx transcribes).
        ({"AGENT_LANGUAGE": "es-CO", "USE_MEDIA_STREAMS": "false"}, "es-CO"),
    ],
)
def test_agent_languages_that_work(env: dict[str, str], language: str) -> None:
    assert Settings.from_env(env, env_file=None).agent_language == language


def test_every_accepted_language_has_the_agents_phrases_and_persona() -> None:
    from voice_trio.conversation.dtmf import key_note
    from voice_trio.conversation.persona import load_persona
    from voice_trio.conversation.phrases import ENGLISH, SPANISH, phrases_for
    from voice_trio.languages import STT_LANGUAGES

    for model, codes in STT_LANGUAGES.items():
        for code in codes:
            english = code.startswith("en")
            assert phrases_for(code) is (ENGLISH if english else SPANISH), (model, code)
            persona = load_persona("", code)
            assert ("Answer in English" in persona) is english, (model, code)
            assert key_note(["1"], code).startswith("[the caller" if english else "[la persona")


def test_check_config_names_a_language_the_stt_model_lacks(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AGENT_LANGUAGE", "es-CO")
    assert main(["check-config"]) == 2
    err = capsys.readouterr().err
    assert "AGENT_LANGUAGE: expected" in err and "DEEPGRAM_STT_MODEL=nova-3" in err
    assert "one of es, es-419, en, en-US (got 'es-CO')" in err
    monkeypatch.setenv("AGENT_LANGUAGE", "es-419")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert (
        "language: es-419 (Spanish phrases, Spanish persona); DEEPGRAM_STT_MODEL=nova-3 takes es, es-419, en, en-US"
        in out
    )
    assert "prompt caching: off (tools + persona at least" in out
    assert "claude-haiku-4-5 caches 4096 or more" in out


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, "SERVER_SECRET, DATABASE_URL"),
        ({"SERVER_SECRET": "s" * 32}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://voice@db/voice"}, "SERVER_SECRET"),
    ],
)
def test_several_workers_without_a_shared_secret_and_database_are_refused(
    tmp_path, capsys, monkeypatch, env: dict[str, str], missing: str
) -> None:
    """A stream token minted by one worker must verify on another (SERVER_SECRET), and
    workers share call records, stream claims and call events (PostgreSQL)."""
    assert Settings.from_env({}, None).workers == 1
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"WORKERS": "2", **env}, None)
    assert str(err.value) == (
        "WORKERS: 2 workers need SERVER_SECRET (one secret for every worker's stream tokens)"
        f" and DATABASE_URL (PostgreSQL, shared by the workers); missing: {missing}"
    )
    monkeypatch.chdir(tmp_path)
    for name in ("WORKERS", "SERVER_SECRET", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--workers", "3"]) == 2  # refused before anything starts
    assert "3 workers need SERVER_SECRET" in capsys.readouterr().err
    assert main(["serve", "--workers", "0"]) == 2
    assert "WORKERS: expected an integer from 1 to 64 (got '0')" in capsys.readouterr().err
    both = {"SERVER_SECRET": "s" * 32, "DATABASE_URL": "postgresql://voice@db/voice"}
    assert Settings.from_env({"WORKERS": "4", **both}, None).workers == 4
    assert Settings.from_env({}, None).with_workers(1).workers == 1
