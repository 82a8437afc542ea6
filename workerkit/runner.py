"""The runner: connects, declares, starts each worker's consumer, recovers, drains on shutdown.

Per-message work lives in ``runtime.py`` (WorkerRuntime), ``decision.py`` and ``acks.py``;
this module is the lifecycle around them: connect with jittered retries, prove consumers are back
after a reconnect, keep the publish path open, restart a slot that died, stop consuming on
SIGTERM/SIGINT (a second one skips the grace period), let in-flight handlers finish within the
grace period, exit. :attr:`Runner.state` says where in that life the runner is.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .copies import Copies
from .errors import AccessRefused, ConfigurationError, TopologyError, WorkerkitError
from .message import Outgoing
from .middleware import Middleware, call_hooks, check_middleware
from .publisher import allow_sync_publishes_on, refuse_sync_publishes_on
from .reply import reply_mandatory
from .retry import reconnecting
from .runtime import LEASE, SettleGate, WorkerRuntime, byte_cap, window
from .settings import Settings, load_settings
from .signals import StopRequests
from .topology import Topology
from .transport import default_transport
from .transport.base import Channel, Connection, Transport
from .worker import Worker

__all__ = ["Runner", "RunnerState", "exit_past_stuck_handlers", "run"]

log = logging.getLogger("workerkit.runner")

# Seconds between two declarations of one worker's layout after unroutable copies.
REDECLARE_EVERY = 1.0


class RunnerState(str, enum.Enum):
    """Where a :class:`Runner` is in its life (``Runner.state``)."""

    STARTING = "starting"  # connecting and declaring, before the first consume
    CONSUMING = "consuming"  # every consumer attached
    RECONNECTING = "reconnecting"  # a connection or consumer was lost; recovering
    DRAINING = "draining"  # stopping: consumers cancelled, handlers finishing
    STOPPED = "stopped"  # run() returned (or never started)


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
        middleware: Sequence[Middleware] = (),
    ) -> None:
        if not workers:
            raise ConfigurationError("no workers to run")
        self.settings = load_settings(settings, url)
        self.transport = transport if transport is not None else default_transport()
        self._topology = Topology(self.settings)
        self.prefetch = prefetch
        self.concurrency = concurrency
        self.burst = burst
        self.handle_signals = handle_signals
        self.worker_classes = list(dict.fromkeys(workers))
        # Hooks around every worker's handlers (each worker adds its own class's middleware).
        self.middleware = check_middleware(middleware, "Runner")
        self.runtimes: list[WorkerRuntime] = []
        self._consume_conn: Connection | None = None
        self._publish_conn: Connection | None = None
        self._publish_channel: Channel | None = None
        # Copies whose confirm is awaited: never sent while the broker blocks publishing, never
        # sent twice (see copies.py).
        self._copies = Copies()
        self._generation = 0  # connections of an older generation report no losses
        self._reopening = asyncio.Lock()
        self._stop: asyncio.Event | None = None
        self._lost: asyncio.Event | None = None
        self._repair: asyncio.Event | None = None  # publish channel closed or a slot died
        self.ready: asyncio.Event | None = None
        self._state = RunnerState.STOPPED
        self.reconnects = 0
        self.last_recovery: float | None = None
        self._stop_requests = StopRequests()
        self._redeclaring = asyncio.Lock()
        self._redeclared: dict[type[Worker], float] = {}

    # -- public ------------------------------------------------------------------------------

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def state(self) -> RunnerState:
        """Where the runner is in its life: starting, consuming, reconnecting, draining, stopped."""
        return self._state

    @property
    def healthy(self) -> bool:
        """True only while the runner can do its job (see docs/reliability.md, "Health"): it is
        consuming, its publish channel is open, and every worker has its own consumer on an open
        channel, all of its slots alive and (``def`` handlers) a handler thread that is not stuck.
        """
        channel = self._publish_channel
        return (
            self._state is RunnerState.CONSUMING
            and channel is not None
            and channel.is_open
            and bool(self.runtimes)
            and all(rt.healthy for rt in self.runtimes)
        )

    def is_ready(self) -> bool:
        """Readiness (``/ready``): healthy (consuming, every consumer attached, the publish
        channel open) and not asked to stop; false while starting, reconnecting and draining."""
        return self.healthy and not (self._stop is not None and self._stop.is_set())

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
        self._repair = asyncio.Event()
        self._redeclaring = asyncio.Lock()
        self.ready = asyncio.Event()
        self._state = RunnerState.STARTING
        loop = asyncio.get_running_loop()
        refuse_sync_publishes_on(loop)  # a blocking publish here would stall every consumer
        self._warn_about_timeouts()
        self._say_memory_caps()
        installed = self._install_signals(loop) if self.handle_signals else []
        try:
            gate = SettleGate()  # one for all: any worker's handler can kill the process
            self.runtimes = [
                WorkerRuntime(
                    cls,
                    self,
                    self.settings,
                    prefetch=self.prefetch,
                    concurrency=self.concurrency,
                    middleware=self.middleware,
                    gate=gate,
                )
                for cls in self.worker_classes
            ]
            await self._connect_with_retries()
            if self._stop.is_set():
                return  # stopped while the broker was unreachable: nothing to drain
            for rt in self.runtimes:
                await rt.instance.setup()
                call_hooks(rt.middleware, "on_worker_start", rt.instance)
                call_hooks(rt.middleware, "on_worker_stats", rt.instance, rt)
                rt.start_slots()
            self._state = RunnerState.CONSUMING
            self.ready.set()
            log.info(
                "consuming from %s",
                ", ".join(rt.queue for rt in self.runtimes),
            )
            await self._supervise()
        finally:
            self._state = RunnerState.DRAINING
            await self._shutdown()
            self._state = RunnerState.STOPPED
            allow_sync_publishes_on(loop)
            for sig in installed:
                loop.remove_signal_handler(sig)

    # -- what the runtimes need (runtime.Host) -------------------------------------------------

    async def publish_copy(self, copy: Outgoing, timeout: float) -> None:
        """Confirmed publish of a retry, dead-letter or recount copy on the publish channel:
        not sent while the broker blocks the connection, not sent twice (see copies.py)."""
        channel = await self._open_publish_channel()
        conn = self._publish_conn
        if conn is None:
            raise WorkerkitError("the publish connection is not open")
        await self._copies.publish(conn, channel, copy, timeout)

    async def publish_reply(self, reply: Outgoing, timeout: float) -> None:
        """Confirmed publish of a reply on the publish channel (see ``reply.py``)."""
        channel = await self._open_publish_channel()
        await channel.publish(reply, mandatory=reply_mandatory(reply.routing_key), timeout=timeout)

    async def redeclare(self, worker: type[Worker]) -> None:
        """Declare a worker's queues, bindings and the delay layout again, when one of its
        copies came back unroutable: an operator deleted its DLQ, a binding or a delay
        exchange while it ran. Once per ``REDECLARE_EVERY`` seconds per worker: a storm of
        failures makes one declaration, not one per copy."""
        now = time.monotonic()
        async with self._redeclaring:
            if now < self._redeclared.get(worker, float("-inf")) + REDECLARE_EVERY:
                return
            self._redeclared[worker] = time.monotonic()
            conn = self._publish_conn
            if conn is None or not conn.is_open:
                return  # the reconnect declares everything anyway
            try:
                channel = await conn.channel()
                try:
                    await self._topology.declare(channel, [worker])
                finally:
                    await channel.close()
            except WorkerkitError as exc:
                log.error("could not declare %s's queues again: %s", worker.describe(), exc)
                return
        log.warning(
            "a copy of a %s message was unroutable: declared its queue %s, its dead-letter"
            " queue and the delay layout again (deleted while it ran?)",
            worker.describe(),
            worker.queue,
        )

    async def _open_publish_channel(self) -> Channel:
        """The publish channel, reopened if the broker closed it (one reopen for all slots)."""
        channel = self._publish_channel
        if channel is not None and channel.is_open:
            return channel
        async with self._reopening:
            channel = self._publish_channel
            if channel is None or not channel.is_open:
                channel = await self._reopen_publish_channel()
            return channel

    async def publish(self, message: Outgoing) -> None:
        """Confirmed publish on the runner's publish channel (retry and dead-letter copies)."""
        await self.publish_copy(message, self.settings.publish_timeout)

    def consumer_lost(self, error: Exception) -> None:
        # The connection may be fine; every consumer is set up again all the same.
        self.connection_lost(error, what="consumer lost")

    def slot_died(self) -> None:
        if self._repair is not None:
            self._repair.set()

    # -- connection management ---------------------------------------------------------------

    def connection_lost(self, error: Exception, what: str = "connection lost") -> None:
        if self._stop is not None and self._stop.is_set():
            return
        for rt in self.runtimes:
            if rt.consuming or rt.tracker is not None:
                rt.detach()
        log.warning("%s: %s", what, error)
        if self._lost is not None:
            self._lost.set()
        if self._state is RunnerState.CONSUMING:
            self._state = RunnerState.RECONNECTING

    def _on_lost_of(self, generation: int) -> Callable[[Exception], None]:
        """on_lost for a connection of ``generation``: a connection already given up (a failed
        start-up attempt, the one before a reconnect) must not trigger another reconnect."""

        def on_lost(error: Exception) -> None:
            if generation == self._generation:
                self.connection_lost(error)

        return on_lost

    def _publish_channel_closed(self, generation: int, error: Exception) -> None:
        if generation != self._generation or self._state is not RunnerState.CONSUMING:
            return  # its connection is being replaced, or the runner is stopping
        log.warning("the publish channel closed (%s); reopening it", error)
        if self._repair is not None:
            self._repair.set()

    async def _reopen_publish_channel(self) -> Channel:
        conn = self._publish_conn
        if conn is None or not conn.is_open:
            raise WorkerkitError("the publish connection is not open")
        generation = self._generation
        channel = await conn.channel(
            confirms=True, on_closed=lambda exc: self._publish_channel_closed(generation, exc)
        )
        self._publish_channel = channel
        # Redeclared: an operator may have deleted a delay exchange (the 404 that closed it).
        await self._topology.declare_exchanges(channel)
        return channel

    async def _connect(self) -> None:
        self._generation += 1
        on_lost = self._on_lost_of(self._generation)
        self._consume_conn = await self.transport.connect(
            self.settings, name="workerkit-consume", on_lost=on_lost
        )
        self._publish_conn = await self.transport.connect(
            self.settings, name="workerkit-publish", on_lost=on_lost
        )
        # DLQs made by an older workerkit are kept as they are (see Topology.adopt_...).
        await self._topology.adopt_dead_letter_queues(
            self._consume_conn, [rt.cls for rt in self.runtimes]
        )
        await self._reopen_publish_channel()
        for rt in self.runtimes:
            await rt.attach(self._consume_conn)
        if not self._connected():
            raise WorkerkitError("a connection closed while consumers were being attached")
        # Both connections are open now: a loss reported earlier was of a connection this
        # attempt (or a failed one) gave up, and must not trigger a reconnect. No await between
        # the check and here, so a loss of these connections cannot be cleared by mistake.
        if self._lost is not None:
            self._lost.clear()

    def _connected(self) -> bool:
        conns = (self._consume_conn, self._publish_conn)
        channel = self._publish_channel
        return (
            all(conn is not None and conn.is_open for conn in conns)
            and channel is not None
            and channel.is_open
        )

    async def _close_connections(self) -> None:
        self._generation += 1  # what these report from now on is not a loss
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
        assert self._stop is not None and self._lost is not None and self._repair is not None
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                lost_wait = asyncio.ensure_future(self._lost.wait())
                repair_wait = asyncio.ensure_future(self._repair.wait())
                waits: set[asyncio.Future[Any]] = {stop_wait, lost_wait, repair_wait}
                if self.burst:
                    waits.add(asyncio.ensure_future(self._burst_done()))
                _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for fut in pending - {stop_wait}:
                    fut.cancel()
                if self.burst and not self._stop.is_set() and _done - {lost_wait, repair_wait}:
                    self._stop.set()
                    break
                if self._stop.is_set():
                    break
                if self._lost.is_set():
                    await self._recover()
                elif self._repair.is_set():
                    await self._repair_in_place()
        finally:
            stop_wait.cancel()

    async def _repair_in_place(self) -> None:
        """Restart dead slots and reopen a closed publish channel; a lost connection (or a
        publish channel that cannot be reopened) turns into a full recovery."""
        assert self._repair is not None and self._lost is not None
        self._repair.clear()
        for rt in self.runtimes:
            rt.revive()
        channel = self._publish_channel
        if channel is not None and channel.is_open:
            return
        try:
            await self._reopen_publish_channel()
            log.info("publish channel reopened")
        except WorkerkitError as exc:
            self.connection_lost(exc)

    async def _recover(self) -> None:
        assert self._lost is not None and self._repair is not None
        self._state = RunnerState.RECONNECTING
        started = time.monotonic()
        while self._lost.is_set() and not (self._stop is not None and self._stop.is_set()):
            self._lost.clear()
            self._repair.clear()
            for rt in self.runtimes:
                rt.detach()
            await self._close_connections()
            await self._connect_with_retries()
            # A loss while consumers were being attached set _lost again: go round once more.
        if self._stop is not None and self._stop.is_set():
            return
        for rt in self.runtimes:
            rt.revive()
        self._state = RunnerState.CONSUMING
        self.reconnects += 1
        self.last_recovery = time.monotonic() - started
        log.info("reconnected; consumers are back after %.2fs", self.last_recovery)
        call_hooks(self.middleware, "on_reconnected", self.last_recovery)

    async def _burst_done(self) -> None:
        """Returns when every queue is empty and nothing is in flight."""
        quiet = 0
        while True:
            await asyncio.sleep(0.05)
            if self._busy():
                quiet = 0
                continue
            empty = await self._queues_empty()
            # A delivery may have arrived during that round trip.
            quiet = quiet + 1 if empty and not self._busy() else 0
            if quiet >= 2:
                return

    def _busy(self) -> bool:
        return any(rt.busy for rt in self.runtimes) or not self.healthy

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

    # -- shutdown ----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        grace = self.settings.shutdown_grace
        await asyncio.gather(*(rt.close(grace) for rt in self.runtimes))
        await self._close_connections()
        log.info("stopped")

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        installed = []
        self._stop_requests = StopRequests()
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is signal.SIG_IGN:
                # Ignored when we started (a background job; a supervised child, whose parent
                # relays Ctrl-C as SIGTERM): the Unix convention is to leave it ignored.
                continue
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or not supported: the caller stops us
        return installed

    def _on_signal(self, sig: signal.Signals) -> None:
        request = self._stop_requests.count(sig)
        if request is None:
            log.debug("received %s twice at once (a process-group signal); one request", sig.name)
            return
        if request > 1 or (self._stop is not None and self._stop.is_set()):
            log.warning("received %s, a second stop; not waiting for running handlers", sig.name)
            for rt in self.runtimes:
                rt.hurry()
            return
        log.info("received %s; draining (send it again to stop at once)", sig.name)
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
            self._warn_about_waiting(cls, timeout, limit)

    def _say_memory_caps(self) -> None:
        """Say when the memory budget lowers a worker's prefetch: a warning when the prefetch
        was asked for, a note when it was the default."""
        cap = byte_cap(self.settings)
        if not cap:
            return
        unbounded = self.settings.model_copy(update={"max_in_flight_bytes": 0})
        for cls in self.worker_classes:
            prefetch, _ = window(cls, self.settings, self.prefetch, self.concurrency)
            wanted, _ = window(cls, unbounded, self.prefetch, self.concurrency)
            if wanted <= prefetch:
                continue
            asked = self.prefetch or cls.prefetch or self.settings.prefetch or cls.batch_size
            batches = (
                f"; batches of at most {prefetch} instead of batch_size {cls.batch_size}"
                if cls.batch_size and cls.batch_size > prefetch
                else ""
            )
            log.log(
                logging.WARNING if asked else logging.INFO,
                "%s: prefetch %d instead of %d%s: max_in_flight_bytes %d allows %d deliveries of"
                " up to max_body_size %d bytes; lower max_body_size to what the messages need"
                " to prefetch more",
                cls.describe(),
                prefetch,
                wanted,
                batches,
                self.settings.max_in_flight_bytes,
                cap,
                self.settings.max_body_size,
            )

    def _warn_about_waiting(self, cls: type[Worker], timeout: float | None, limit: float) -> None:
        """Prefetched deliveries wait for a slot, and the broker's clock runs from delivery:
        with slow handlers, the last of a prefetch window can wait ``waves`` handler times."""
        if timeout is None:
            return  # only the 90% safety net: no claim about how long handlers take
        prefetch, concurrency = window(cls, self.settings, self.prefetch, self.concurrency)
        waves = -(-prefetch // concurrency) - 1
        max_wait = max(limit * LEASE - timeout, limit * (1 - LEASE))
        if waves > 0 and waves * timeout > max_wait:
            log.warning(
                "%s: with prefetch %d and concurrency %d a delivery can wait %.0fs for a slot"
                " if handlers run to their %.0fs limit; past %.0fs it is given back to the"
                " broker before consumer_timeout (%.0fs). Lower prefetch or handler_timeout.",
                cls.describe(),
                prefetch,
                concurrency,
                waves * timeout,
                timeout,
                max_wait,
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
