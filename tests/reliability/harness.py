"""Worker subprocesses, a background publishing load and deadline waits for the scenarios."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import PrivateBroker
from oracle import Oracle, read_finished_file

import workerkit

HERE = Path(__file__).parent
EXCHANGE = "wkr"


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.05
) -> None:
    """Poll ``condition`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def worker_env(url: str, **settings: Any) -> dict[str, str]:
    """Environment for a worker process: WORKERKIT_* settings, nothing inherited that could leak."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WORKERKIT_")}
    env["WORKERKIT_URL"] = url
    env["WORKERKIT_EXCHANGE"] = EXCHANGE
    for key, value in {"reconnect_max_delay": 1.0, "connect_timeout": 5.0, **settings}.items():
        env[f"WORKERKIT_{key.upper()}"] = str(value)
    return env


class WorkerProcess:
    """``worker_proc.py`` in a subprocess; several may share one out dir (one "finished" file)."""

    def __init__(
        self,
        queue: str,
        url: str,
        out_dir: Path,
        mode: str = "async",
        queue_type: str = "quorum",
        **settings: Any,
    ) -> None:
        self.queue = queue
        self.out_dir = out_dir
        self.stats_path = out_dir / f"stats-{uuid.uuid4().hex[:6]}"
        env = worker_env(url, **settings)
        env["WORKERKIT_TEST_MODE"] = mode
        env["WORKERKIT_TEST_QUEUE_TYPE"] = queue_type
        self.log = open(out_dir / f"log-{self.stats_path.name}.txt", "wb")  # noqa: SIM115
        run_dir = self.stats_path.with_suffix(".d")
        run_dir.mkdir()
        # The finished file is shared; the stats file is per process.
        (run_dir / "finished").symlink_to(out_dir / "finished")
        (run_dir / "attempts").symlink_to(out_dir / "attempts")
        self.run_dir = run_dir
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "worker_proc.py"), queue, str(run_dir)],
            env=env,
            cwd=run_dir,  # no stray .env file gets read
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    # -- state -------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.run_dir / "stats.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    @property
    def healthy(self) -> bool:
        return bool(self.stats().get("healthy")) and self.proc.poll() is None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_until(self._healthy_or_dead, timeout, f"worker on {self.queue} to consume")
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output()}")

    def _healthy_or_dead(self) -> bool:
        return self.healthy or self.proc.poll() is not None

    def recovered_after(self, fault_at: float, timeout: float = 60.0) -> float:
        """Seconds from ``fault_at`` (time.time()) until the consumer was back after it."""

        def back() -> float | None:
            later = [t for t in self.stats().get("back_at", []) if t > fault_at]
            return later[0] - fault_at if later else None

        wait_until(lambda: back() is not None or self.proc.poll() is not None, timeout, "recovery")
        value = back()
        if value is None:
            raise AssertionError(f"worker died instead of recovering:\n{self.output()}")
        return value

    def health_status(self, timeout: float = 5.0) -> int | None:
        """The HTTP status of the process's ``GET /health`` (None when nobody answers)."""
        port = self.stats().get("health_port")
        if not port:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, ValueError):
            return None

    def output(self) -> str:
        self.log.flush()
        return (self.out_dir / f"log-{self.stats_path.name}.txt").read_text(errors="replace")[
            -4000:
        ]

    # -- faults ------------------------------------------------------------------------------

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


class Load:
    """Publishes ``count`` messages on a thread with workerkit.Publisher, recording the oracle.

    ``rate`` paces the stream so that faults land in the middle of it.
    """

    def __init__(
        self,
        oracle: Oracle,
        url: str,
        queue: str,
        count: int,
        *,
        rate: float = 200.0,
        body: Callable[[int], dict[str, Any]] = lambda n: {"n": n},
        publish_timeout: float = 5.0,
        threads: int = 2,
        prefix: str = "m",
        tls_ca_file: str | None = None,
    ) -> None:
        self.oracle = oracle
        self.prefix = prefix
        self.queue = queue
        self.count = count
        self.rate = rate
        self.body = body
        self.errors: list[BaseException] = []
        self.failed_after: list[float] = []  # seconds each failed publish took to raise
        self.settings = workerkit.Settings(
            url=url,
            exchange=EXCHANGE,
            publish_timeout=publish_timeout,
            connect_timeout=2.0,
            tls_ca_file=tls_ca_file,
        )
        self.publisher = self._make_publisher()
        self._next = 0
        self._lock = threading.Lock()
        self._started = 0.0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> Load:
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def _make_publisher(self) -> Any:
        return workerkit.Publisher(settings=self.settings)

    def _claim(self) -> int | None:
        with self._lock:
            if self._next >= self.count:
                return None
            n = self._next
            self._next += 1
            return n

    def _run(self) -> None:
        while (n := self._claim()) is not None:
            due = self._started + n / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            message_id = f"{self.prefix}{n}"
            self.oracle.attempt(message_id)
            began = time.monotonic()
            try:
                self.publisher.publish(self.queue, self.body(n), message_id=message_id)
            except Exception as exc:
                self._failed(message_id, exc, began)
            else:
                self.oracle.confirm(message_id)

    def _failed(self, message_id: str, exc: BaseException, began: float) -> None:
        # Anything outside PublishError escaping a publish is a contract breach: the tests
        # check foreign_errors().
        self.oracle.fail(message_id)
        self.errors.append(exc)
        self.failed_after.append(time.monotonic() - began)

    def stop(self) -> None:
        """Publish nothing more than what was claimed so far (``join`` waits for those)."""
        with self._lock:
            self.count = self._next

    @property
    def published(self) -> int:
        return self._next

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), "publisher thread did not finish"
        self.publisher.close()

    def foreign_errors(self) -> list[BaseException]:
        """Errors outside the PublishError tree (must be none)."""
        return [e for e in self.errors if not isinstance(e, workerkit.PublishError)]


class AsyncLoad(Load):
    """The same paced stream through ``workerkit.AsyncPublisher``: one event loop on a thread,
    ``threads`` concurrent publishing tasks sharing one publisher."""

    def _make_publisher(self) -> Any:
        return None  # made on the load's own loop

    def __init__(self, *args: Any, threads: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, threads=threads, **kwargs)
        self._tasks = threads
        self._threads = [threading.Thread(target=self._loop, daemon=True)]

    def _loop(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        publisher = workerkit.AsyncPublisher(settings=self.settings)
        try:
            await asyncio.gather(*(self._task(publisher) for _ in range(self._tasks)))
        finally:
            await publisher.close()

    async def _task(self, publisher: workerkit.AsyncPublisher) -> None:
        while (n := self._claim()) is not None:
            delay = self._started + n / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            message_id = f"{self.prefix}{n}"
            self.oracle.attempt(message_id)
            began = time.monotonic()
            try:
                await publisher.publish(self.queue, self.body(n), message_id=message_id)
            except Exception as exc:
                self._failed(message_id, exc, began)
            else:
                self.oracle.confirm(message_id)

    def join(self, timeout: float = 120.0) -> None:
        self._threads[0].join(timeout)
        assert not self._threads[0].is_alive(), "async publisher thread did not finish"


def collect(oracle: Oracle, out_dir: Path) -> None:
    """Refresh the oracle's finished counts from the shared finished file."""
    oracle.finished.clear()
    oracle.finish_many(read_finished_file(out_dir / "finished"))


def settle(oracle: Oracle, url: str, queue: str, out_dir: Path, timeout: float = 60.0) -> None:
    """Wait until every confirmed message is finished or dead-lettered (deadline)."""

    def done() -> bool:
        collect(oracle, out_dir)
        if oracle.lost:
            oracle.read_dlq(url, queue)
        return not oracle.lost

    # On timeout the oracle's check reports what is missing, with ids.
    with contextlib.suppress(AssertionError):
        wait_until(done, timeout, "every confirmed message to be finished or dead-lettered", 0.2)


def set_alarm(broker: PrivateBroker, raised: bool) -> None:
    """Raise or clear the node's memory alarm and wait (30 s deadline) until it is so, in one
    ``rabbitmqctl eval``: each rabbitmqctl call boots a VM, seconds on a loaded machine."""
    watermark, want = ("0.0000001", "true") if raised else ("0.8", "false")
    result = broker.ctl(
        "eval",
        f"vm_memory_monitor:set_vm_memory_high_watermark({watermark}),"
        " Raised = fun() -> lists:any(fun({{resource_limit, memory, _}, _}) -> true;"
        " (_) -> false end, rabbit_alarm:get_alarms()) end,"
        f" Wait = fun W(0) -> timeout; W(N) -> case Raised() of {want} -> ok;"
        " _ -> timer:sleep(100), W(N - 1) end end,"
        " Wait(300).",
        timeout=60,
    )
    if result.stdout.strip() != "ok":
        raise RuntimeError(f"memory alarm not {'raised' if raised else 'cleared'} in 30 s")


def make_out_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="wkr-out-"))
