"""Fixtures for the reliability suite: private brokers, a fault proxy, the oracle, worker processes.

Nothing here touches the shared broker: every fault goes to a private RabbitMQ node (see
broker.py). The helper modules live next to this file and are imported by name.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from broker import PrivateBroker, version_under_test
from harness import WorkerProcess, make_out_dir
from oracle import Oracle
from proxy import Proxy


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)
        if item.get_closest_marker("chaos"):
            # The soak's own length plus a node boot, the drain and the checks.
            item.add_marker(pytest.mark.timeout(config.getoption("--chaos-seconds") + 540))


@pytest.fixture(scope="session")
def private_broker() -> Iterator[PrivateBroker]:
    """One private node for the session; scenarios leave it running and healthy."""
    # 4.x nodes run from a Debian root that PrivateBroker builds when missing (or fails loudly).
    if version_under_test() == "3.10" and shutil.which("rabbitmq-server") is None:
        message = "rabbitmq-server is not installed: the reliability suite needs private nodes"
        if os.environ.get("CI"):
            pytest.fail(message)  # never a silent skip in CI
        pytest.skip(message)
    broker = PrivateBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def fresh_broker() -> Iterator[PrivateBroker]:
    """A node of its own, for scenarios that wreck state (restarts)."""
    broker = PrivateBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def proxy(private_broker: PrivateBroker) -> Iterator[Proxy]:
    """A loopback TCP proxy in front of the private broker."""
    p = Proxy("127.0.0.1", private_broker.port).start()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def oracle(request: pytest.FixtureRequest) -> Oracle:
    return Oracle(request.node.name.removeprefix("test_"))


@pytest.fixture
def out_dir() -> Iterator[Path]:
    path = make_out_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workers(out_dir: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes writing to ``out_dir``; every one is killed at teardown."""
    started: list[WorkerProcess] = []

    def start(queue: str, url: str, **settings: Any) -> WorkerProcess:
        proc = WorkerProcess(queue, url, out_dir, **settings)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()
