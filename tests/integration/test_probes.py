"""``workerkit run --health-port`` against the real broker: /ready follows start-up, consuming and
draining; /metrics counts acked, retried, dead-lettered, rejected and invalid deliveries."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from workerkit import Publisher, Settings

from .workers_fixture import consumer_count, delete_queues, publish_raw, ready_count

pytestmark = pytest.mark.integration

WORKERKIT = Path(sys.executable).parent / "workerkit"

APP_SOURCE = """
import asyncio
import os

from workerkit import Reject, RetryPolicy, Worker

GATE = {gate!r}


class Probed(Worker):
    queue = {queue!r}
    retry = RetryPolicy(max_attempts=2, delay=0.2, jitter=0.0)

    async def setup(self) -> None:
        while not os.path.exists(GATE):  # the test decides when start-up ends
            await asyncio.sleep(0.02)

    async def handle(self, body: dict) -> None:
        kind = body["kind"]
        if kind == "slow":
            await asyncio.sleep(3)
        elif kind == "reject":
            raise Reject("no")
        elif kind == "fail":
            raise RuntimeError("always")
"""


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def status(port: int, path: str) -> int:
    return http_get(port, path)[0]


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, text = http_get(port, "/metrics")
    assert code == 200
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def metric(port: int, name: str, **labels: str) -> float:
    return samples(port).get((name, tuple(sorted(labels.items()))), 0.0)


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def queue(settings: Settings, unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("probes")
    yield name
    delete_queues(settings.url.get_secret_value(), name, f"{name}.dlq")


def test_ready_metrics_and_draining_through_the_cli(
    tmp_path: Path, settings: Settings, queue: str
) -> None:
    url = settings.url.get_secret_value()
    gate = tmp_path / "gate"
    module = f"probeapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(APP_SOURCE.format(gate=str(gate), queue=queue))
    stderr = tmp_path / "stderr.log"
    env = {**os.environ, "WORKERKIT_URL": url, "WORKERKIT_EXCHANGE": "wkt"}
    with stderr.open("wb") as sink:
        proc = subprocess.Popen(
            [str(WORKERKIT), "run", module, "--health-port", "0", "--health-host", "127.0.0.1"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        found = until(
            lambda: re.search(r"health endpoint on http://127.0.0.1:(\d+)/", stderr.read_text()),
            30,
            "the health endpoint",
        )
        port = int(found.group(1))
        # Starting: the consumer is attached, but setup() has not returned: not ready.
        until(lambda: consumer_count(url, queue) == 1, 30, "the consumer to attach")
        assert http_get(port, "/ready") == (503, "not ready\n")
        assert status(port, "/metrics") == 200
        gate.touch()
        until(lambda: status(port, "/ready") == 200, 30, "/ready 200 while consuming")
        assert http_get(port, "/ready") == (200, "ready\n")
        assert status(port, "/health") == 200
        assert status(port, "/nope") == 404

        with Publisher(settings=settings) as publisher:
            for kind in ("ok", "ok", "reject", "fail"):
                publisher.publish(queue, {"kind": kind})
        publish_raw(url, "wkt", queue, b"{not json")

        def counted() -> bool:
            return (
                metric(port, "workerkit_messages_total", queue=queue, outcome="dead_lettered") == 1
                and metric(port, "workerkit_messages_total", queue=queue, outcome="invalid") == 1
            )

        until(counted, 20, "the failures to be counted")
        assert metric(port, "workerkit_messages_total", queue=queue, outcome="acked") == 2
        assert metric(port, "workerkit_messages_total", queue=queue, outcome="rejected") == 1
        assert metric(port, "workerkit_messages_total", queue=queue, outcome="retried") == 1
        assert metric(port, "workerkit_handler_seconds_count", queue=queue) == 6
        # Lag: the four first deliveries from workerkit (the raw one has no timestamp; the
        # retry is not a first delivery).
        assert metric(port, "workerkit_delivery_lag_seconds_count", queue=queue) == 4
        assert metric(port, "workerkit_in_flight", queue=queue) == 0
        assert metric(port, "workerkit_reconnects_total") == 0
        assert ready_count(url, f"{queue}.dlq") == 3

        # Draining: SIGTERM with a handler in flight is 503 at once, and stays so until exit.
        with Publisher(settings=settings) as publisher:
            publisher.publish(queue, {"kind": "slow"})
        until(lambda: metric(port, "workerkit_in_flight", queue=queue) == 1, 10, "in flight")
        proc.send_signal(signal.SIGTERM)
        until(lambda: status(port, "/ready") == 503, 2.5, "/ready 503 while draining")
        assert proc.wait(timeout=30) == 0, stderr.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ready_count(url, queue) == 0  # the slow one was finished and acked
