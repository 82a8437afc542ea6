"""``workerkit status`` on a node without the management plugin: the AMQP fallback shows the
depths and consumers, says why, and ``--check`` still sees dead letters; a derived management
address that answers for another broker is not trusted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pika
import pytest
from broker import PrivateBroker, free_port, management_serves

from workerkit import Settings
from workerkit.cli import _declare, load_targets

WORKERKIT = Path(sys.executable).parent / "workerkit"

APP = """
from workerkit import Worker


class Fallback(Worker):
    queue = {queue!r}
    queue_type = "classic"

    async def handle(self, body: bytes) -> None:
        pass
"""


def test_status_falls_back_to_amqp_without_the_management_plugin(
    private_broker: PrivateBroker, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    queue = unique("fallback")
    module = f"fallbackapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(APP.format(queue=queue))
    sys.path.insert(0, str(tmp_path))
    try:
        settings = Settings(url=private_broker.url)
        asyncio.run(_declare(settings, load_targets([module])))
    finally:
        sys.path.remove(str(tmp_path))
    connection = pika.BlockingConnection(pika.URLParameters(private_broker.url))
    channel = connection.channel()
    for n in range(4):
        channel.basic_publish("", queue, b"%d" % n)
    channel.basic_publish("", f"{queue}.dlq", b"dead")
    channel.basic_consume(queue, lambda *_: None)  # one consumer, prefetch unlimited
    env = {
        "PATH": "/usr/bin:/bin",
        "WORKERKIT_URL": private_broker.url,
        # Nothing listens there: the node has no plugins (the shared node's API is not ours).
        "WORKERKIT_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}",
    }

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(WORKERKIT), "status", module, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        connection.process_data_events(0.5)  # the consumer takes the 4 messages (unacked)
        answer = status("--json")
        assert answer.returncode == 0, answer.stderr
        doc = orjson.loads(answer.stdout)
        assert doc["source"] == "amqp"
        assert "connection refused" in doc["management_error"]
        assert doc["queues"] == [
            {
                "queue": queue,
                "exists": True,
                "ready": 0,  # all four are unacked, which AMQP cannot count
                "unacked": None,
                "consumers": 1,
                "dlq": 1,
                "publish_rate": None,
                "deliver_rate": None,
            }
        ]
        assert doc["delay_waiting"] == 0  # the delay layout exists, empty
        table = status()
        assert table.returncode == 0
        assert table.stdout.splitlines()[1].split()[:5] == [queue, "0", "-", "1", "1"]
        assert "no unacked counts, no rates" in table.stdout
        check = status("--check")
        assert check.returncode == 1 and f"{queue}.dlq (1)" in check.stderr
        # Without modules the fallback cannot list queues, and says what to do.
        bare = subprocess.run(
            [str(WORKERKIT), "status"], env=env, capture_output=True, text=True, timeout=60
        )
        assert bare.returncode == 2
        assert "name the worker modules" in bare.stderr
    finally:
        connection.close()


def test_a_derived_management_url_of_another_broker_is_not_trusted(
    private_broker: PrivateBroker, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    """The private node has no plugin; the address derived from its AMQP URL
    (127.0.0.1:15672) is the shared node's API, which answers but knows nothing of this node's
    queues (it would report them missing). status and topology --check both see that it lists
    another AMQP port, fall back to AMQP and say why."""
    shared = "amqp://guest:guest@127.0.0.1:5672/"
    if not management_serves(shared):
        message = "no management API of the shared node on 127.0.0.1:15672 (scripts/test.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    queue = unique("foreign")
    module = f"foreignapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(APP.format(queue=queue))
    sys.path.insert(0, str(tmp_path))
    try:
        settings = Settings(url=private_broker.url)
        asyncio.run(_declare(settings, load_targets([module])))
    finally:
        sys.path.remove(str(tmp_path))
    connection = pika.BlockingConnection(pika.URLParameters(private_broker.url))
    for n in range(3):
        connection.channel().basic_publish("", queue, b"%d" % n)
    connection.close()
    env = {"PATH": "/usr/bin:/bin", "WORKERKIT_URL": private_broker.url}  # no management URL

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(WORKERKIT), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused = f"it serves another broker (AMQP on [5672], not {private_broker.port})"
    answer = run("status", module, "--json")
    assert answer.returncode == 0, answer.stderr
    doc = orjson.loads(answer.stdout)
    assert doc["source"] == "amqp"
    assert doc["management_url"] == "http://127.0.0.1:15672"
    assert refused in doc["management_error"]
    [row] = doc["queues"]
    assert (row["queue"], row["exists"], row["ready"]) == (queue, True, 3)
    table = run("status", module)
    assert table.returncode == 0
    assert f"management API at http://127.0.0.1:15672: {refused}" in table.stdout
    drift = run("topology", f"{module}:Fallback", "--check")
    assert drift.returncode == 0, drift.stdout + drift.stderr
    assert f"management API not used ({refused}" in drift.stderr
    assert "over AMQP alone" in drift.stdout
