"""``workerkit run --processes N``: one supervising parent, N worker processes.

The parent runs no handler and opens no AMQP connection. It starts N children, each
``python -m workerkit run TARGET...`` exactly as a single-process deployment would run, and then:

* **restarts a child that crashes** (exit code not 0, a signal such as kill -9 or the OOM
  killer) after a jittered exponential backoff, with a log line, without touching the others;
* **stops the whole group** when a child exits with a configuration code (2 bad settings or
  targets, 3 topology clash, 4 refused credentials), or crashes ``MAX_STARTUP_CRASHES`` times in
  a row without ever becoming healthy: restarting cannot fix those, so the parent exits with the
  child's code (1 for a crash loop) instead of looping;
* **drains on SIGTERM/SIGINT**: the signal is passed to every child, each drains within
  ``shutdown_grace`` as usual, and the parent exits 0 once they all did. A child still running
  ``KILL_MARGIN`` seconds past the grace period is killed (exit 1). A second signal escalates:
  every child is killed at once (their unacked messages go back to the broker) and the exit is 1;
* **reports health and readiness for the group**: each child writes one status digit to a pipe
  every ``STATUS_INTERVAL`` seconds (:func:`status_digit`: healthy, ready, both or neither); the
  group is healthy (``/health``) only while every child is alive and its last status, no older
  than ``STATUS_STALE`` seconds, says healthy, and ready (``/ready``) only while every child
  says ready the same way and the group is not draining. A child whose pipe breaks (the parent
  was killed) drains and exits on its own.

Metrics: the parent gives its children ``PROMETHEUS_MULTIPROC_DIR``, a fresh directory per run
(removed at exit), so prometheus_client's multiprocess mode can merge every child's samples,
and, when it serves ``/metrics`` (``--health-port``), tells them to record them
(``--child-metrics``); the files of a child that exits are marked dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .settings import Settings
from .signals import StopRequests

__all__ = ["Supervisor", "report_to_supervisor"]

log = logging.getLogger("workerkit.supervisor")

# Exit codes of `workerkit run` that restarting cannot fix (see cli.py).
FATAL_EXIT_CODES = {2: "bad configuration", 3: "topology clash", 4: "refused credentials"}
MAX_STARTUP_CRASHES = 5  # crashes in a row, never healthy in between, before the group stops
RESTART_DELAY = 0.5  # first restart backoff, doubled per consecutive crash
MAX_RESTART_DELAY = 30.0
STATUS_INTERVAL = 0.5  # how often a child reports its health
STATUS_STALE = 5.0  # a status older than this counts as unhealthy (a hung child)
KILL_MARGIN = 10.0  # seconds past the grace period before a draining child is killed
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class Child:
    """One worker process slot; the process in it is replaced on every restart."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    status_fd: int | None = None
    healthy: bool = False
    ready: bool = False
    seen_at: float = 0.0
    ever_healthy: bool = False
    silent: bool = False  # said to have stopped reporting (a hung child), until it reports
    crashes: int = 0  # consecutive crashes since it was last healthy
    done: bool = False  # exited 0 on its own (burst mode): not restarted
    waiter: asyncio.Task[int] | None = field(default=None, repr=False)


class Supervisor:
    """Starts ``processes`` children running ``command`` and keeps them running."""

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        grace: float,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = list(command)
        self.children = [Child(index) for index in range(processes)]
        self.grace = grace
        self.env = dict(os.environ if env is None else env)
        self.metrics_dir = ""
        self.exit_code: int | None = None
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._stop_requests = StopRequests()

    # -- health --------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        now = time.monotonic()
        return all(c.done or (self._reporting(c, now) and c.healthy) for c in self.children)

    @property
    def ready(self) -> bool:
        """Every child ready (consumers attached, publish path open) and the group not
        draining: a load balancer stops sending at once, not when the children notice."""
        if self._stop.is_set():
            return False
        now = time.monotonic()
        return all(c.done or (self._reporting(c, now) and c.ready) for c in self.children)

    @staticmethod
    def _reporting(child: Child, now: float) -> bool:
        """Alive, and its last status is recent (a hung child stops reporting)."""
        return (
            child.proc is not None
            and child.proc.returncode is None
            and now - child.seen_at < STATUS_STALE
        )

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> int:
        """Supervise until every child is done or the group is stopped; the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.metrics_dir = tempfile.mkdtemp(prefix="workerkit-metrics-")
        self.env[METRICS_ENV] = self.metrics_dir
        try:
            for child in self.children:
                await self._start(child)
            log.info("supervising %d worker processes", len(self.children))
            listening = asyncio.ensure_future(self._listen_for_silence())
            try:
                await self._watch()
            finally:
                listening.cancel()
            return await self._drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for child in self.children:
                self._close_pipe(child)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _listen_for_silence(self) -> None:
        """Say once when a live child stops reporting its status (hung, or stopped with
        SIGSTOP): the group's probes turn 503 then, and the log should say which child."""
        while True:
            await asyncio.sleep(1.0)
            self.notice_silence(time.monotonic())

    def notice_silence(self, now: float) -> None:
        for child in self.children:
            if (
                child.silent
                or child.done
                or child.proc is None
                or child.proc.returncode is not None
            ):
                continue
            if now - child.seen_at >= STATUS_STALE:
                child.silent = True
                log.warning(
                    "worker process %d (pid %d) has not reported its status for %.0fs: counted"
                    " unhealthy (hung, or stopped?)",
                    child.index,
                    child.proc.pid,
                    now - child.seen_at,
                )

    async def _watch(self) -> None:
        """Restart crashed children until stopped, a fatal exit, or every child is done."""
        restarts: dict[int, asyncio.Task[None]] = {}
        while not self._stop.is_set():
            waits = {c.waiter for c in self.children if c.waiter is not None}
            # A restart adds a waiter; _changed wakes this wait to include it.
            self._changed.clear()
            wakers = {
                asyncio.ensure_future(self._stop.wait()),
                asyncio.ensure_future(self._changed.wait()),
            }
            done, _ = await asyncio.wait(waits | wakers, return_when=asyncio.FIRST_COMPLETED)
            for waker in wakers:
                waker.cancel()
            for child in self.children:
                if child.waiter is not None and child.waiter in done:
                    child.waiter = None
                    self._on_exit(child, restarts)
            if all(c.done for c in self.children):
                self.exit_code = 0
                self._stop.set()
        for task in restarts.values():
            task.cancel()

    def _on_exit(self, child: Child, restarts: dict[int, asyncio.Task[None]]) -> None:
        assert child.proc is not None
        code = child.proc.returncode
        assert code is not None
        self._close_pipe(child)
        self._forget_metrics(child.proc.pid)
        if self._stop.is_set():
            return
        what = _describe_exit(code)
        if code == 0:
            log.info("worker process %d (pid %d) finished", child.index, child.proc.pid)
            child.done = True
            return
        if code in FATAL_EXIT_CODES:
            log.error(
                "worker process %d %s (%s): stopping the group",
                child.index,
                what,
                FATAL_EXIT_CODES[code],
            )
            self._fail(code)
            return
        child.crashes = 1 if child.ever_healthy else child.crashes + 1
        child.ever_healthy = False
        if child.crashes >= MAX_STARTUP_CRASHES:
            log.error(
                "worker process %d %s, %d times in a row before it ever consumed: stopping the"
                " group",
                child.index,
                what,
                child.crashes,
            )
            self._fail(1)
            return
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (child.crashes - 1))
        delay *= 0.5 + random.random()  # jitter: crashed siblings do not restart in lockstep
        log.warning(
            "worker process %d (pid %d) %s; restarting in %.1fs",
            child.index,
            child.proc.pid,
            what,
            delay,
        )
        restarts[child.index] = asyncio.ensure_future(self._restart_later(child, delay))

    async def _restart_later(self, child: Child, delay: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)
        if not self._stop.is_set():
            await self._start(child)
            self._changed.set()  # wake _watch: a new waiter to wait on

    def _fail(self, code: int) -> None:
        self.exit_code = code
        self._stop.set()

    async def _start(self, child: Child) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        try:
            child.proc = await asyncio.create_subprocess_exec(
                *self.command,
                "--status-fd",
                str(write_fd),
                "--child-index",  # its log lines say which child wrote them
                str(child.index),
                env=self.env,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        child.status_fd = read_fd
        child.healthy = child.ready = False
        child.seen_at = time.monotonic()
        asyncio.get_running_loop().add_reader(read_fd, self._read_status, child)
        child.waiter = asyncio.ensure_future(child.proc.wait())
        log.info("worker process %d started (pid %d)", child.index, child.proc.pid)

    def _read_status(self, child: Child) -> None:
        fd = child.status_fd
        if fd is None:
            return
        try:
            data = os.read(fd, 256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the child closed its end: it is exiting
            self._close_pipe(child)
            return
        child.healthy, child.ready = read_status_digit(data[-1:])
        child.seen_at = time.monotonic()
        if child.silent:
            child.silent = False
            log.info("worker process %d reports again", child.index)
        if child.healthy and not child.ever_healthy:
            child.ever_healthy = True
            child.crashes = 0

    def _close_pipe(self, child: Child) -> None:
        if child.status_fd is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(child.status_fd)
            os.close(child.status_fd)
            child.status_fd = None
        child.healthy = child.ready = False

    # -- stopping ------------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals) -> None:
        request = self._stop_requests.count(sig)
        if request is None:
            return  # the same signal twice at once: a process-group kill (see signals.py)
        if request == 1:
            log.info("received %s; draining %d worker processes", sig.name, self._running())
            if self.exit_code is None:
                self.exit_code = 0
            self._stop.set()
        else:
            log.warning("received %s again; killing every worker process now", sig.name)
            self.exit_code = 1
            self._send_all(signal.SIGKILL)

    def _running(self) -> int:
        return sum(1 for c in self.children if c.proc is not None and c.proc.returncode is None)

    def _send_all(self, sig: signal.Signals) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

    async def _drain(self) -> int:
        """SIGTERM every child, wait out the grace period (plus a margin), kill stragglers."""
        self._send_all(signal.SIGTERM)
        procs = [c.proc for c in self.children if c.proc is not None]
        waits = [asyncio.ensure_future(p.wait()) for p in procs if p.returncode is None]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=self.grace + KILL_MARGIN)
            if pending:
                log.error(
                    "%d worker process(es) still running %.0fs after the grace period; killing",
                    len(pending),
                    KILL_MARGIN,
                )
                self._send_all(signal.SIGKILL)
                await asyncio.wait(pending, timeout=10)
                self.exit_code = 1
        for child in self.children:
            if child.proc is not None:
                self._forget_metrics(child.proc.pid)
        code = self.exit_code if self.exit_code is not None else 0
        # A child that failed its own drain is an error; one that SIGTERM ended before it had
        # installed its handlers (still starting, nothing consumed) is not.
        clean = (0, None, -signal.SIGTERM)
        if code == 0 and any(p.returncode not in clean for p in procs if p is not None):
            code = 1
        log.info("all worker processes stopped; exit %d", code)
        return code

    def _forget_metrics(self, pid: int) -> None:
        """A gone child's live gauges (in flight) leave the sum; its counters stay."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def child_command(targets: Sequence[str], options: Mapping[str, object]) -> list[str]:
    """``python -m workerkit run TARGET... --option value...`` for one child process."""
    command = [sys.executable, "-m", "workerkit", "run", *targets, "--processes", "1"]
    for name, value in options.items():
        if value is True:
            command.append(name)
        elif value is not None and value is not False:
            command += [name, str(value)]
    return command


def status_digit(healthy: bool, ready: bool) -> bytes:
    """A child's status as one ASCII digit: ``0`` neither, ``1`` healthy, ``2`` ready,
    ``3`` both."""
    return b"0123"[healthy + 2 * ready :][:1]


def read_status_digit(digit: bytes) -> tuple[bool, bool]:
    """(healthy, ready) from :func:`status_digit`; anything else is neither."""
    value = digit[0] - 0x30 if len(digit) == 1 else -1
    if not 0 <= value <= 3:
        return False, False
    return bool(value & 1), bool(value & 2)


async def report_to_supervisor(
    fd: int,
    is_healthy: Callable[[], bool],
    stop: Callable[[], None],
    is_ready: Callable[[], bool] | None = None,
) -> None:
    """In a child: write its status (:func:`status_digit`) to ``fd`` every STATUS_INTERVAL
    seconds.

    ``is_healthy``, ``stop`` and ``is_ready`` are the runner's ``healthy`` getter, ``stop`` and
    ``is_ready`` methods (without ``is_ready``, ready means healthy). When the pipe breaks the
    parent is gone (killed): the child drains and exits rather than run orphaned.
    """
    os.set_blocking(fd, False)
    ready = is_ready if is_ready is not None else is_healthy
    try:
        while True:
            try:
                os.write(fd, status_digit(is_healthy(), ready()))
            except BlockingIOError:
                pass  # the parent is slow to read; the next byte will do
            except (BrokenPipeError, OSError):
                log.error("the supervising process is gone; draining")
                stop()
                return
            await asyncio.sleep(STATUS_INTERVAL)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


async def supervise(
    targets: Sequence[str],
    options: Mapping[str, object],
    processes: int,
    settings: Settings,
    health_host: str,
    health_port: int | None,
) -> int:
    """``workerkit run --processes N``: the exit code of the group.

    Children get the parent's environment with the parent's URL (so ``--url`` reaches them
    without appearing in their command line) and ``WORKERKIT_PROCESSES=1``; with a health port,
    ``--child-metrics`` so that they record what the parent's ``/metrics`` serves.
    """
    from .cli import health_endpoint

    env = dict(os.environ)
    env["WORKERKIT_URL"] = settings.url.get_secret_value()
    env["WORKERKIT_PROCESSES"] = "1"
    if health_port is not None:
        options = {**options, "--child-metrics": True}
    supervisor = Supervisor(
        child_command(targets, options), processes, grace=settings.shutdown_grace, env=env
    )
    from .metrics import render

    async with health_endpoint(
        lambda: supervisor.healthy,
        health_host,
        health_port,
        is_ready=lambda: supervisor.ready,
        metrics=lambda: render(supervisor.metrics_dir or None),
    ):
        return await supervisor.run()
