"""Helpers for the multi-process tests: a supervised group in a subprocess, its log, its output."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest

ROOT = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every 50 ms; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Line:
    kind: str
    pid: int
    n: int
    at: float


class Group:
    """``workerkit run tests.scaleout.app --processes N`` in a subprocess."""

    def __init__(
        self, url: str, queue: str, tmp: Path, processes: int, *args: str, **env: str
    ) -> None:
        self.out = tmp / "out.txt"
        self.log_path = tmp / "group.log"
        self.health_port = free_port()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
        full_env |= {
            "WORKERKIT_URL": url,
            "WORKERKIT_EXCHANGE": "wkt",
            "WORKERKIT_SHUTDOWN_GRACE": "10",
            "WORKERKIT_RECONNECT_MAX_DELAY": "1",
            "WORKERKIT_TEST_QUEUE": queue,
            "WORKERKIT_TEST_OUT": str(self.out),
            **env,
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        command = [sys.executable, "-m", "workerkit", "run", "tests.scaleout.app"]
        command += ["--processes", str(processes), "--health-port", str(self.health_port)]
        command += ["--health-host", "127.0.0.1", *args]
        # A session of its own: a test may signal the whole process group, as a terminal does.
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def health(self) -> int | None:
        return self.get("/health")[0]

    def get(self, path: str) -> tuple[int | None, str]:
        """(status, body) of ``GET path`` on the group's health port; (None, "") if refused."""
        url = f"http://127.0.0.1:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return int(reply.status), reply.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code), exc.read().decode()
        except OSError:
            return None, ""

    def wait_healthy(self, timeout: float = 60.0) -> None:
        wait_until(
            lambda: self.health() == 200 or self.proc.poll() is not None,
            timeout,
            "the group to be healthy",
        )
        assert self.proc.poll() is None, f"group exited {self.proc.returncode}:\n{self.log()}"

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except FileNotFoundError:
            return []

    def lines(self) -> list[Line]:
        if not self.out.exists():
            return []
        found = []
        for raw in self.out.read_text().splitlines():
            kind, pid, n, at = raw.split()
            found.append(Line(kind, int(pid), int(n), float(at)))
        return found

    def done(self) -> set[int]:
        return {line.n for line in self.lines() if line.kind == "done"}

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        pids = self.children()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:  # orphans of a killed parent drain on their own; do not wait for them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Callable[..., Group]]:
    started: list[Group] = []

    def start(url: str, queue: str, processes: int, *args: str, **env: str) -> Group:
        g = Group(url, queue, tmp_path, processes, *args, **env)
        started.append(g)
        return g

    yield start
    for g in started:
        g.close()


def publish_tasks(url: str, exchange: str, queue: str, bodies: list[bytes]) -> None:
    """Confirmed publishes straight to the queue (raw pika: the broker's own view)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(
                "",
                queue,
                body,
                pika.BasicProperties(content_type="application/json", delivery_mode=2),
                mandatory=True,
            )
    finally:
        conn.close()


def queue_depth(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ok = conn.channel().queue_declare(queue, passive=True)
        return int(ok.method.message_count)
    finally:
        conn.close()


def delete_queues(url: str, *names: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        for name in names:
            channel.queue_delete(name)
    finally:
        conn.close()
