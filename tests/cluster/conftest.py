"""Fixtures for the cluster scenarios: one 3-node cluster per module, worker processes, oracles.

Marked ``cluster``. They take 3 to 12 minutes per version, so the default run deselects them
(``-m "not cluster"`` in pyproject's addopts) and ``pytest -m cluster`` runs them as a step of
their own (scripts/test.sh runs it after the main suite, for 3.10 and 4.3).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "reliability"))

from cluster import Cluster, SteeredWorker  # noqa: E402
from harness import make_out_dir  # noqa: E402
from oracle import Oracle  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.timeout(420))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        message = "the cluster scenarios need rabbitmq-server and root (private nodes)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    c = Cluster(3)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def healthy_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster, healed after each scenario (killed or stopped nodes booted)."""
    cluster.heal()
    yield cluster
    cluster.heal()


@pytest.fixture
def out_dir() -> Iterator[Path]:
    path = make_out_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def oracle(request: pytest.FixtureRequest) -> Oracle:
    return Oracle("cluster_" + request.node.name.removeprefix("test_"))


@pytest.fixture
def workers(out_dir: Path) -> Iterator[Callable[..., SteeredWorker]]:
    started: list[SteeredWorker] = []

    def start(queue: str, url: str, **settings: Any) -> SteeredWorker:
        proc = SteeredWorker(queue, url, out_dir, **settings)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()
