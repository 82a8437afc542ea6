"""The runner: connects, declares, consumes, runs handlers, decides acks, drains on shutdown.

Life of a delivery::

    transport callback -> WorkerRuntime.on_message  (append to a deque; wake an idle slot)
    slot coroutine     -> decode -> handler -> decision (RetryPolicy.decide)
                       -> Ack: AckTracker.done(tag)          (batched multiple=True acks)
                       -> Retry / DeadLetter: confirmed publish of a copy, then ack the original

``concurrency`` long-lived slot coroutines per worker bound the handlers in flight; ``prefetch``
bounds what the broker sends ahead. Everything runs on one event loop thread; plain ``def``
handlers run in a per-worker thread pool and their results come back to the loop, so acks are
only ever sent from the loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from .errors import (
    AccessRefused,
    ConfigurationError,
    DecodeError,
    HandlerTimeout,
    TopologyError,
    WorkerkitError,
)
from .message import BROKER_DEATH_HEADERS, Header, Message, Outgoing, decoder_for
from .retry import Ack, DeadLetter, Retry, RetryPolicy, reconnecting
from .settings import Settings, load_settings
from .topology import Topology
from .transport.base import Channel, Connection, Transport
from .worker import Worker

__all__ = ["Runner", "run"]

log = logging.getLogger("workerkit.runner")

MAX_ERROR_MESSAGE = 1000
MAX_TRACEBACK = 8000


class AckTracker:
    """Acks for one channel. Batches contiguous finished deliveries into one multiple=True ack.

    A delivery below the floor is acked only when it finished, so batching never acks a message
    whose handler has not returned. Finished tags stuck behind a slow one are acked singly on the
    next flush so that they do not hold the prefetch window.
    """

    __slots__ = (
        "_batching",
        "_channel",
        "_done",
        "_floor",
        "_loop",
        "_scheduled",
        "_singly",
        "dead",
    )

    def __init__(self, channel: Channel, loop: asyncio.AbstractEventLoop, batching: bool) -> None:
        self._channel = channel
        self._loop = loop
        self._batching = batching
        self._floor = 0  # every tag <= floor is acked
        self._done: set[int] = set()
        self._singly: set[int] = set()
        self._scheduled = False
        self.dead = False

    def done(self, tag: int) -> None:
        if self.dead:
            return
        if not self._batching:
            self._channel.ack(tag)
            return
        self._done.add(tag)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def requeue(self, tag: int) -> None:
        """Give the message back to the broker (its copy could not be published)."""
        if self.dead:
            return
        self.flush()
        self._channel.nack(tag, requeue=True)
        self._singly.add(tag)
        self._advance_over_settled()

    def _advance_over_settled(self) -> None:
        floor = self._floor
        while floor + 1 in self._singly:
            floor += 1
            self._singly.discard(floor)
        self._floor = floor

    def flush(self) -> None:
        self._scheduled = False
        if self.dead or not self._done:
            return
        done, singly = self._done, self._singly
        floor = self._floor
        last_unsettled = 0
        while True:
            nxt = floor + 1
            if nxt in done:
                done.discard(nxt)
                last_unsettled = nxt
            elif nxt in singly:
                singly.discard(nxt)
            else:
                break
            floor = nxt
        self._floor = floor
        if last_unsettled:
            self._channel.ack(last_unsettled, True)
        if done:
            for tag in done:
                self._channel.ack(tag)
            singly.update(done)
            done.clear()

    def close(self) -> None:
        self.flush()
        self.dead = True


class Slot:
    """One of a worker's ``concurrency`` handler coroutines, and the deadline of its handler."""

    __slots__ = ("deadline", "task", "timed_out")

    def __init__(self) -> None:
        self.task: asyncio.Task[None]
        self.deadline = 0.0  # loop time the running handler must finish by; 0 when idle
        self.timed_out = False


def _uncancel(task: asyncio.Task[None]) -> None:
    # Python 3.11+ counts cancellations; a timeout we turned into a failure is not one.
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


class WorkerRuntime:
    """One worker class at run time: its instance, decoder, slots, channel and acks."""

    def __init__(self, cls: type[Worker], runner: Runner) -> None:
        settings = runner.settings
        self.cls = cls
        self.runner = runner
        self.name = cls.__qualname__
        self.queue = cls.queue
        self.instance = cls()
        self.policy = cls.retry or RetryPolicy(
            max_attempts=settings.retry_max_attempts,
            delay=settings.retry_delay,
            backoff=settings.retry_backoff,
            max_delay=settings.retry_max_delay,
        )
        self.prefetch = runner.prefetch or cls.prefetch or settings.prefetch
        self.concurrency = runner.concurrency or cls.concurrency or settings.concurrency
        self.timeout = (
            cls.handler_timeout
            or settings.handler_timeout
            or settings.broker_consumer_timeout * 0.9
        )
        self.delivery_limit = cls.delivery_limit or settings.delivery_limit
        handler = cls._handler
        self.decode = decoder_for(handler.body_type, settings.max_body_size)
        self.wants_message = handler.wants_message
        self.is_async = handler.is_async
        self.pool = (
            None
            if handler.is_async
            else concurrent.futures.ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix=f"workerkit-{self.queue}"
            )
        )
        self.classic = cls.queue_type == "classic"
        self.log_extra = {"worker": self.name, "queue": self.queue}
        self.deque: collections.deque[Message] = collections.deque()
        self.idle: list[asyncio.Future[None]] = []
        self.tracker: AckTracker | None = None
        self.channel: Channel | None = None
        self.consumer_tag: str | None = None
        self.slots: list[Slot] = []
        self.watchdog: asyncio.Task[None] | None = None
        self.in_flight = 0
        self.stopping = False
        self.processed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.consuming = False
        # Classic queues: redelivered originals whose counted copy is published but whose ack
        # may not be on the wire yet. No handler starts meanwhile (see _count_redelivery).
        self.settling = 0
        self.settled = asyncio.Event()
        self.settled.set()

    # -- channel lifecycle -------------------------------------------------------------------

    async def attach(self, connection: Connection) -> None:
        """Open the consume channel, declare this worker's queues and start consuming."""
        channel = await connection.channel(prefetch=self.prefetch)
        await self.runner.topology.declare(channel, [self.cls])
        loop = asyncio.get_running_loop()
        self.channel = channel
        self.tracker = AckTracker(channel, loop, self.runner.settings.ack_batching)
        self.consumer_tag = await channel.consume(self.queue, self.on_message, self.on_cancelled)
        _ready, consumers = await channel.queue_state(self.queue)
        if consumers < 1:  # the proof that the consumer is really back (cf. aio-pika #231)
            raise WorkerkitError(f"queue {self.queue!r} reports no consumer after basic.consume")
        self.consuming = True

    def detach(self) -> None:
        """The channel is gone: unstarted deliveries belong to the broker again."""
        self.consuming = False
        self.deque.clear()
        if self.tracker is not None:
            self.tracker.dead = True
        self.tracker = None
        self.channel = None
        self.consumer_tag = None

    def on_cancelled(self) -> None:
        log.warning("the broker cancelled the consumer", extra=self.log_extra)
        self.consuming = False
        self.runner.connection_lost(WorkerkitError(f"consumer of {self.queue!r} cancelled"))

    async def stop_consuming(self) -> None:
        self.stopping = True
        channel, tag = self.channel, self.consumer_tag
        self.consuming = False
        self.consumer_tag = None
        if channel is not None and tag is not None:
            try:
                await channel.cancel(tag)
            except WorkerkitError as exc:
                log.debug("cancel failed: %s", exc, extra=self.log_extra)
        # Prefetched but unstarted: left to the broker (returned when the channel closes).
        self.deque.clear()
        for fut in self.idle:
            if not fut.done():
                fut.set_result(None)
        self.idle.clear()

    # -- hot path ----------------------------------------------------------------------------

    def on_message(self, message: Message) -> None:
        self.deque.append(message)
        if self.idle:
            self.idle.pop().set_result(None)

    def start_slots(self) -> None:
        loop = asyncio.get_running_loop()
        self.slots = [Slot() for _ in range(self.concurrency)]
        for slot in self.slots:
            slot.task = loop.create_task(self._slot(slot))
        self.watchdog = loop.create_task(self._watch_timeouts())

    async def _slot(self, slot: Slot) -> None:
        deque = self.deque
        loop = asyncio.get_running_loop()
        while True:
            if not deque:
                if self.stopping:
                    return
                fut = loop.create_future()
                self.idle.append(fut)
                await fut
                continue
            message = deque.popleft()
            tracker = self.tracker
            if tracker is None:
                continue
            self.in_flight += 1
            try:
                await self._process(message, tracker, slot, loop)
            except Exception:
                # A bug of ours must not silently end the slot (and shrink concurrency).
                log.exception(
                    "unexpected error while processing; requeueing",
                    extra={**self.log_extra, "message_id": message.message_id},
                )
                tracker.requeue(message.delivery_tag)
            finally:
                self.in_flight -= 1

    async def _process(
        self, message: Message, tracker: AckTracker, slot: Slot, loop: asyncio.AbstractEventLoop
    ) -> None:
        if message.redelivered and self.classic and await self._count_redelivery(message, tracker):
            return
        if self.settling:
            await self.settled.wait()
        try:
            body = self.decode(message)
        except DecodeError as exc:
            await self._dead_letter(message, tracker, "invalid", exc)
            return
        # The deadline is watched by one task per worker instead of a timer per message.
        slot.deadline = loop.time() + self.timeout
        try:
            if self.is_async:
                if self.wants_message:
                    await self.instance.handle(body, message)
                else:
                    await self.instance.handle(body)
            elif self.wants_message:
                await loop.run_in_executor(self.pool, self.instance.handle, body, message)
            else:
                await loop.run_in_executor(self.pool, self.instance.handle, body)
        except asyncio.CancelledError:
            slot.deadline = 0.0
            if not slot.timed_out:
                raise  # shutdown past the grace period: not acked, the broker redelivers
            slot.timed_out = False
            _uncancel(slot.task)
            await self._failed(message, tracker, HandlerTimeout(self.timeout))
            return
        except Exception as exc:
            slot.deadline = 0.0
            await self._failed(message, tracker, exc)
            return
        slot.deadline = 0.0
        slot.timed_out = False
        self.processed += 1
        tracker.done(message.delivery_tag)

    async def _watch_timeouts(self) -> None:
        """Cancel handlers that run past ``timeout``; the slot turns that into a failure."""
        loop = asyncio.get_running_loop()
        interval = min(1.0, max(0.05, self.timeout / 10))
        while not self.stopping:
            await asyncio.sleep(interval)
            now = loop.time()
            for slot in self.slots:
                if slot.deadline and now >= slot.deadline and not slot.timed_out:
                    slot.timed_out = True
                    slot.task.cancel()

    # -- failure paths -----------------------------------------------------------------------

    async def _failed(self, message: Message, tracker: AckTracker, exc: Exception) -> None:
        decision = self.policy.decide(exc, message.attempt)
        if isinstance(decision, Retry):
            await self._retry(message, tracker, decision, exc)
        elif isinstance(decision, DeadLetter):
            await self._dead_letter(message, tracker, decision.reason, exc)
        else:  # pragma: no cover - decide() never acks an error
            assert isinstance(decision, Ack)
            tracker.done(message.delivery_tag)

    async def _retry(
        self, message: Message, tracker: AckTracker, decision: Retry, exc: Exception
    ) -> None:
        headers = self._failure_headers(message, exc)
        headers[Header.ATTEMPT] = decision.attempt
        exchange, routing_key = self.runner.topology.retry_route(self.queue, decision.delay)
        log.warning(
            "handler failed (%s: %s); retrying in %.1fs",
            type(exc).__name__,
            _short(str(exc), 200),
            decision.delay,
            extra={**self.log_extra, "message_id": message.message_id, "attempt": message.attempt},
        )
        if await self._republish(message, tracker, exchange, routing_key, headers):
            self.retried += 1

    async def _dead_letter(
        self, message: Message, tracker: AckTracker, reason: str, exc: BaseException
    ) -> None:
        headers = self._failure_headers(message, exc)
        headers[Header.REASON] = reason
        headers[Header.ATTEMPT] = message.attempt
        log.error(
            "dead-lettered (%s): %s: %s",
            reason,
            type(exc).__name__,
            _short(str(exc), 200),
            extra={**self.log_extra, "message_id": message.message_id, "attempt": message.attempt},
        )
        dlq = Topology.dlq_name(self.queue)
        if await self._republish(message, tracker, "", dlq, headers):
            self.dead_lettered += 1

    async def _count_redelivery(self, message: Message, tracker: AckTracker) -> bool:
        """Classic queues have no delivery limit: persist a delivery count before handling.

        A redelivered message is republished to the queue's tail with the count raised, then
        acked; past the limit it is dead-lettered. True when the message was taken care of here.
        """
        count = message.headers.get(Header.DELIVERIES, 1)
        count = (count if isinstance(count, int) else 1) + 1
        # Same meaning as the quorum queue's x-delivery-limit: ``delivery_limit`` redeliveries.
        if count > self.delivery_limit + 1:
            error = RuntimeError(f"delivered {count - 1} times without an ack (worker crashed?)")
            await self._dead_letter(message, tracker, "delivery-limit", error)
            return True
        headers = _clean_headers(message.headers)
        headers[Header.DELIVERIES] = count
        # The copy can reach another slot before the original's ack is sent. If that handler
        # then kills the process, both come back and the message doubles on every crash; so
        # handlers wait until the ack is flushed and the loop has written it to the socket.
        self.settling += 1
        self.settled.clear()
        try:
            if await self._republish(message, tracker, "", self.queue, headers):
                tracker.flush()
                await asyncio.sleep(0)  # pika sends buffered frames on a later loop pass
                await asyncio.sleep(0)
        finally:
            self.settling -= 1
            if not self.settling:
                self.settled.set()
        return True

    def _failure_headers(self, message: Message, exc: BaseException) -> dict[str, Any]:
        now = _utc_now()
        headers = _clean_headers(message.headers)
        headers.setdefault(Header.FIRST_FAILURE, now)
        headers[Header.LAST_FAILURE] = now
        headers[Header.ERROR_TYPE] = f"{type(exc).__module__}.{type(exc).__qualname__}"
        headers[Header.ERROR_MESSAGE] = _short(str(exc), MAX_ERROR_MESSAGE)
        headers[Header.TRACEBACK] = _short(
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), MAX_TRACEBACK
        )
        headers.setdefault(Header.ORIGINAL_EXCHANGE, message.exchange)
        headers.setdefault(Header.ORIGINAL_ROUTING_KEY, message.routing_key)
        headers[Header.QUEUE] = self.queue
        return headers

    async def _republish(
        self,
        message: Message,
        tracker: AckTracker,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any],
    ) -> bool:
        """Publish a copy and wait for its confirm, then ack the original (else requeue it)."""
        copy = Outgoing(
            exchange=exchange,
            routing_key=routing_key,
            body=message.body,
            content_type=message.content_type,
            headers=headers,
            message_id=message.message_id or "",
            correlation_id=message.correlation_id,
            timestamp=message.timestamp or int(time.time()),
            reply_to=message.reply_to,
            content_encoding=message.content_encoding,
        )
        try:
            await self.runner.publish(copy)
        except WorkerkitError as exc:
            log.error(
                "could not publish the retry/dead-letter copy (%s); requeueing the original",
                exc,
                extra={**self.log_extra, "message_id": message.message_id},
            )
            # Hold the message a moment before handing it back so that a broker refusing
            # publishes (alarm, outage) does not turn into a hot redelivery loop.
            await asyncio.sleep(0.5 + random.random())
            tracker.requeue(message.delivery_tag)
            return False
        tracker.done(message.delivery_tag)
        return True


def _clean_headers(headers: Any) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if k not in BROKER_DEATH_HEADERS}


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "... [truncated]"


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
            max_delay=self.settings.reconnect_max_delay, before_sleep=before_sleep
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
            empty = True
            for rt in self.runtimes:
                assert rt.channel is not None
                ready, _ = await rt.channel.queue_state(rt.queue)
                empty = empty and ready == 0
            quiet = quiet + 1 if empty else 0
            if quiet >= 2:
                return

    async def publish(self, message: Outgoing) -> None:
        """Confirmed publish on the runner's publish channel (retry and dead-letter copies)."""
        channel = self._publish_channel
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


Callback = Callable[[], None]
