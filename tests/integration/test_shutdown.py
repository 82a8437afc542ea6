"""SIGTERM to a real worker process: drain in-flight handlers, leave the rest to the broker."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from workerkit import Settings
from workerkit.testing import wait_for

from .workers_fixture import (
    consumer_count,
    get_all,
    log_lines,
    publish_raw,
    ready_count,
    start_worker,
)

pytestmark = pytest.mark.integration


def _ready(url: str, queue: str) -> int:
    try:
        return ready_count(url, queue)
    except Exception:  # not declared yet
        return -1


async def _start(
    settings: Settings, q: str, logfile: Path, mode: str, *options: str
) -> subprocess.Popen[bytes]:
    url = settings.url.get_secret_value()
    proc = start_worker(mode, q, url, settings.exchange, logfile, *options)
    # Consuming means the queue and its bindings are declared: publishes will route.
    await wait_for(
        lambda: consumer_count(url, q) >= 1 or proc.poll() is not None, 15, "the consumer"
    )
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


async def _stop(proc: subprocess.Popen[bytes], within: float) -> tuple[int, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), within)
    except asyncio.TimeoutError:
        proc.kill()
        raise AssertionError(f"the worker did not exit within {within}s of SIGTERM") from None
    return code, time.monotonic() - started


async def test_sigterm_finishes_in_flight_handlers_and_leaves_the_rest(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], tmp_path: Path
) -> None:
    q = unique("drain")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    logfile = tmp_path / "worker.log"
    options = ("--sleep", "2", "--concurrency", "2", "--prefetch", "5", "--grace", "10")
    proc = await _start(settings, q, logfile, "slow", *options)
    for n in range(5):
        await asyncio.to_thread(publish_raw, url, settings.exchange, q, f'"m{n}"'.encode())
    await wait_for(lambda: len(log_lines(logfile, "start")) == 2, 10, "two handlers running")
    code, took = await _stop(proc, 10)
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    started, done = log_lines(logfile, "start"), log_lines(logfile, "done")
    assert sorted(done) == sorted(started) and len(started) == 2, (started, done)
    # The two finished ones were acked; the three prefetched but unstarted are ready again.
    assert await asyncio.to_thread(ready_count, url, q) == 3
    left = await asyncio.to_thread(get_all, url, q)
    assert not {m.body.decode() for m in left} & set(done), "a finished message came back"
    print(f"drained 2 in-flight handlers, exited {took:.2f}s after SIGTERM")


@pytest.mark.parametrize("mode", ["slow", "slow-sync"])
async def test_handlers_past_the_grace_period_are_left_to_the_broker(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], tmp_path: Path, mode: str
) -> None:
    q = unique(f"grace-{mode}")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    logfile = tmp_path / "worker.log"
    options = ("--sleep", "30", "--concurrency", "2", "--grace", "0.5")
    proc = await _start(settings, q, logfile, mode, *options)
    for n in range(2):
        await asyncio.to_thread(publish_raw, url, settings.exchange, q, f'"m{n}"'.encode())
    await wait_for(lambda: len(log_lines(logfile, "start")) == 2, 10, "two handlers running")
    code, took = await _stop(proc, 8)
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    assert log_lines(logfile, "done") == []
    left = await asyncio.to_thread(get_all, url, q)
    assert sorted(m.body for m in left) == [b'"m0"', b'"m1"'], "a message was lost"
    assert all(m.redelivered for m in left)
    print(f"{mode}: exited {took:.2f}s after SIGTERM with 2 handlers past a 0.5 s grace")
