"""The one settings class. Nothing else in workerkit reads ``os.environ``."""

from __future__ import annotations

import ast
import difflib
import os
import re
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qsl, urlsplit

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError
from .retry import MAX_DELAY

__all__ = ["Settings", "load_settings", "redact_url", "split_urls"]


def split_urls(value: str) -> list[str]:
    """The broker URLs of a ``WORKERKIT_URL`` value: one URL, or several separated by commas.

    Only a comma followed by a scheme separates two URLs: a raw comma in a password is part of
    the password (splitting there would print the first half of it as a "URL" in an error).
    """
    parts = (part.strip(", \t\r\n") for part in _URL_SEPARATOR.split(value))
    return [part for part in parts if part]


# One or more commas, then a scheme: the start of the next URL.
_URL_SEPARATOR = re.compile(r"(?:\s*,)+\s*(?=[a-z][a-z0-9+.-]*://)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL without its user information (``amqp://***@host:5672/vhost``), for logs and
    errors; a comma-separated list of URLs, each so.

    Everything between ``://`` and the last ``@`` goes, whatever characters it holds: a password
    with a raw ``#``, ``?`` or ``/`` must not leak because the URL does not parse as intended.
    """
    urls = split_urls(url) if "," in url else [url]
    if len(urls) > 1:
        return ",".join(redact_url(one) for one in urls)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url else url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}://{rest}"


# URL query parameters the client honours that no setting overrides. The others have settings of
# their own (a query value would be silently overridden), or are unknown: both are refused.
URL_QUERY_INTS = {"channel_max": (1, 65535), "frame_max": (4096, 2**31 - 1)}
URL_QUERY_OVERRIDDEN = {
    "heartbeat": "WORKERKIT_HEARTBEAT",
    "connection_attempts": "WORKERKIT_RECONNECT_MAX_DELAY",
    "retry_delay": "WORKERKIT_RECONNECT_MAX_DELAY",
    "socket_timeout": "WORKERKIT_CONNECT_TIMEOUT",
    "stack_timeout": "WORKERKIT_CONNECT_TIMEOUT",
    "blocked_connection_timeout": "WORKERKIT_PUBLISH_TIMEOUT",
    "ssl_options": "WORKERKIT_TLS_CA_FILE, WORKERKIT_TLS_CERT_FILE and WORKERKIT_TLS_KEY_FILE",
    "client_properties": "nothing (workerkit names its connections)",
}


def check_url(raw: str) -> None:
    """Raise ValueError (never naming the password) unless ``raw`` parses as it reads."""
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in ("amqp", "amqps"):
        raise ValueError("must start with amqp:// or amqps://")
    after = _without_userinfo(rest)
    if "#" in after:
        raise ValueError("has a '#' fragment, which AMQP URLs do not use")
    # A second host given without its scheme (amqp://a:5672,b:5672 or amqp://a/,b/) is a list
    # typed wrong, not a port or a virtual host named ",b": refuse it as that.
    host, _, vhost = after.partition("?")[0].partition("/")
    if "," in host:
        raise ValueError(
            "has a ',' in its host: each URL of a list starts with amqp:// or amqps://"
        )
    if "," in vhost:
        raise ValueError(
            "has a ',' in its virtual host: each URL of a list starts with amqp:// or amqps://"
            " (a comma that belongs to the name is %2C)"
        )
    try:
        parts = urlsplit(f"{scheme}://{after}")
    except ValueError:
        raise ValueError("has a host that does not parse") from None
    _check_host(parts)
    _check_query(parts.query)


def check_management_url(raw: str) -> None:
    """Raise ValueError (never naming the password) unless ``raw`` is an http(s) address that
    parses as it reads (``http://user:password@host:15672``)."""
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.strip("/"):
        raise ValueError("must be an http:// or https:// address (http://host:15672)")
    after = _without_userinfo(rest)
    if "#" in after:
        raise ValueError("has a '#' fragment")
    try:
        parts = urlsplit(f"{scheme}://{after}")
    except ValueError:
        raise ValueError("has a host that does not parse") from None
    _check_host(parts)


def _without_userinfo(rest: str) -> str:
    """What follows ``user:password@``, once that parses as it reads."""
    if "@" not in rest:
        return rest
    userinfo, _, after = rest.rpartition("@")
    if re.search(r"[/?#\[\]]", userinfo):
        raise ValueError(
            "the user or password holds a raw '/', '?', '#', '[' or ']' (percent-encode"
            " it: '#' is %23) and the URL would not parse as intended"
        )
    if ":" not in userinfo:
        raise ValueError("names a user but no password (user:password@host)")
    if "@" in userinfo:
        raise ValueError("the user or password holds a raw '@' (percent-encode it as %40)")
    return after


def _check_host(parts: SplitResult) -> None:
    try:
        parts.port  # noqa: B018 - a port that is not a number, or out of range, raises here
    except ValueError:
        port = parts.netloc.rpartition(":")[2]
        if port.isdigit():
            raise ValueError(f"has a port ({port}) outside 1-65535") from None
        raise ValueError("has a port that is not a number") from None
    if not parts.hostname:
        raise ValueError("names no host")
    if re.search(r"\s", parts.hostname):
        raise ValueError("has white space in its host")


def _check_query(query: str) -> None:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError("has a query string that does not parse") from None
    for name, value in pairs:
        if name in URL_QUERY_OVERRIDDEN:
            raise ValueError(f"query parameter {name!r}: set {URL_QUERY_OVERRIDDEN[name]} instead")
        if name in URL_QUERY_INTS:
            low, high = URL_QUERY_INTS[name]
            if not value.isdigit() or not low <= int(value) <= high:
                raise ValueError(f"query parameter {name!r} must be an integer in [{low}, {high}]")
        elif name == "locale":
            continue
        elif name == "tcp_options":
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = None
            if not isinstance(parsed, dict):
                raise ValueError("query parameter 'tcp_options' must be a dict literal")
        else:
            known = ", ".join(sorted([*URL_QUERY_INTS, "locale", "tcp_options"]))
            raise ValueError(f"unknown query parameter {name!r} (known: {known})")


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
        # inf and nan pass a `gt=0` check; as a timeout or a delay they mean a hang or a hot loop.
        allow_inf_nan=False,
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
        description="Default broker QoS (unset: 2 x concurrency, fair to competing consumers);"
        " at most max_in_flight_bytes // max_body_size.",
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
        description="AMQP heartbeat in seconds; a silently dead connection is found within one"
        " to two times heartbeat + 5 s (at most about 30 s at 10).",
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
    compression: Literal["none", "gzip", "zstd"] = Field(
        default="none",
        description="Publishers compress bodies with `gzip` or `zstd` (extra"
        " `workerkit[zstd]`); consumers read both whatever this says.",
    )
    compress_min_size: int = Field(
        default=1024, ge=0, description="Bodies smaller than this many bytes are not compressed."
    )
    max_in_flight_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description="Memory budget of a worker's deliveries, in bytes: its prefetch is capped at"
        " max_in_flight_bytes // max_body_size (at least 1); 0: no cap.",
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
        le=MAX_DELAY,
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
    management_url: SecretStr | None = Field(
        default=None,
        description="RabbitMQ management API for `workerkit status` (default: http://<broker"
        " host>:15672/ with the broker URL's credentials).",
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
        if isinstance(data, dict):
            # `WORKERKIT_PREFETCH=` (an env file's way to say "not set") leaves a setting whose
            # default is unset unset; an empty value for any other setting is still an error.
            optional = {name for name, field in cls.model_fields.items() if field.default is None}
            data = {k: v for k, v in data.items() if not (v == "" and k in optional)}
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
            try:
                check_url(raw)
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
        return value

    @field_validator("management_url")
    @classmethod
    def _check_management_url(cls, value: SecretStr | None) -> SecretStr | None:
        # "notaurl" would become http://localhost/notaurl and fall back to AMQP in silence.
        if value is not None:
            check_management_url(value.get_secret_value())
        return value

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _readable_file(cls, value: str | None) -> str | None:
        # Checked here, not at connect time: a missing file is not a broker that cannot be
        # reached, and must stop start-up instead of being retried forever.
        if value is not None and not (os.path.isfile(value) and os.access(value, os.R_OK)):
            raise ValueError(f"{value!r} is not a readable file")
        return value

    def __init__(self, *args: Any, **values: Any) -> None:
        # extra="ignore" is for other programs' keys in .env; a keyword is ours, and a typo in
        # one (Settings(prefech=3)) must not vanish.
        unknown = [name for name in values if name not in type(self).model_fields]
        if unknown:
            raise ConfigurationError(_unknown_keywords(unknown, list(type(self).model_fields)))
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


def _unknown_keywords(unknown: list[str], known: list[str]) -> str:
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        described.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return f"invalid settings: unknown setting(s) {', '.join(described)}"


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
