"""The runner: connects, declares, starts each worker's consumer, recovers, drains on shutdown.

Per-message work lives in ``consumer.py`` (WorkerRuntime) and ``acks.py`` (AckTracker); this
module is the lifecycle around them: connect with jittered retries, prove consumers are back
after a reconnect, stop consuming on SIGTERM/SIGINT, let in-flight handlers finish within the
grace period, exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from .consumer import WorkerRuntime
from .errors import AccessRefused, ConfigurationError, TopologyError, WorkerkitError
from .message import Outgoing
from .retry import reconnecting
from .settings import Settings, load_settings
from .topology import Topology
from .transport.base import Channel, Connection, Transport
from .worker import Worker

__all__ = ["Runner", "exit_past_stuck_handlers", "run"]

log = logging.getLogger("workerkit.runner")


class Runner:
    """Runs workers until stopped: ``await Runner([SendReceipt]).run()``.

    ``burst=True`` stops once every queue is empty and nothing is in flight (for tests and
    batch jobs).
    """

    def __init__(
        self,
        workers: Sequence[type[Worker]],
        *,
        settings: Settings | None = None,
        url: str | None = None,
        transport: Transport | None = None,
        prefetch: int | None = None,
        concurrency: int | None = None,
        burst: bool = False,
        handle_signals: bool = True,
    ) -> None:
        if not workers:
            raise ConfigurationError("no workers to run")
        self.settings = load_settings(settings, url)
        if transport is None:
            from .transport.pika_asyncio import PikaTransport

            transport = PikaTransport()
        self.transport = transport
        self.topology = Topology(self.settings)
        self.prefetch = prefetch
        self.concurrency = concurrency
        self.burst = burst
        self.handle_signals = handle_signals
        self.worker_classes = list(dict.fromkeys(workers))
        self.runtimes: list[WorkerRuntime] = []
        self._consume_conn: Connection | None = None
        self._publish_conn: Connection | None = None
        self._publish_channel: Channel | None = None
        self._reopening = asyncio.Lock()
        self._stop: asyncio.Event | None = None
        self._lost: asyncio.Event | None = None
        self.ready: asyncio.Event | None = None
        self.reconnects = 0
        self.last_recovery: float | None = None

    # -- public ------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True while every worker has a live consumer."""
        return bool(self.runtimes) and all(rt.consuming for rt in self.runtimes)

    def stop(self) -> None:
        """Ask for a graceful shutdown (safe to call from a signal handler on the loop)."""
        if self._stop is not None:
            self._stop.set()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ready is None:
            if time.monotonic() > deadline:
                raise TimeoutError("runner did not start")
            await asyncio.sleep(0.01)
        await asyncio.wait_for(self.ready.wait(), max(0.0, deadline - time.monotonic()))

    async def run(self) -> None:
        """Consume until stop() or SIGTERM/SIGINT, then drain; raises on fatal configuration."""
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self.ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._warn_about_timeouts()
        installed = self._install_signals(loop) if self.handle_signals else []
        try:
            self.runtimes = [WorkerRuntime(cls, self) for cls in self.worker_classes]
            await self._connect_with_retries()
            if self._stop.is_set():
                return  # stopped while the broker was unreachable: nothing to drain
            for rt in self.runtimes:
                await rt.instance.setup()
                rt.start_slots()
            self.ready.set()
            log.info(
                "consuming from %s",
                ", ".join(rt.queue for rt in self.runtimes),
            )
            await self._supervise()
        finally:
            await self._shutdown()
            for sig in installed:
                loop.remove_signal_handler(sig)

    # -- connection management ---------------------------------------------------------------

    def connection_lost(self, error: Exception) -> None:
        if self._stop is not None and self._stop.is_set():
            return
        for rt in self.runtimes:
            if rt.consuming or rt.tracker is not None:
                rt.detach()
        log.warning("connection lost: %s", error)
        if self._lost is not None:
            self._lost.set()

    async def _connect(self) -> None:
        self._consume_conn = await self.transport.connect(
            self.settings, name="workerkit-consume", on_lost=self.connection_lost
        )
        self._publish_conn = await self.transport.connect(
            self.settings, name="workerkit-publish", on_lost=self.connection_lost
        )
        self._publish_channel = await self._publish_conn.channel(confirms=True)
        await self.topology.declare_exchanges(self._publish_channel)
        for rt in self.runtimes:
            await rt.attach(self._consume_conn)

    async def _close_connections(self) -> None:
        for conn in (self._consume_conn, self._publish_conn):
            if conn is not None:
                with contextlib.suppress(WorkerkitError):
                    await conn.close()
        self._consume_conn = self._publish_conn = None
        self._publish_channel = None

    async def _connect_with_retries(self) -> None:
        def before_sleep(state: Any) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("cannot connect (%s); retrying", exc)

        async for attempt in reconnecting(
            max_delay=self.settings.reconnect_max_delay,
            before_sleep=before_sleep,
            sleep=self._pause_unless_stopped,
        ):
            with attempt:
                if self._stop is not None and self._stop.is_set():
                    return
                try:
                    await self._connect()
                except (AccessRefused, TopologyError, ConfigurationError):
                    await self._close_connections()
                    raise
                except BaseException:
                    for rt in self.runtimes:
                        rt.detach()
                    await self._close_connections()
                    raise

    async def _pause_unless_stopped(self, seconds: float) -> None:
        """Backoff between connection attempts that SIGTERM cuts short (a stop must not wait
        out a 30 s backoff while the broker is down)."""
        assert self._stop is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _supervise(self) -> None:
        assert self._stop is not None and self._lost is not None
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                lost_wait = asyncio.ensure_future(self._lost.wait())
                waits: set[asyncio.Future[Any]] = {stop_wait, lost_wait}
                if self.burst:
                    waits.add(asyncio.ensure_future(self._burst_done()))
                _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for fut in pending - {stop_wait}:
                    fut.cancel()
                if self.burst and not self._stop.is_set() and not self._lost.is_set():
                    self._stop.set()
                    break
                if self._lost.is_set() and not self._stop.is_set():
                    await self._recover()
        finally:
            stop_wait.cancel()

    async def _recover(self) -> None:
        assert self._lost is not None
        started = time.monotonic()
        self._lost.clear()
        for rt in self.runtimes:
            rt.detach()
        await self._close_connections()
        await self._connect_with_retries()
        if self._stop is not None and self._stop.is_set():
            return
        self._lost.clear()
        self.reconnects += 1
        self.last_recovery = time.monotonic() - started
        log.info("reconnected; consumers are back after %.2fs", self.last_recovery)

    async def _burst_done(self) -> None:
        """Returns when every queue is empty and nothing is in flight."""
        quiet = 0
        while True:
            await asyncio.sleep(0.05)
            if any(rt.in_flight or rt.deque for rt in self.runtimes) or not self.healthy:
                quiet = 0
                continue
            quiet = quiet + 1 if await self._queues_empty() else 0
            if quiet >= 2:
                return

    async def _queues_empty(self) -> bool:
        """Whether every work queue is empty; False while a channel is down (not known yet)."""
        for rt in self.runtimes:
            channel = rt.channel
            if channel is None:
                return False
            try:
                ready, _ = await channel.queue_state(rt.queue)
            except WorkerkitError:
                return False  # the connection went away meanwhile; recovery will follow
            if ready:
                return False
        return True

    async def publish(self, message: Outgoing) -> None:
        """Confirmed publish on the runner's publish channel (retry and dead-letter copies)."""
        channel = self._publish_channel
        conn = self._publish_conn
        if (channel is None or not channel.is_open) and conn is not None and conn.is_open:
            # The transport closes a channel the broker nacked on: open a fresh one.
            async with self._reopening:
                channel = self._publish_channel
                if channel is None or not channel.is_open:
                    channel = self._publish_channel = await conn.channel(confirms=True)
        if channel is None or not channel.is_open:
            raise WorkerkitError("publish channel is not open")
        await channel.publish(message, mandatory=True, timeout=self.settings.publish_timeout)

    # -- shutdown ----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        for rt in self.runtimes:
            await rt.stop_consuming()
        grace = self.settings.shutdown_grace
        slots = [slot.task for rt in self.runtimes for slot in rt.slots]
        if slots:
            _done, pending = await asyncio.wait(slots, timeout=grace)
            if pending:
                busy = sum(rt.in_flight for rt in self.runtimes)
                log.warning(
                    "%d handler(s) still running after the %.0fs grace period; leaving their"
                    " messages to the broker",
                    busy,
                    grace,
                )
                for rt in self.runtimes:
                    if rt.tracker is not None:
                        rt.tracker.flush()
                        rt.tracker.dead = True
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1)
        for rt in self.runtimes:
            if rt.watchdog is not None:
                rt.watchdog.cancel()
            if rt.tracker is not None:
                rt.tracker.close()
            if rt.channel is not None:
                with contextlib.suppress(WorkerkitError):
                    await rt.channel.close()
            try:
                await rt.instance.teardown()
            except Exception:
                log.exception("teardown failed", extra=rt.log_extra)
            if rt.pool is not None:
                rt.pool.shutdown(wait=False, cancel_futures=True)
        await self._close_connections()
        log.info("stopped")

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or not supported: the caller stops us
        return installed

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s; draining", sig.name)
        self.stop()

    def _warn_about_timeouts(self) -> None:
        limit = self.settings.broker_consumer_timeout
        for cls in self.worker_classes:
            timeout = cls.handler_timeout or self.settings.handler_timeout
            if timeout is not None and timeout >= limit * 0.9:
                log.warning(
                    "%s: handler_timeout %.0fs is not safely below the broker's consumer_timeout"
                    " %.0fs; the broker would close the channel first",
                    cls.describe(),
                    timeout,
                    limit,
                )


def run(
    workers: Sequence[type[Worker]],
    *,
    settings: Settings | None = None,
    url: str | None = None,
    **kwargs: Any,
) -> None:
    """Run workers in a fresh event loop until SIGTERM/SIGINT (blocking)."""
    runner = Runner(workers, settings=settings, url=url, **kwargs)
    asyncio.run(runner.run())
    exit_past_stuck_handlers()


def exit_past_stuck_handlers(join_for: float = 0.5) -> None:
    """Exit now if plain ``def`` handlers outlived the grace period.

    Interpreter exit joins pool threads, so one stuck handler would keep the process alive after
    SIGTERM; its message is unacked and already left to the broker, so nothing is lost.
    """
    deadline = time.monotonic() + join_for
    for thread in _handler_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = _handler_threads()
    if not stuck:
        return
    log.warning("%d handler thread(s) still running at exit; exiting without them", len(stuck))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _handler_threads() -> list[threading.Thread]:
    # Pool threads are non-daemon; the Publisher's I/O thread is a daemon and never blocks exit.
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("workerkit-") and not t.daemon and t.is_alive()
    ]
