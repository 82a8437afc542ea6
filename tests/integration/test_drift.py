"""`workerkit topology --check [--prune]`: argument drift and stale bindings, on the real broker
(through the management API when it is reachable, else AMQP only) and on the memory broker."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import httpx
import pytest
from broker import management_serves
from click.testing import CliRunner

from workerkit import Settings, Worker
from workerkit.cli import cli
from workerkit.drift import ManagementView, MemoryView, check, prune, run_check
from workerkit.management import endpoint
from workerkit.topology import QueueSpec, Topology
from workerkit.transport.memory import MemoryBroker, MemoryTransport
from workerkit.transport.pika_asyncio import PikaTransport

# The CLI imports this module by name: the class's queue must be unique per process.
QUEUE = f"t.drift.{os.getpid()}"


class DriftWorker(Worker):
    queue = QUEUE
    bindings = ("drift.current",)

    async def handle(self, body: bytes) -> None:  # pragma: no cover - never run
        pass


@pytest.fixture
async def drifted(settings: Settings) -> AsyncIterator[Settings]:
    """DriftWorker's queues on the broker, with a changed argument and a stale binding."""
    topo = Topology(settings)
    dlq, work = topo.worker_queues(DriftWorker)
    changed = QueueSpec(work.name, {**work.arguments, "x-delivery-limit": 99}, work.bindings)
    connection = await PikaTransport().connect(settings, name="t", on_lost=lambda _e: None)
    await topo.adopt_dead_letter_queues(connection, [DriftWorker])  # an older run's queues
    channel = await connection.channel()
    await topo.declare_exchanges(channel)
    for spec in (dlq, changed):
        await channel.declare_queue(spec)
        for exchange, key in spec.bindings:
            await channel.bind_queue(spec.name, exchange, key)
    await channel.bind_queue(work.name, settings.exchange, "drift.removed")  # code dropped it
    try:
        yield settings
    finally:
        for name in (work.name, dlq.name):
            await channel.delete_queue(name)
        await connection.close()


def _management_up(settings: Settings) -> bool:
    """The API of the broker under test answers: the session node's own on 4.x runs, the host
    node's on 3.10 (when scripts/test.sh has enabled the plugin there)."""
    given = settings.management_url
    return management_serves(
        settings.url.get_secret_value(), given.get_secret_value() if given else None
    )


async def test_amqp_only_finds_the_argument_drift_and_says_it_cannot_see_bindings(
    drifted: Settings,
) -> None:
    report, why = await run_check(
        drifted,
        [DriftWorker],
        management_url="http://127.0.0.1:1",  # nothing listens there
    )
    assert why is not None and report.method.startswith("over AMQP alone")
    [drift] = report.drifts
    assert drift.kind == "argument" and drift.queue == QUEUE
    assert "x-delivery-limit" in drift.detail
    assert report.not_checked and "bindings" in report.not_checked[0]


async def test_management_api_finds_argument_drift_and_the_stale_binding(
    drifted: Settings,
) -> None:
    if not _management_up(drifted):
        pytest.skip("the broker's management API is not reachable (AMQP path tested above)")
    report, why = await run_check(drifted, [DriftWorker])
    assert why is None
    kinds = {(d.kind, d.detail.split(":")[0]) for d in report.drifts}
    assert ("argument", "x-delivery-limit") in kinds
    [stale] = report.stale
    assert stale.binding == (drifted.exchange, "drift.removed")
    assert await prune(drifted, report.stale) == 1
    again, _ = await run_check(drifted, [DriftWorker])
    assert again.stale == []


def test_the_cli_prints_the_diff_and_exits_1(drifted: Settings) -> None:
    env = {"WORKERKIT_EXCHANGE": drifted.exchange, "WORKERKIT_URL": drifted.url.get_secret_value()}
    result = CliRunner().invoke(
        cli,
        ["topology", f"{__name__}:DriftWorker", "--check"],
        env=env,
    )
    assert result.exit_code == 1, result.output
    [line] = [ln for ln in result.output.splitlines() if ln.startswith("~ argument")]
    assert QUEUE in line and "x-delivery-limit" in line, result.output
    assert "drift found" in result.output


async def test_no_drift_after_declaring_what_the_code_says(settings: Settings) -> None:
    connection = await PikaTransport().connect(settings, name="t", on_lost=lambda _e: None)
    topology = Topology(settings)
    await topology.adopt_dead_letter_queues(connection, [DriftWorker])  # an older run's queues
    channel = await connection.channel()
    await topology.declare(channel, [DriftWorker])
    try:
        report, _ = await run_check(settings, [DriftWorker], management_url="http://127.0.0.1:1")
        assert report.drifts == []
    finally:
        for spec in Topology(settings).worker_queues(DriftWorker):
            await channel.delete_queue(spec.name)
        await connection.close()


async def test_memory_broker_sees_argument_drift_and_stale_bindings_and_prunes() -> None:
    settings = Settings(exchange="wkt")
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    connection = await transport.connect(settings, name="t", on_lost=lambda _e: None)
    channel = await connection.channel()
    topo = Topology(settings)
    await topo.declare(channel, [DriftWorker])
    broker.queues[QUEUE].arguments["x-delivery-limit"] = 99  # as if declared by older code
    await channel.bind_queue(QUEUE, settings.exchange, "drift.removed")
    report = await check(settings, [DriftWorker], MemoryView(broker))
    assert [(d.kind, d.queue) for d in report.drifts] == [
        ("argument", QUEUE),
        ("stale-binding", QUEUE),
    ]
    assert await prune(settings, report.stale, transport) == 1
    after = await check(settings, [DriftWorker], MemoryView(broker))
    assert [d.kind for d in after.drifts] == ["argument"]


async def test_topology_declares_on_the_memory_broker_without_drift() -> None:
    from workerkit.cli import _declare

    settings = Settings(exchange="wkt")
    transport = MemoryTransport(MemoryBroker())
    await _declare(settings, [DriftWorker], transport)
    report, why = await run_check(settings, [DriftWorker], transport=transport)
    assert (report.method, why, report.drifts, report.not_checked) == (
        "on the memory broker",
        None,
        [],
        [],
    )


async def test_management_view_reads_the_api_format() -> None:
    """The management API's JSON (as RabbitMQ 3.10 serves it) read through httpx; the live
    path is tested above when the broker has the plugin."""
    settings = Settings(url="amqp://u:p@broker:5672/vh", exchange="wkt")
    routes: dict[str, object] = {
        "/api/queues/vh/q1": {"name": "q1", "arguments": {"x-queue-type": "classic"}},
        "/api/queues/vh/q1/bindings": [
            {"source": "", "routing_key": "q1", "destination": "q1"},
            {"source": "wkt", "routing_key": "old", "destination": "q1"},
        ],
    }
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        body = routes.get(request.url.path)
        return httpx.Response(404) if body is None else httpx.Response(200, json=body)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), auth=("u", "p"))
    view = ManagementView(endpoint(settings), client)
    assert await view.arguments(QueueSpec("q1", {})) == {"x-queue-type": "classic"}
    assert await view.arguments(QueueSpec("nope", {})) is None
    assert await view.bindings("q1") == {("wkt", "old")}
    assert seen and all(a.startswith("Basic ") for a in seen)
    await client.aclose()
