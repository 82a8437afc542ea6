"""The one settings class. Nothing else in workerkit reads ``os.environ``."""

from __future__ import annotations

import os
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError

__all__ = ["Settings", "load_settings", "redact_url", "split_urls"]


def split_urls(value: str) -> list[str]:
    """The broker URLs of a ``WORKERKIT_URL`` value: one URL, or several separated by commas."""
    return [part.strip() for part in value.split(",") if part.strip()]


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) with passwords replaced by ``***`` (logs, errors)."""
    if "," in url:
        return ",".join(redact_url(one) for one in split_urls(url))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = quote(parts.username or "", safe="")
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


_NOT_SETTINGS = ("WORKERKIT_TEST", "WORKERKIT_BENCH")


class Settings(BaseSettings):
    """workerkit settings, read from ``WORKERKIT_*`` environment variables and a ``.env`` file.

    Unknown ``WORKERKIT_*`` variables are an error: a typo must not silently fall back to a
    default.
    """

    model_config = SettingsConfigDict(
        env_prefix="WORKERKIT_",
        env_file=".env",
        env_file_encoding="utf-8",
        # Other programs' variables may share the .env file; unknown WORKERKIT_* names are
        # caught by _no_unknown_env instead.
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,  # the input may be a password
    )

    url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@localhost:5672/"),
        description="AMQP URL of the broker (amqp:// or amqps://); several, comma-separated,"
        " for a cluster (each process tries them in its own shuffled order and fails over).",
    )
    tls_ca_file: str | None = Field(
        default=None, description="CA bundle to verify the broker's certificate (amqps://)."
    )
    tls_cert_file: str | None = Field(default=None, description="Client certificate (amqps://).")
    tls_key_file: str | None = Field(default=None, description="Client key (amqps://).")
    exchange: str = Field(
        default="workerkit",
        min_length=1,
        max_length=200,
        description="Name of the durable topic exchange every queue is bound to.",
    )
    prefetch: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Default broker QoS (unset: 2 x concurrency, fair to competing consumers).",
    )
    concurrency: int = Field(default=10, ge=1, le=10000, description="Default handlers in flight.")
    processes: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Worker processes `workerkit run` starts (above 1: a supervising parent).",
    )
    heartbeat: int = Field(
        default=10,
        ge=0,
        le=3600,
        description="AMQP heartbeat in seconds; a silently dead connection is found in 2-3x this.",
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="Seconds to open a connection.")
    publish_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a publish may take, retries included."
    )
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="Seconds in-flight handlers get to finish on shutdown."
    )
    handler_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Default per-handler time limit in seconds (unset: 90% of"
        " broker_consumer_timeout).",
    )
    broker_consumer_timeout: float = Field(
        default=1800.0,
        gt=0,
        description="The broker's consumer_timeout in seconds (RabbitMQ default 30 min).",
    )
    max_body_size: int = Field(
        default=16 * 1024 * 1024, ge=1, description="Largest body published or decoded, in bytes."
    )
    retry_max_attempts: int = Field(
        default=5,
        ge=1,
        description="Default RetryPolicy: attempts in all, the first delivery included.",
    )
    retry_delay: float = Field(
        default=1.0, ge=0, description="Default RetryPolicy: seconds before the first retry."
    )
    retry_backoff: float = Field(
        default=2.0,
        ge=1.0,
        description="Default RetryPolicy: factor by which each next delay grows.",
    )
    retry_max_delay: float = Field(
        default=300.0,
        ge=0,
        description="Default RetryPolicy: the longest delay between attempts, in seconds.",
    )
    delivery_limit: int = Field(
        default=20, ge=1, description="Deliveries before the broker dead-letters a poison message."
    )
    reconnect_max_delay: float = Field(
        default=30.0,
        gt=0,
        description="Longest pause between reconnect attempts, in seconds (jittered).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Level of workerkit's log lines."
    )
    log_format: Literal["plain", "json"] = Field(
        default="plain", description="`plain` lines or one JSON object per line."
    )
    ack_batching: bool = Field(
        default=True, description="Ack runs of finished messages with multiple=True."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_env(cls, data: Any) -> Any:
        known = {f"WORKERKIT_{name.upper()}" for name in cls.model_fields}
        names = set(os.environ)
        env_file = cls.model_config.get("env_file")
        if isinstance(env_file, str) and os.path.isfile(env_file):
            names.update(key for key in dotenv_values(env_file) if key)
        unknown = sorted(
            key
            for key in names
            if key.upper().startswith("WORKERKIT_") and key.upper() not in known
        )
        # The test suite and the benchmarks read their own variables, not workerkit.
        unknown = [key for key in unknown if not key.upper().startswith(_NOT_SETTINGS)]
        if unknown:
            raise ValueError(f"unknown setting(s) in the environment or .env: {', '.join(unknown)}")
        return data

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        urls = split_urls(value.get_secret_value())
        if not urls:
            raise ValueError("is empty")
        for index, raw in enumerate(urls):
            where = f"URL {index + 1} of {len(urls)} " if len(urls) > 1 else ""
            parts = urlsplit(raw)
            if parts.scheme not in ("amqp", "amqps"):
                scheme = parts.scheme or "no"
                raise ValueError(f"{where}must start with amqp:// or amqps://, got {scheme} scheme")
            if parts.username is not None and parts.password is None:
                raise ValueError(
                    f"{where}names a user but no password (amqp://user:password@host/)"
                )
            try:
                parts.port  # noqa: B018 - a port that is not a number raises here
            except ValueError:
                raise ValueError(f"{where}has a port that is not a number") from None
        return value

    def __init__(self, *args: Any, **values: Any) -> None:
        # One readable ConfigurationError (a WorkerkitError), not pydantic's ValidationError.
        try:
            super().__init__(*args, **values)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url.get_secret_value())

    @property
    def urls(self) -> list[str]:
        """The broker URLs, in the order given (secrets included: never log them)."""
        return split_urls(self.url.get_secret_value())


def load_settings(settings: Settings | None = None, url: str | None = None) -> Settings:
    """Settings from the environment (or the given ones), with ``url`` overriding the URL.

    A bad value raises :class:`ConfigurationError` with one line naming the variable.
    """
    base = settings if settings is not None else Settings()
    if url is not None:
        return type(base)(**{**base.model_dump(), "url": SecretStr(url)})
    return base


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        if not err["loc"]:
            problems.append(err["msg"].removeprefix("Value error, "))
            continue
        name = f"WORKERKIT_{str(err['loc'][0]).upper()}"
        if err["type"] == "extra_forbidden":
            problems.append(f"{name}: unknown setting")
        else:
            # Never echo the input: it may be a password.
            problems.append(f"{name}: {err['msg'].removeprefix('Value error, ')}")
    return "invalid settings: " + "; ".join(problems)
