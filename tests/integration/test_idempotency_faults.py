"""Idempotent workers under real faults: kill -9 of a worker process and a cut connection
deliver duplicates; exactly one side effect is counted (in Redis) for each message."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr

from workerkit import Runner, Settings, Worker
from workerkit.idempotency import Claim, RedisStore
from workerkit.testing import running, wait_for

from .workers_fixture import STARTED, publish_raw, ready_count

redis = pytest.importorskip("redis")

pytestmark = pytest.mark.integration

REDIS = "redis://127.0.0.1:6379/0"
SCRIPT = Path(__file__).with_name("idem_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def r() -> Any:
    client = redis.Redis.from_url(REDIS)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"no Redis at {REDIS}: {exc}")
    return client


@pytest.fixture
def prefix(r: Any) -> Iterator[str]:
    p = f"wkt:idem:{uuid.uuid4().hex[:8]}:"
    yield p
    keys = list(r.scan_iter(match=p + "*"))
    if keys:
        r.delete(*keys)


def _start(mode: str, queue: str, settings: Settings, prefix: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            mode,
            queue,
            settings.url.get_secret_value(),
            settings.exchange,
            prefix,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    STARTED.append(proc)  # killed by the integration conftest if the test fails
    return proc


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(condition):
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


def _int(r: Any, key: str) -> int:
    return int(r.get(key) or 0)


async def test_kill_after_commit_before_ack_runs_the_handler_once(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], r: Any, prefix: str
) -> None:
    q = unique("idemkill")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    first = _start("kill-after-commit", q, settings, prefix)
    await _until(lambda: _consumers(url, q), 30, "worker A up")
    publish_raw(url, settings.exchange, q, b'{"id": "m1"}', message_id="m1")
    rc = await asyncio.to_thread(first.wait, 30)
    assert rc == -9, f"worker A was not killed after its commit (rc {rc})"
    assert _int(r, f"{prefix}effects:m1") == 1
    # Unacked: the broker has it again. Worker B receives the duplicate.
    second = _start("kill-after-commit", q, settings, prefix)
    await _until(lambda: _int(r, f"{prefix}claims:m1") >= 2, 30, "the duplicate's claim")
    await _until(lambda: ready_count(url, q) == 0 and _unacked(url, q) == 0, 30, "acked")
    assert _int(r, f"{prefix}effects:m1") == 1, "the duplicate ran the handler again"
    second.terminate()
    assert await asyncio.to_thread(second.wait, 30) == 0


async def test_kill_mid_handler_leaves_a_claim_that_expires_then_runs_once(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], r: Any, prefix: str
) -> None:
    q = unique("idemhang")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    first = _start("hang-first", q, settings, prefix)
    await _until(lambda: _consumers(url, q), 30, "worker A up")
    publish_raw(url, settings.exchange, q, b'{"id": "m2"}', message_id="m2")
    await _until(lambda: r.exists(f"{prefix}started:m2"), 30, "the handler started")
    first.kill()  # kill -9 mid-handler: its claim stays in Redis until it expires
    assert await asyncio.to_thread(first.wait, 10) == -9
    claim_key = f"{prefix}{q}:m2"
    assert r.get(claim_key) not in (None, b"done")  # a live claim of a dead process
    second = _start("hang-first", q, settings, prefix)
    await _until(lambda: _int(r, f"{prefix}effects:m2") == 1, 40, "the retry after expiry")
    await _until(lambda: ready_count(url, q) == 0 and _unacked(url, q) == 0, 30, "acked")
    assert _int(r, f"{prefix}effects:m2") == 1
    assert r.get(claim_key) == b"done"
    assert _int(r, f"{prefix}claims:m2") >= 3  # A's claim, B finding it busy, B's claim
    second.terminate()
    assert await asyncio.to_thread(second.wait, 30) == 0


async def test_a_cut_connection_after_commit_delivers_a_duplicate_that_does_not_run(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], r: Any, prefix: str
) -> None:
    from proxy import Proxy  # tests/conftest.py put tests/reliability on sys.path

    q = unique("idemcut")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    target = urlsplit(settings.url.get_secret_value())  # the broker under test
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 5672).start()
    cuts: list[str] = []

    class CuttingStore(RedisStore):
        async def commit(self, key: str, token: str, ttl: float) -> bool:
            ok = await super().commit(key, token, ttl)
            if not cuts:
                cuts.append(key)
                proxy.cut()  # both connections reset: the ack below never reaches the broker
            return ok

        async def claim(self, key: str, token: str, ttl: float) -> tuple[Claim, float]:
            r.incr(f"{prefix}claims")
            return await super().claim(key, token, ttl)

    class Charge(Worker):
        queue = q
        idempotent = True
        idempotency_store = CuttingStore(REDIS, prefix=prefix)
        handler_timeout = 4.0

        async def handle(self, body: dict[str, Any]) -> None:
            await asyncio.to_thread(r.incr, f"{prefix}effects:{body['id']}")

    try:
        proxied = settings.model_copy(update={"url": SecretStr(proxy.url())})
        runner = Runner([Charge], settings=proxied, handle_signals=False)
        async with running(runner):
            await asyncio.to_thread(
                publish_raw, url, settings.exchange, q, b'{"id": "m3"}', message_id="m3"
            )
            rt = runner.runtimes[0]
            await wait_for(lambda: runner.reconnects >= 1, 30, "the reconnect")
            await wait_for(lambda: rt.duplicates == 1, 30, "the duplicate")
            await _until(lambda: ready_count(url, q) == 0 and _unacked(url, q) == 0, 30, "ack")
    finally:
        proxy.close()
    assert cuts, "the connection was never cut"
    assert _int(r, f"{prefix}effects:m3") == 1
    assert _int(r, f"{prefix}claims") == 2


def _consumers(url: str, queue: str) -> bool:
    from .workers_fixture import consumer_count

    try:
        return consumer_count(url, queue) > 0
    except Exception:  # not declared yet
        return False


def _unacked(url: str, queue: str) -> int:
    from .workers_fixture import queue_stats

    return queue_stats(queue)[1]
