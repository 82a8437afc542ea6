"""Topology: delay routing keys, unit rounding, binding patterns and queue arguments."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from workerkit import Settings, Worker
from workerkit.topology import LEVELS, UNIT_MS, Topology, delay_units
from workerkit.transport.memory import topic_matches


@pytest.fixture
def topology() -> Topology:
    return Topology(Settings(exchange="wk", delivery_limit=7))


async def _handle(self: Any, body: bytes) -> None: ...


def worker(**attrs: Any) -> type[Worker]:
    attrs.setdefault("queue", f"unit.topo.{uuid.uuid4().hex[:8]}")
    attrs["handle"] = _handle
    return type("TopoWorker", (Worker,), attrs)


@pytest.mark.parametrize(
    ("seconds", "units"),
    [
        (0, 0),
        (-3, 0),
        (0.1, 1),
        (0.3, 3),  # 0.3 * 10 is 2.9999999999999996 in floats: must still be 3, not 4
        (0.7, 7),
        (0.101, 2),  # rounded *up*: never due sooner than asked
        (0.001, 1),
        (1.0, 10),
        (60.25, 603),
        (3600, 36_000),
    ],
)
def test_delay_units_round_up(seconds: float, units: int) -> None:
    assert delay_units(seconds) == units
    assert units * UNIT_MS >= seconds * 1000 - 1e-9


def test_delay_units_cap_at_the_largest_delay() -> None:
    top = 2**LEVELS - 1
    assert delay_units(top * UNIT_MS / 1000) == top
    assert delay_units(10**12) == top


def bits_of(routing_key: str) -> list[str]:
    return routing_key.split(".")[1 : 1 + LEVELS]


@pytest.mark.parametrize("seconds", [0.1, 0.5, 1.3, 12.7, 300.0, 86_400.0])
def test_delay_route_encodes_units_in_binary(topology: Topology, seconds: float) -> None:
    exchange, key = topology.retry_route("orders", seconds)
    # Enters at its highest 1 bit: the levels above would only pass it on.
    assert exchange == topology.level_name(delay_units(seconds).bit_length() - 1)
    assert key.startswith("r.") and key.endswith(".orders")
    bits = bits_of(key)
    assert len(bits) == LEVELS and set(bits) <= {"0", "1"}
    assert int("".join(bits), 2) == delay_units(seconds)  # most significant bit first


def test_scheduled_route_keeps_a_dotted_routing_key(topology: Topology) -> None:
    _, key = topology.scheduled_route("orders.placed", 2.0)
    assert key.startswith("p.") and key.endswith(".orders.placed")
    assert int("".join(bits_of(key)), 2) == 20


def _level_for_key(topology: Topology, key: str) -> list[str]:
    """Where each level's exchange sends ``key``: 'queue' (wait) or 'next' (pass on)."""
    queues = {q.name: q for q in topology.delay_queues()}
    passes = {src: pattern for _, src, pattern in topology.delay_exchange_bindings()}
    path = []
    for level in reversed(range(LEVELS)):
        name = topology.level_name(level)
        ((_, wait_pattern),) = queues[name].bindings
        waits = topic_matches(wait_pattern, key)
        moves_on = topic_matches(passes[name], key)
        assert waits != moves_on, f"level {level} must do exactly one thing with {key}"
        path.append("queue" if waits else "next")
    return path


@pytest.mark.parametrize("seconds", [0.1, 0.2, 2.5, 1000.0])
def test_each_level_waits_exactly_on_its_bit(topology: Topology, seconds: float) -> None:
    _, key = topology.retry_route("q", seconds)
    path = _level_for_key(topology, key)
    expected = ["queue" if bit == "1" else "next" for bit in bits_of(key)]
    assert path == expected


@pytest.mark.parametrize("seconds", [0.0, 0.1, 0.3, 2.0, 86_400.0, 10**12])
def test_a_delay_enters_where_it_first_waits(topology: Topology, seconds: float) -> None:
    """No hop above the first level that holds the message (a zero delay goes through level 0
    straight to delay.out); the levels above it would only have passed it on."""
    exchange, key = topology.retry_route("q", seconds)
    entry = int(exchange.rsplit(".", 1)[1])
    path = _level_for_key(topology, key)  # top level first
    skipped, rest = path[: LEVELS - 1 - entry], path[LEVELS - 1 - entry :]
    assert set(skipped) <= {"next"}
    assert rest[0] == ("queue" if delay_units(seconds) else "next")
    passes = {src: dest for dest, src, _ in topology.delay_exchange_bindings()}
    assert passes["wk.delay.00"] == "wk.delay.out"


def test_total_wait_of_the_levels_is_the_delay(topology: Topology) -> None:
    _, key = topology.retry_route("q", 12.3)
    levels = [q for q in topology.delay_queues() if ".delay." in q.name]
    ttl = {q.name: q.arguments["x-message-ttl"] for q in levels}
    total = sum(
        ttl[topology.level_name(LEVELS - 1 - i)] for i, bit in enumerate(bits_of(key)) if bit == "1"
    )
    assert total == 12_300


def test_level_queues_expire_into_the_next_level(topology: Topology) -> None:
    queues = {q.name: q.arguments for q in topology.delay_queues()}
    assert queues["wk.delay.00"]["x-message-ttl"] == UNIT_MS
    assert queues["wk.delay.00"]["x-dead-letter-exchange"] == "wk.delay.out"
    assert queues["wk.delay.05"]["x-message-ttl"] == UNIT_MS * 32
    assert queues["wk.delay.05"]["x-dead-letter-exchange"] == "wk.delay.04"
    for args in queues.values():
        assert args["x-queue-type"] == "quorum"
    assert len([n for n in queues if n.startswith("wk.delay.")]) == LEVELS


def test_delay_out_has_an_alternate_exchange(topology: Topology) -> None:
    specs = {spec.name: spec for spec in topology.delay_exchanges()}
    assert specs["wk.delay.out"].arguments == {"alternate-exchange": "wk.unroutable"}
    assert specs["wk.unroutable"].type == "fanout"


def test_worker_queue_bindings(topology: Topology) -> None:
    cls = worker(bindings=("orders.placed", "audit.#"))
    dlq, queue = topology.worker_queues(cls)
    assert dlq.name == f"{cls.queue}.dlq"
    main = [key for exchange, key in queue.bindings if exchange == "wk"]
    assert main == [cls.queue, "orders.placed", "audit.#"]
    delayed = [key for exchange, key in queue.bindings if exchange == "wk.delay.out"]
    _, retry_key = topology.retry_route(cls.queue, 3.0)
    _, other_retry = topology.retry_route(cls.queue + "x", 3.0)
    assert any(topic_matches(p, retry_key) for p in delayed)
    assert not any(topic_matches(p, other_retry) for p in delayed)
    # A scheduled publish reaches the queue exactly when a direct publish would.
    for key, reaches in [("orders.placed", True), ("audit.x.y", True), ("orders.paid", False)]:
        _, scheduled = topology.scheduled_route(key, 1.0)
        assert any(topic_matches(p, scheduled) for p in delayed) is reaches
        assert any(topic_matches(p, key) for p in main) is reaches


def test_own_name_is_not_bound_twice(topology: Topology) -> None:
    name = f"unit.topo.{uuid.uuid4().hex[:8]}"
    _, queue = topology.worker_queues(worker(queue=name, bindings=(name,)))
    assert [key for ex, key in queue.bindings if ex == "wk"] == [name]


def test_quorum_arguments(topology: Topology) -> None:
    cls = worker()
    dlq, queue = topology.worker_queues(cls)
    assert queue.arguments["x-queue-type"] == "quorum"
    assert queue.arguments["x-delivery-limit"] == 7  # from Settings
    assert queue.arguments["x-dead-letter-exchange"] == ""
    assert queue.arguments["x-dead-letter-routing-key"] == f"{cls.queue}.dlq"
    assert queue.arguments["x-dead-letter-strategy"] == "at-least-once"
    # No broker may drop a dead letter: 4.0+ defaults to a limit of 20 deliveries otherwise.
    assert dlq.arguments == {"x-queue-type": "quorum", "x-delivery-limit": 2**31 - 1}
    assert dlq.bindings == ()  # reached through the default exchange


def test_legacy_dlq_keeps_its_arguments(topology: Topology) -> None:
    cls = worker()
    topology.legacy_queues.add(f"{cls.queue}.dlq")
    dlq, _ = topology.worker_queues(cls)
    assert dlq.arguments == {"x-queue-type": "quorum"}


def test_worker_delivery_limit_overrides_settings(topology: Topology) -> None:
    _, queue = topology.worker_queues(worker(delivery_limit=3))
    assert queue.arguments["x-delivery-limit"] == 3


def test_classic_arguments(topology: Topology) -> None:
    cls = worker(queue_type="classic")
    dlq, queue = topology.worker_queues(cls)
    assert "x-queue-type" not in queue.arguments
    assert "x-delivery-limit" not in queue.arguments
    assert queue.arguments["x-dead-letter-routing-key"] == f"{cls.queue}.dlq"
    assert dlq.arguments == {}


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "", True),
        ("#.c", "a.b.c", True),
        ("*.b.#", "a.b", True),
        ("a.*.c", "a.c", False),
    ],
)
def test_topic_matching_used_by_these_tests(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches
