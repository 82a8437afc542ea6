"""`workerkit topology --check --prune` through the management API of a private node that has
the management plugin, so that the exact path (stale bindings included) is tested whether or not
the shared broker has the plugin. The AMQP-only path is tested in tests/integration/test_drift.py.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import pytest
from broker import PrivateBroker, version_under_test
from click.testing import CliRunner

from workerkit import Settings, Worker
from workerkit.cli import cli
from workerkit.topology import QueueSpec, Topology
from workerkit.transport.pika_asyncio import PikaTransport

QUEUE = "t.drift.mgmt"


class MgmtWorker(Worker):
    queue = QUEUE
    bindings = ("drift.kept",)

    async def handle(self, body: bytes) -> None:  # pragma: no cover - never run
        pass


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateBroker]:
    """A private node with rabbitmq_management on its own loopback port (start() waits for the
    API to answer)."""
    if version_under_test() == "3.10" and shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed")
    broker = PrivateBroker(management=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def _drift(settings: Settings) -> None:
    """MgmtWorker's queues with another delivery limit and a binding the code no longer has."""
    topo = Topology(settings)
    dlq, work = topo.worker_queues(MgmtWorker)
    connection = await PikaTransport().connect(settings, name="t", on_lost=lambda _e: None)
    channel = await connection.channel()
    await topo.declare_exchanges(channel)
    await channel.declare_queue(dlq)
    await channel.declare_queue(QueueSpec(work.name, {**work.arguments, "x-delivery-limit": 3}))
    for exchange, key in work.bindings:
        await channel.bind_queue(work.name, exchange, key)
    await channel.bind_queue(work.name, settings.exchange, "drift.dropped")
    await connection.close()


def _cli(node: PrivateBroker, *args: str, answer: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli,
        [
            "topology",
            f"{__name__}:MgmtWorker",
            "--check",
            "--management-url",
            str(node.management_url),
            *args,
        ],
        env={"WORKERKIT_URL": node.url, "WORKERKIT_EXCHANGE": "wkt"},
        input=answer,
    )
    return result.exit_code, result.output


def test_check_finds_the_drift_and_prune_removes_the_stale_binding(
    node: PrivateBroker,
) -> None:
    asyncio.run(_drift(Settings(url=node.url, exchange="wkt")))

    code, out = _cli(node)
    assert code == 1, out
    assert "through the management API" in out
    assert f"~ argument {QUEUE}: x-delivery-limit: code 20, broker 3" in out
    assert f"- stale-binding {QUEUE}: wkt 'drift.dropped'" in out
    assert "drift.kept" not in out  # declared by the code and present: no drift

    code, out = _cli(node, "--prune", answer="n\n")  # declined: nothing removed
    assert code == 1 and "removed" not in out, out
    code, out = _cli(node)
    assert "stale-binding" in out

    code, out = _cli(node, "--prune", "--yes")
    assert "removed 1 stale binding(s)" in out, out
    assert code == 1  # the argument drift remains: pruning only removes bindings
    code, out = _cli(node)
    assert "stale-binding" not in out and "x-delivery-limit" in out
