"""`workerkit topology --check --prune` through the management API of a private node that has
the management plugin, so that the exact path (stale bindings included) is tested whether or not
the shared broker has the plugin. The AMQP-only path is tested in tests/integration/test_drift.py.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest
from broker import PrivateBroker, free_port
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


class ManagementBroker(PrivateBroker):
    """A private node with rabbitmq_management on its own loopback port."""

    def _write_files(self) -> None:
        self.http_port = free_port()
        super()._write_files()
        (self.base / "enabled_plugins").write_text("[rabbitmq_management].\n")
        with (self.base / "rabbitmq.conf").open("a") as conf:
            conf.write(f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.http_port}\n")
        for path in (self.base / "enabled_plugins", self.base / "rabbitmq.conf"):
            shutil.chown(path, "rabbitmq", "rabbitmq")

    @property
    def management_url(self) -> str:
        return f"http://guest:guest@127.0.0.1:{self.http_port}"


@pytest.fixture(scope="module")
def node() -> Iterator[ManagementBroker]:
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed")
    broker = ManagementBroker()
    broker.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # the HTTP listener comes up a little after AMQP
            try:
                if (
                    httpx.get(
                        f"http://127.0.0.1:{broker.http_port}/api/overview",
                        auth=("guest", "guest"),
                        timeout=2,
                    ).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the management API did not come up"
            time.sleep(0.5)
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


def _cli(node: ManagementBroker, *args: str, answer: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli,
        [
            "topology",
            f"{__name__}:MgmtWorker",
            "--check",
            "--management-url",
            node.management_url,
            *args,
        ],
        env={"WORKERKIT_URL": node.url, "WORKERKIT_EXCHANGE": "wkt"},
        input=answer,
    )
    return result.exit_code, result.output


def test_check_finds_the_drift_and_prune_removes_the_stale_binding(
    node: ManagementBroker,
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
