"""One worker at run time: its consumer, handler slots, decoding and the decision after a handler.

Life of a delivery::

    transport callback -> WorkerRuntime.on_message  (append to a deque; wake an idle slot)
    slot coroutine     -> decode -> handler -> decision (RetryPolicy.decide)
                       -> Ack: AckTracker.done(tag)          (batched multiple=True acks)
                       -> Retry / DeadLetter: confirmed publish of a copy, then ack the original

``concurrency`` long-lived slot coroutines bound the handlers in flight; ``prefetch`` bounds what
the broker sends ahead. Plain ``def`` handlers run in the worker's thread pool and their results
come back to the loop, so acks are only ever sent from the loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import random
import threading
import time
import traceback
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .acks import AckTracker
from .errors import DecodeError, HandlerTimeout, WorkerkitError
from .message import BROKER_DEATH_HEADERS, Header, Message, Outgoing, decoder_for
from .retry import Ack, DeadLetter, Retry, RetryPolicy
from .topology import Topology
from .transport.base import Channel, Connection
from .worker import Worker

if TYPE_CHECKING:
    from .runner import Runner

__all__ = ["WorkerRuntime"]

log = logging.getLogger("workerkit.runner")

MAX_ERROR_MESSAGE = 1000
MAX_TRACEBACK = 8000


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
        self.concurrency = runner.concurrency or cls.concurrency or settings.concurrency
        # Unset: 2 x concurrency, so that competing processes share a queue fairly (see
        # docs/deploy.md) while a finished slot still finds its next message waiting.
        self.prefetch = runner.prefetch or cls.prefetch or settings.prefetch or 2 * self.concurrency
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
        # Plain def handlers: outcomes of finished handlers, waiting for the loop to pick them up.
        self._finished: list[tuple[asyncio.Future[None], BaseException | None]] = []
        self._finished_lock = threading.Lock()
        self.classic = cls.queue_type == "classic"
        self.exchange = settings.exchange
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
        # The runner declared the exchanges and delay layout once for all workers.
        await self.runner.topology.declare_queues(channel, [self.cls])
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
        log.warning("the consumer is gone (cancelled or its channel closed)", extra=self.log_extra)
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
        if message.exchange and message.exchange != self.exchange:
            self._restore_route(message)
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
            else:
                await self._in_thread(body, message, loop)
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

    def _in_thread(
        self, body: Any, message: Message, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[None]:
        """Run a plain ``def`` handler in the pool; the future settles on the loop.

        Not ``run_in_executor``: that wakes the loop once per finished handler. Here finished
        handlers queue their outcome and only the first of a batch wakes the loop.
        """
        assert self.pool is not None
        fut: asyncio.Future[None] = loop.create_future()
        args = (body, message) if self.wants_message else (body,)
        self.pool.submit(self._call_handler, fut, args, loop)
        return fut

    def _call_handler(
        self, fut: asyncio.Future[None], args: tuple[Any, ...], loop: asyncio.AbstractEventLoop
    ) -> None:
        """In a pool thread."""
        if fut.cancelled():
            return  # timed out or shut down before it started: never run it late
        error: BaseException | None = None
        try:
            self.instance.handle(*args)
        except BaseException as exc:  # handed to the loop like run_in_executor would
            error = exc
        with self._finished_lock:
            self._finished.append((fut, error))
            first = len(self._finished) == 1
        if first:
            loop.call_soon_threadsafe(self._settle_finished)

    def _settle_finished(self) -> None:
        with self._finished_lock:
            finished, self._finished = self._finished, []
        for fut, error in finished:
            if fut.cancelled():
                continue  # its slot gave up on it (handler timeout or shutdown)
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

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

    def _restore_route(self, message: Message) -> None:
        """A retried or scheduled message comes out of the delay layout: show the handler the
        exchange and routing key it was published with, without the broker's x-death trail."""
        topology = self.runner.topology
        if topology.is_delayed(message.exchange):
            message.exchange, message.routing_key = topology.original_route(
                message.routing_key, message.headers
            )
            message.headers = _clean_headers(message.headers)

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
