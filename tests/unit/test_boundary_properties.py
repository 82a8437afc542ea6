"""Property-based tests over the boundaries, without a broker (issue 9).

For every generated input: workerkit's own check agrees with what the AMQP client can encode,
so a value is either refused with a typed error before the network or encoded without error.
The round trip through a real broker is in tests/integration/test_boundary_roundtrip.py.
"""

from __future__ import annotations

import math
import string
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import hypothesis.strategies as st
import pika
import pika.frame
from hypothesis import HealthCheck, example, given, settings
from pika.spec import BasicProperties

from workerkit import ConfigurationError, InvalidMessage, Settings
from workerkit.message import build_outgoing, check_headers, copy_headers
from workerkit.settings import redact_url
from workerkit.topology import MAX_DELAY

LIMIT = 1 << 20

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=2),
    st.binary(max_size=20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=False, allow_infinity=False, places=None),
    st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.none()
    ),
    st.tuples(st.integers(0, 3)),
)
keys = st.one_of(
    st.text(min_size=0, max_size=300),
    st.text(alphabet="é", min_size=120, max_size=130),
    st.integers(0, 3),
    st.binary(max_size=4),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
tables = st.dictionaries(keys, values, max_size=4)


def pika_encodes(**props: Any) -> bool:
    try:
        pika.frame.Header(1, 0, BasicProperties(**props)).marshal()
    except Exception:
        return False
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables)
@example({"f": 1.5})
@example({"big": 2**63})
@example({"d": Decimal("1E+10")})
@example({"k" * 256: 1})
@example({"when": datetime(1969, 12, 31)})
def test_header_check_agrees_with_the_client(headers: dict[Any, Any]) -> None:
    try:
        check_headers(headers)
    except InvalidMessage:
        # Refused: the client could not have encoded it either, or it is not a str key (which
        # workerkit refuses from publishers even where the client would cope).
        non_str_keys = any(not isinstance(k, str) for k in _all_keys(headers))
        assert non_str_keys or _reserved_route(headers) or not pika_encodes(headers=headers)
        return
    assert pika_encodes(headers=headers)


def _all_keys(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [*value, *(k for v in value.values() for k in _all_keys(v))]
    if isinstance(value, list):
        return [k for v in value for k in _all_keys(v)]
    return []


def _reserved_route(headers: dict[Any, Any]) -> bool:
    return any(k in ("CC", "BCC") for k in headers)


decoded_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**1000),  # pika truncates big doubles to ints
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20),
    st.binary(max_size=20),
    st.floats(),
    st.decimals(min_value=-1000, max_value=1000, places=2),
    st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.none()),
)
decoded_tables = st.dictionaries(
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)
    | st.binary(min_size=1, max_size=10),
    st.recursive(
        decoded_scalars,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3)
        ),
        max_leaves=8,
    ),
    max_size=5,
)


@settings(max_examples=100, deadline=None)
@given(decoded_tables)
def test_a_copy_of_anything_a_client_can_deliver_can_be_sent_again(headers: dict[Any, Any]) -> None:
    copied = copy_headers(headers)
    check_headers(copied, copy=True)
    assert pika_encodes(headers=copied)
    assert "CC" not in copied and "BCC" not in copied


@settings(max_examples=100, deadline=None)
@given(
    st.text(max_size=300),
    st.one_of(st.none(), st.text(max_size=300)),
    st.one_of(st.none(), st.text(max_size=300)),
)
def test_ids_and_routing_keys_are_refused_or_encodable(
    key: str, mid: str | None, rto: str | None
) -> None:
    try:
        out = build_outgoing("ex", key, b"", message_id=mid, reply_to=rto, max_body_size=LIMIT)
    except InvalidMessage:
        assert not key or not pika_encodes(message_id=mid, reply_to=rto, content_type=key)
        return
    assert pika_encodes(message_id=out.message_id, reply_to=rto, content_type=key)


password_chars = st.text(alphabet=string.printable + "é€", min_size=1, max_size=12)


@settings(max_examples=100, deadline=None)
@given(password_chars, password_chars)
def test_a_url_is_refused_or_parses_as_written_and_never_leaks(user: str, password: str) -> None:
    secret = f"S3CR3T{password}"
    raw = f"amqp://{user}:{secret}@broker.example:5672/vhost"
    try:
        settings = Settings(url=raw)
    except ConfigurationError as exc:
        assert secret not in str(exc)
    else:
        params = pika.URLParameters(settings.url.get_secret_value())
        assert params.host == "broker.example"
        assert params.port == 5672
        assert params.virtual_host == "vhost"
        assert secret not in settings.redacted_url
    assert secret not in redact_url(raw)
    # Percent-encoded, any password is accepted and reaches the client unchanged.
    encoded = f"amqp://{quote(user, safe='')}:{quote(secret, safe='')}@broker.example/"
    params = pika.URLParameters(Settings(url=encoded).url.get_secret_value())
    assert params.credentials.password == secret
    assert params.host == "broker.example"
    assert secret not in redact_url(encoded)


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float_settings_are_finite_or_refused(value: float) -> None:
    try:
        settings = Settings(publish_timeout=value, retry_delay=value)
    except ConfigurationError:
        assert not (math.isfinite(value) and value > 0)
        return
    assert math.isfinite(settings.publish_timeout) and settings.publish_timeout > 0


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**12)))
def test_delays_route_or_are_refused(delay: float) -> None:
    from workerkit.publisher import _Core

    core = _Core(Settings(), transport=None)
    try:
        message = core.message("orders.placed", {}, delay=delay)
    except InvalidMessage:
        assert not (math.isfinite(delay) and 0 <= delay <= MAX_DELAY)
        return
    assert math.isfinite(delay) and 0 <= delay <= MAX_DELAY
    assert message.routing_key.endswith("orders.placed")
    assert (message.exchange == "workerkit") == (delay == 0)
    assert datetime.now(timezone.utc)  # the route is pure: nothing was sent
