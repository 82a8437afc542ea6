"""Settings: WORKERKIT_ environment, typos refused, one readable line, no password anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from workerkit import ConfigurationError, Settings
from workerkit.settings import load_settings, redact_url

SECRET = "s3cr3t-pa55"
URL = f"amqp://alice:{SECRET}@rabbit.example:5672/prod"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No WORKERKIT_* variables and no .env file from the developer's machine leak in."""
    for key in list(os.environ):
        if key.upper().startswith("WORKERKIT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
    assert settings.exchange == "workerkit"
    assert settings.prefetch is None and settings.concurrency == 10  # prefetch: 2 x concurrency


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERKIT_URL", URL)
    monkeypatch.setenv("WORKERKIT_EXCHANGE", "events")
    monkeypatch.setenv("WORKERKIT_PREFETCH", "7")
    monkeypatch.setenv("WORKERKIT_LOG_LEVEL", "debug")
    monkeypatch.setenv("PREFETCH", "99")  # unprefixed variables are not ours
    settings = load_settings()
    assert settings.url.get_secret_value() == URL
    assert (settings.exchange, settings.prefetch, settings.log_level) == ("events", 7, "DEBUG")


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WORKERKIT_EXCHANGE=from-dotenv\n")
    assert load_settings().exchange == "from-dotenv"


def test_dotenv_may_hold_other_programs_keys(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DATABASE_URL=postgres://x\nWORKERKIT_PREFETCH=7\n")
    assert load_settings().prefetch == 7


def test_unknown_workerkit_key_in_dotenv_is_an_error(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WORKERKIT_PREFECH=7\n")
    with pytest.raises(ConfigurationError, match="WORKERKIT_PREFECH"):
        load_settings()


def test_the_env_example_uncommented_is_every_default(tmp_path: Path) -> None:
    """config/.env.example says every line shows the default: uncommented, it must load as
    such. Its unset settings are empty values, which mean "not set" for those settings."""
    example = (Path(__file__).resolve().parents[2] / "config/.env.example").read_text()
    (tmp_path / ".env").write_text(example.replace("# WORKERKIT_", "WORKERKIT_"))
    assert load_settings() == Settings.model_construct()


def test_an_empty_value_is_refused_where_the_setting_has_a_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKERKIT_PREFETCH", "")
    assert load_settings().prefetch is None  # unset by default: empty is unset
    monkeypatch.setenv("WORKERKIT_CONCURRENCY", "")
    with pytest.raises(ConfigurationError, match="WORKERKIT_CONCURRENCY"):
        load_settings()
    monkeypatch.delenv("WORKERKIT_CONCURRENCY")
    monkeypatch.setenv("WORKERKIT_URL", "")  # never a silent localhost
    with pytest.raises(ConfigurationError, match="WORKERKIT_URL: is empty"):
        load_settings()


def test_a_misspelled_keyword_is_refused_with_the_likely_name() -> None:
    with pytest.raises(ConfigurationError, match=r"prefech \(did you mean prefetch\?\)"):
        Settings(prefech=3)


def test_url_argument_overrides_and_keeps_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERKIT_EXCHANGE", "events")
    settings = load_settings(url=URL)
    assert settings.url.get_secret_value() == URL
    assert settings.exchange == "events"


def test_explicit_settings_win() -> None:
    given = Settings(exchange="given")
    assert load_settings(given) is given


def test_unknown_workerkit_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERKIT_PREFECH", "10")
    with pytest.raises(ConfigurationError, match="WORKERKIT_PREFECH") as info:
        load_settings()
    assert "\n" not in str(info.value)


def test_test_only_variables_are_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERKIT_TEST_URL", "amqp://x/")
    assert load_settings().exchange == "workerkit"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WORKERKIT_PREFETCH", "lots"),
        ("WORKERKIT_PREFETCH", "0"),
        ("WORKERKIT_CONCURRENCY", "-1"),
        ("WORKERKIT_LOG_LEVEL", "LOUD"),
        ("WORKERKIT_LOG_FORMAT", "xml"),
        ("WORKERKIT_HEARTBEAT", "1.5x"),
        ("WORKERKIT_URL", "http://rabbit/"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    text = str(info.value)
    assert name in text
    assert "\n" not in text
    assert "pydantic" not in text  # no "further information visit errors.pydantic.dev"


def test_password_not_in_repr_or_str() -> None:
    settings = Settings(url=URL)
    for text in (repr(settings), str(settings), str(settings.model_dump()), settings.redacted_url):
        assert SECRET not in text
    assert settings.redacted_url == "amqp://***@rabbit.example:5672/prod"


def test_password_not_in_load_settings_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERKIT_URL", f"http://alice:{SECRET}@rabbit/")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert "WORKERKIT_URL" in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_password_not_in_errors_about_other_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERKIT_URL", URL)
    monkeypatch.setenv("WORKERKIT_PREFETCH", "-5")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert SECRET not in str(info.value)


def test_password_not_in_url_override_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings(url=f"ftp://alice:{SECRET}@rabbit/")
    assert SECRET not in str(info.value)


def test_password_not_in_direct_settings_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(url=f"http://alice:{SECRET}@rabbit/")
    assert SECRET not in str(info.value)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.prefetch = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://u:p@h:5672/v", "amqp://***@h:5672/v"),
        ("amqps://u:p%40ss@h/", "amqps://***@h/"),
        ("amqp://h/", "amqp://h/"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_direct_settings_errors_are_configuration_errors() -> None:
    """Settings() itself raises workerkit's error, with one readable line, not pydantic's."""
    with pytest.raises(ConfigurationError, match="WORKERKIT_PREFETCH"):
        Settings(prefetch=0)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("amqp://guest@127.0.0.1:5672/", "names a user but no password"),
        ("amqp://guest:guest@127.0.0.1:notaport/", "port that is not a number"),
    ],
)
def test_urls_pika_cannot_use_are_refused_up_front(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem) as info:
        Settings(url=url)
    assert "WORKERKIT_URL" in str(info.value)
