"""Bad input at the edges: a typed error before the network, never a reconnect (issue 9)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from workerkit import ConfigurationError, InvalidMessage, Settings
from workerkit.dlq import _fresh_copy, dead_letter_from, dlq_of, message_key
from workerkit.errors import RetryLater
from workerkit.message import Message, Outgoing, build_outgoing
from workerkit.settings import redact_url
from workerkit.worker import Worker

LIMIT = 1 << 20


def outgoing(**kwargs: Any) -> Outgoing:
    return build_outgoing("ex", kwargs.pop("routing_key", "k"), {}, max_body_size=LIMIT, **kwargs)


# -- item 3: values pika cannot encode ---------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [1.5, (1, 2), 2**63, -(2**63) - 1, "\udc80", {"nested": 0.5}, [1, 2.5], object(), {1: "x"}],
)
def test_header_values_that_cannot_be_encoded_are_invalid_messages(value: object) -> None:
    with pytest.raises(InvalidMessage, match="header"):
        outgoing(headers={"h": value})


@pytest.mark.parametrize("key", ["k" * 256, "é" * 128, "\udc80", 7, b"bytes"])
def test_bad_header_keys_are_invalid_messages(key: Any) -> None:
    with pytest.raises(InvalidMessage, match="header"):
        outgoing(headers={key: 1})


@pytest.mark.parametrize("field", ["message_id", "correlation_id", "reply_to"])
@pytest.mark.parametrize("value", ["x" * 256, "é" * 128, "\udc80"])
def test_short_string_properties_are_checked(field: str, value: str) -> None:
    with pytest.raises(InvalidMessage, match=field):
        outgoing(**{field: value})


def test_encodable_values_pass() -> None:
    headers = {
        "s": "é" * 1000,
        "b": b"\x00\xff",
        "t": True,
        "i": 2**63 - 1,
        "n": -(2**63),
        "d": Decimal("1.25"),
        "when": datetime(2024, 1, 2, tzinfo=timezone.utc),
        "table": {"x": [1, "two", None]},
        "none": None,
        "k" * 255: 1,
    }
    assert outgoing(headers=headers, message_id="m" * 255).headers == headers


def test_copies_of_foreign_headers_can_be_re_encoded() -> None:
    """A foreign producer's floats and wide ints survive a retry/DLQ copy in a form pika encodes."""
    foreign = {
        "price": 1.5,
        "ratio": float("nan"),
        "big": 2**64 - 1,
        b"\xff\xfe": "raw key",
        "deep": {"f": [0.25, (1, 2)]},
        "CC": ["elsewhere"],
        "BCC": ["hidden"],
        "x-death": [{}],
    }
    from workerkit.message import copy_headers

    copied = copy_headers(foreign)
    assert copied == {
        "price": "1.5",
        "ratio": "nan",
        "big": str(2**64 - 1),
        b"\xff\xfe": "raw key",
        "deep": {"f": ["0.25", [1, 2]]},
    }
    from workerkit.message import check_headers

    check_headers(copied, copy=True)  # does not raise


# -- item 12: DLQ tools and bytes / int header keys --------------------------------------------


def test_dlq_tools_accept_bytes_header_keys() -> None:
    message = Message(b"{}", headers={b"\xff": b"v", "workerkit-reason": "x"})
    dead = dead_letter_from(message)
    assert dead.reason == "x"
    assert message_key(message).startswith("h-")
    copy = _fresh_copy(message, "q")
    assert copy.headers == {b"\xff": b"v"}


def test_unroutable_queue_is_readable_by_the_dlq_tools() -> None:
    assert dlq_of("workerkit.unroutable") == "workerkit.unroutable"
    assert dlq_of("orders") == "orders.dlq"


# -- item 13: inf and nan ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["publish_timeout", "connect_timeout", "retry_delay"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_settings_refuse_inf_and_nan(name: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=f"WORKERKIT_{name.upper()}"):
        Settings(**{name: value})


@pytest.mark.parametrize("delay", [math.inf, math.nan, -1.0])
def test_retry_later_refuses_non_finite_delays(delay: float) -> None:
    with pytest.raises(ValueError):
        RetryLater(delay=delay)


@pytest.mark.parametrize("delay", [math.inf, math.nan, -1.0, True])
def test_publish_refuses_non_finite_delays(delay: float) -> None:
    from workerkit import AsyncPublisher

    publisher = AsyncPublisher(settings=Settings())
    with pytest.raises(InvalidMessage, match="delay"):
        asyncio.run(publisher.publish("k", {}, delay=delay))


# -- item 8: the password never leaks ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:123#s3cret@host/",
        "amqp://guest:abc?s3cret@host/",
        "amqp://guest:abc/s3cret@host/",
        "amqp://guest:s3cret@host/#frag",
    ],
)
def test_urls_that_do_not_parse_as_intended_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(url=url)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:123#s3cret@host/",
        "amqp://guest:abc?s3cret@host/",
        "amqp://guest:abc/s3cret@host/",
        "amqp://gu:est:s3cret@host:notaport/",
        "amqp://s3cret@host/",
        "amqp://:s3cret@host/",
        "amqp://u:s3cret@[::1/",
    ],
)
def test_redaction_never_shows_userinfo(url: str) -> None:
    assert "s3cret" not in redact_url(url)


# -- item 7: configuration errors are not "cannot connect" -------------------------------------


def test_unknown_url_query_parameters_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="heartbeet"):
        Settings(url="amqp://guest:guest@localhost/?heartbeet=5")
    with pytest.raises(ConfigurationError, match="WORKERKIT_HEARTBEAT"):
        Settings(url="amqp://guest:guest@localhost/?heartbeat=5")
    Settings(url="amqp://guest:guest@localhost/?frame_max=131072&channel_max=64")


def test_missing_tls_files_are_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        with pytest.raises(ConfigurationError, match=f"WORKERKIT_{name.upper()}"):
            Settings(**{name: missing})


@pytest.mark.parametrize("length", [198, 199, 200])
def test_queue_names_whose_delay_bindings_overflow_are_refused(length: int) -> None:
    with pytest.raises(ConfigurationError, match="bytes"):

        class TooLong(Worker):
            queue = "q" * length

            async def handle(self, body: dict[str, Any]) -> None: ...


def test_bindings_whose_delay_bindings_overflow_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="bytes"):

        class LongBinding(Worker):
            queue = "fine-queue-for-binding-test"
            bindings = ("b" * 198,)

            async def handle(self, body: dict[str, Any]) -> None: ...


@pytest.mark.parametrize(
    ("env", "value", "words"),
    [
        ("WORKERKIT_URL", "amqp://guest:guest@127.0.0.1:5672/?heartbeet=5", "heartbeet"),
        ("WORKERKIT_URL", "amqp://guest:123#s3cret@127.0.0.1/", "percent-encode"),
        ("WORKERKIT_TLS_CA_FILE", "/nonexistent/ca.pem", "not a readable file"),
    ],
)
def test_configuration_errors_stop_start_up_with_exit_2(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, words: str
) -> None:
    from click.testing import CliRunner

    from workerkit.cli import cli

    monkeypatch.setenv(env, value)
    result = CliRunner().invoke(cli, ["run", "workerkit_no_such_module_needed"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and words in result.stderr
    assert "s3cret" not in result.stderr


def test_a_publisher_raises_configuration_errors_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from workerkit import Publisher

    monkeypatch.setenv("WORKERKIT_URL", "amqp://guest:guest@127.0.0.1/?connection_attempts=3")
    with pytest.raises(ConfigurationError, match="connection_attempts"):
        Publisher()


def test_the_longest_accepted_names_fill_the_delay_bindings_exactly() -> None:
    """worker.MAX_ROUTED_NAME agrees with the delay layout topology.py builds."""
    from workerkit.topology import Topology
    from workerkit.worker import MAX_ROUTED_NAME

    class Longest(Worker):
        queue = "q" * MAX_ROUTED_NAME
        bindings = ("b" * MAX_ROUTED_NAME,)

        async def handle(self, body: dict[str, Any]) -> None: ...

    try:
        specs = Topology(Settings()).worker_queues(Longest)
        keys = [key for spec in specs for _exchange, key in spec.bindings]
        assert max(len(key.encode()) for key in keys) == 255
    finally:
        Worker.registry.pop(Longest.queue, None)


async def test_a_running_runner_refuses_sync_publishes_on_its_loop() -> None:
    """Blocking the runner's loop would stall every consumer and heartbeat: refused at once,
    and only while a runner uses the loop."""
    from workerkit import Publisher, Runner
    from workerkit.errors import PublishError
    from workerkit.testing import running
    from workerkit.transport.memory import MemoryTransport

    class Quiet(Worker):
        queue = "unit.syncpub.quiet"

        async def handle(self, body: dict[str, Any]) -> None: ...

    # Nothing listens on this port: a publish that got past the check would fail differently.
    publisher = Publisher(url="amqp://guest:guest@127.0.0.1:1/")
    runner = Runner([Quiet], settings=Settings(exchange="wkt"), transport=MemoryTransport())
    try:
        async with running(runner):
            with pytest.raises(PublishError, match="AsyncPublisher"):
                publisher.publish("k", {})
        with pytest.raises(Exception) as after:
            publisher.publish("k", {}, timeout=0.2)
        assert "AsyncPublisher" not in str(after.value)  # the runner is gone: not refused
    finally:
        publisher.close()
        Worker.registry.pop(Quiet.queue, None)


# -- NaN and infinity in a JSON body -----------------------------------------------------------


class _Reading(BaseModel):
    value: float


@dataclasses.dataclass
class _Sample:
    value: float


@dataclasses.dataclass(slots=True)
class _Slotted:
    value: float


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"v": math.inf}, "body['v']"),
        ({"a": [1.0, {"b": -math.inf}]}, "body['a'][1]['b']"),
        ([0.5, math.nan], "body[1]"),
        (_Reading(value=math.nan), "body['value']"),
        (_Sample(value=math.inf), "body['value']"),
        ([_Slotted(value=math.nan)], "body[0]['value']"),
    ],
)
def test_a_body_with_nan_or_infinity_is_refused_not_sent_as_null(body: object, where: str) -> None:
    """JSON has neither: both encoders wrote them as null, changing the data in silence."""
    from workerkit.message import encode_body

    with pytest.raises(InvalidMessage, match=re.escape(f"{where} is not a finite number")):
        encode_body(body)
    with pytest.raises(InvalidMessage, match="not a finite number"):
        build_outgoing("ex", "k", body, max_body_size=LIMIT)


def test_nulls_and_finite_floats_still_encode() -> None:
    from workerkit.message import encode_body

    assert encode_body({"none": None, "f": [1.5, -0.0, 1e308]}) == (
        b'{"none":null,"f":[1.5,-0.0,1e+308]}',
        "application/json",
    )
