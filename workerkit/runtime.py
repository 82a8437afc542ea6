"""One worker at run time: its consumer, handler slots, decoding, and carrying out decisions.

The per-message path (the rules are in ``decision.py``; this module only carries them out)::

    transport callback -> on_message            append to the local buffer; wake an idle slot
    slot               -> _process              classic redelivery? decode, run the handler
                       -> decide(what, ...)     one pure function: Ack | Retry | DeadLetter |
                                                Recount | GiveBack
                       -> _carry_out(decision)  match + assert_never: ack / confirmed copy then
                                                ack / nack; a copy not confirmed -> decide again;
                                                a retry/DLQ copy's confirm in a task of its own
                                                (_confirm_later): the slot moves on
                       -> _finished(outcome)    the one place a delivery's outcome is known:
                                                counted, timed (stats.py), after_handle hooks
    requests (reply_to)   the handler's value is the reply, published before the ack; an error
                          reply follows a confirmed DLQ copy (reply.py has the wire format)
    batch workers         _batch_slot: collect, decode each, one handler call, one decision each
    watchdog (1 task)  -> handler timeouts; deliveries that waited too long locally: GiveBack

``concurrency`` long-lived slot coroutines bound the handlers in flight; ``prefetch`` bounds what
the broker sends ahead. Plain ``def`` handlers run in the worker's thread pool and their results
come back to the loop, so acks are only ever sent from the loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import logging
import sys
import threading
import time
import traceback
from bisect import bisect_left
from collections.abc import Awaitable
from datetime import datetime, timezone
from typing import Any, Protocol

if sys.version_info >= (3, 11):
    from typing import assert_never
else:  # pragma: no cover - Python 3.10
    from typing_extensions import assert_never

from .acks import AckTracker
from .batch import failures_of
from .decision import (
    Ack,
    DeadLetter,
    Decision,
    GiveBack,
    Happened,
    Outcome,
    Recount,
    Retry,
    decide,
    outcome_of,
)
from .dlq import content_key
from .errors import DecodeError, HandlerTimeout, InvalidMessage, Unroutable, WorkerkitError
from .idempotency import Claim
from .message import (
    BROKER_DEATH_HEADERS,
    Header,
    Message,
    Outgoing,
    decoder_for,
    new_message_id,
)
from .middleware import Middleware, bound_hooks, call_hooks, hook_failed, run_hooks
from .reply import INVALID_REPLY, error_reply, reply_to_request
from .retry import RetryPolicy
from .settings import Settings
from .stats import FIRST_HANDLER_BUCKET, HANDLER_BUCKETS, LAG_BUCKETS, PUBLISHED_AT_HEADER, Timings
from .topology import Topology
from .transport.base import Channel, Connection
from .worker import Worker

__all__ = ["Host", "WorkerRuntime", "byte_cap", "window"]

log = logging.getLogger("workerkit.runtime")

# The runtime's one clock: handler deadlines, the watchdog, handler durations. Read once per
# delivery, when a slot takes it (what asyncio's default loop.time() reads, without its frame).
_clock = time.monotonic
_wall = time.time

MAX_ERROR_MESSAGE = 1000
MAX_TRACEBACK = 8000
# Seconds a claim of an idempotent worker outlives its handler's time limit.
CLAIM_MARGIN = 5.0
# Share of the broker's consumer_timeout a delivery may be held (waiting + handler + copy);
# the rest covers the ack's trip and clock differences.
LEASE = 0.95


def window(
    cls: type[Worker], settings: Settings, prefetch: int | None, concurrency: int | None
) -> tuple[int, int]:
    """A worker's (prefetch, concurrency): the runner's override, the class's, the settings'.

    Prefetch unset is 2 x concurrency, so that competing processes share a queue fairly (see
    docs/deploy.md) while a finished slot still finds its next message waiting; a batch worker
    gets enough in flight for every slot to fill a batch. Whatever it comes to, the memory
    budget caps it (:func:`byte_cap`).
    """
    slots = concurrency or cls.concurrency or settings.concurrency
    ahead = prefetch or cls.prefetch or settings.prefetch or 2 * slots
    if cls.batch_size:
        ahead = max(ahead, cls.batch_size * slots)
    cap = byte_cap(settings)
    return (min(ahead, cap) if cap else ahead), slots


def byte_cap(settings: Settings) -> int:
    """The most deliveries a worker may hold (0: no cap) so that their bodies fit its memory
    budget. The broker sends ``prefetch`` deliveries whatever their size (RabbitMQ has no
    byte-sized prefetch), so the count is what bounds memory: at most ``max_body_size`` each."""
    budget = settings.max_in_flight_bytes
    return max(1, budget // settings.max_body_size) if budget else 0


class Host(Protocol):
    """What a runtime needs from the runner that hosts it."""

    @property
    def topology(self) -> Topology: ...

    async def publish_copy(self, copy: Outgoing, timeout: float) -> None:
        """Confirmed publish of a retry, dead-letter or recount copy."""
        ...

    async def publish_reply(self, reply: Outgoing, timeout: float) -> None:
        """Confirmed publish of a reply to a request (see ``reply.py``)."""
        ...

    async def redeclare(self, worker: type[Worker]) -> None:
        """Declare ``worker``'s queues, bindings and the delay layout again (a copy came back
        unroutable: something it needs was deleted while the worker ran)."""
        ...

    def consumer_lost(self, error: Exception) -> None:
        """This runtime's consumer or channel is gone: reconnect."""
        ...

    def slot_died(self) -> None:
        """A slot ended unexpectedly: call :meth:`WorkerRuntime.revive` soon."""
        ...


class Slot:
    """One of a worker's ``concurrency`` handler coroutines, and the deadline of its handler."""

    __slots__ = ("call", "closing", "deadline", "started", "task", "timed_out")

    def __init__(self) -> None:
        self.task: asyncio.Task[None]
        self.deadline = 0.0  # _clock() the running handler must finish by; 0 when idle
        self.timed_out = False  # the watchdog cancelled the handler
        self.closing = False  # the runtime cancelled the slot (shutdown past the grace period)
        self.started = True  # False while a def handler waits for a free pool thread
        self.call: asyncio.Future[Any] | None = None  # the running def handler's future


def _uncancel(task: asyncio.Task[None]) -> None:
    # Python 3.11+ counts cancellations; a timeout we turned into a failure is not one.
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


#: How often (seconds) a classic queue's redelivery looks again whether every handler of the
#: process has finished (SettleGate.quiet): a rare path, after a crash or a lost connection.
QUIET_POLL = 0.01
#: How long (seconds) it waits for that at most: a poison message kills its process as it
#: starts, and a long handler still running from before a lost connection must not hold the
#: count (and the delivery, toward the broker's consumer_timeout) for its whole time limit.
QUIET_MAX = 2.0


class SettleGate:
    """A classic queue's redeliveries being counted: a copy (recounted, or dead-lettered at the
    delivery limit) is published and confirmed, then the original acked. A handler that killed
    the process between the two would bring back both, one more copy per crash: a poison
    message multiplied, or dead-lettered twice. So while one is counted no handler starts, and
    it starts only once none runs, in any worker of the runner (any of them kills the process).
    """

    __slots__ = ("count", "open", "runtimes")

    def __init__(self) -> None:
        self.count = 0
        self.open = asyncio.Event()
        self.open.set()
        self.runtimes: list[WorkerRuntime] = []

    def step(self, step: int) -> None:
        self.count += step
        if self.count:
            self.open.clear()
        else:
            self.open.set()

    async def quiet(self) -> None:
        """Until no handler runs (or waits for a thread) in any of the gate's workers, or
        :data:`QUIET_MAX` seconds have passed."""
        deadline = _clock() + QUIET_MAX
        while any(slot.deadline for rt in self.runtimes for slot in rt.slots):
            if _clock() >= deadline:
                return
            await asyncio.sleep(QUIET_POLL)


class WorkerRuntime:
    """One worker class at run time: its instance, decoder, slots, channel and acks."""

    def __init__(
        self,
        cls: type[Worker],
        host: Host,
        settings: Settings,
        *,
        prefetch: int | None = None,
        concurrency: int | None = None,
        middleware: tuple[Middleware, ...] = (),
        gate: SettleGate | None = None,
    ) -> None:
        self.cls = cls
        self.host = host
        self.name = cls.__qualname__
        self.queue = cls.queue
        self.instance = cls()
        self.policy = cls.retry or RetryPolicy(
            max_attempts=settings.retry_max_attempts,
            delay=settings.retry_delay,
            backoff=settings.retry_backoff,
            max_delay=settings.retry_max_delay,
        )
        self.prefetch, self.concurrency = window(cls, settings, prefetch, concurrency)
        self.batch_size = cls.batch_size or 0
        self.batch_timeout = cls.batch_timeout
        limit = settings.broker_consumer_timeout
        self.timeout = cls.handler_timeout or settings.handler_timeout or limit * 0.9
        # How long a delivery may wait locally for a slot (or a thread) before it is given back
        # so that the broker's consumer_timeout never fires (it counts from the delivery).
        self.max_wait = max(limit * LEASE - self.timeout, limit * (1 - LEASE))
        self.lease = limit * LEASE
        self.publish_timeout = settings.publish_timeout
        self.delivery_limit = cls.delivery_limit or settings.delivery_limit
        self.ack_batching = settings.ack_batching
        handler = cls._handler
        self.decode = decoder_for(handler.body_type, settings.max_body_size)
        self.max_body_size = settings.max_body_size
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
        self._finished_calls: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._finished_lock = threading.Lock()
        # Threads still running a handler that timed out (their futures), and their count.
        self._abandoned: set[asyncio.Future[Any]] = set()
        self.stuck_threads = 0
        self.classic = cls.queue_type == "classic"
        self.exchange = settings.exchange
        self.log_extra = {"worker": self.name, "queue": self.queue}
        # The runner's hooks, then the worker's; empty means no per-message cost but a check.
        self.middleware = (*middleware, *cls.middleware)
        # The per-message hooks, looked up once (after_handle innermost first, like a stack).
        self._before_hooks = bound_hooks(self.middleware, "before_handle")
        self._after_hooks = bound_hooks(reversed(self.middleware), "after_handle")
        # Unstarted deliveries and, in step, the loop time each arrived (a coarse clock
        # advanced by the watchdog, so that on_message allocates nothing).
        self.deque: collections.deque[Message] = collections.deque()
        self.arrivals: collections.deque[float] = collections.deque()
        self.tick = 0.0
        # time.time() - _clock(), refreshed with the tick: a delivery's lag from the clock read
        # its slot takes anyway (a wall-clock step shows within one watchdog interval).
        self.wall_offset = 0.0
        self.idle: list[asyncio.Future[None]] = []
        self.tracker: AckTracker | None = None
        self.channel: Channel | None = None
        self.consumer_tag: str | None = None
        self.slots: list[Slot] = []
        self.watchdog: asyncio.Task[None] | None = None
        self.in_flight = 0
        self.stopping = False
        self.consuming = False
        self.slot_restarts = 0
        self.outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        # Retry/dead-letter copies waiting for their confirm after their slot moved on.
        self.confirming: set[asyncio.Task[None]] = set()
        # Handler times and delivery lags, when a middleware reads them (stats.py).
        self.timings = Timings() if any(m.reads_timings for m in self.middleware) else None
        # Requests (messages with reply_to): replies confirmed, and replies that could not be
        # published (the request is acked or dead-lettered all the same).
        self.replies_sent = 0
        self.replies_failed = 0
        # Idempotent workers: the store, how long a claim outlives a handler that may still be
        # running (its time limit plus a margin), and the duplicates seen.
        self.once = cls.idempotency_store if cls.idempotent else None
        self.claim_ttl = self.timeout + CLAIM_MARGIN
        self.duplicates = 0
        self._hurry = asyncio.Event()
        # Classic queues: no handler starts while a counted copy's original may not be acked
        # on the wire yet, in this worker or (the runner's gate) any other of the process.
        self.gate = gate if gate is not None else SettleGate()
        self.gate.runtimes.append(self)

    # -- counters and health -----------------------------------------------------------------

    @property
    def processed(self) -> int:
        return self.outcomes[Outcome.ACKED]

    @property
    def retried(self) -> int:
        return self.outcomes[Outcome.RETRIED]

    @property
    def dead_lettered(self) -> int:
        """Copies published to the DLQ (exhausted, delivery-limit, rejected, invalid)."""
        o = self.outcomes
        return o[Outcome.DEAD_LETTERED] + o[Outcome.REJECTED] + o[Outcome.INVALID]

    @property
    def given_back(self) -> int:
        return self.outcomes[Outcome.GIVEN_BACK]

    @property
    def busy(self) -> bool:
        """A delivery waits for a slot, a handler runs, or a finished one's ack is held."""
        tracker = self.tracker
        return bool(self.in_flight or self.deque or (tracker is not None and tracker.held))

    @property
    def healthy(self) -> bool:
        """Consuming with its own consumer, every slot alive, a handler thread free."""
        channel, tag = self.channel, self.consumer_tag
        return (
            self.consuming
            and channel is not None
            and tag is not None
            and channel.is_open
            and channel.has_consumer(tag)
            and len(self.slots) == self.concurrency
            and not any(slot.task.done() for slot in self.slots)
            and (self.pool is None or self.stuck_threads < self.concurrency)
        )

    # -- channel lifecycle -------------------------------------------------------------------

    async def attach(self, connection: Connection) -> None:
        """Open the consume channel, declare this worker's queues and start consuming."""
        channel = await connection.channel(prefetch=self.prefetch)
        # The runner declared the exchanges and delay layout once for all workers.
        await self.host.topology.declare_queues(channel, [self.cls])
        loop = asyncio.get_running_loop()
        self.channel = channel
        self.tracker = AckTracker(channel, loop, self.ack_batching, hold=self.prefetch // 2)
        # Deliveries are stamped with the watchdog's tick, and they come as soon as the consume
        # is on: before the first tick (the worker still starting) the stamp must be now, not 0,
        # or a backlog still waiting at that tick looks as old as the machine and is given back.
        self.tick = _clock()
        tag = await channel.consume(self.queue, self.on_message, self.on_cancelled)
        self.consumer_tag = tag
        await channel.queue_state(self.queue)  # a round trip: the broker has seen the consume
        if not channel.has_consumer(tag):  # our own consumer, not "some consumer exists"
            raise WorkerkitError(f"the consumer of {self.queue!r} is gone right after consuming")
        self.consuming = True

    def detach(self) -> None:
        """The channel is gone: unstarted deliveries belong to the broker again.

        Held acks are sent first: the consume channel may still be open (the publish connection
        was lost, or the broker cancelled the consumer), and the reconnect that follows closes
        it, which would requeue deliveries that were handled.
        """
        self.consuming = False
        self.deque.clear()
        self.arrivals.clear()
        if self.tracker is not None:
            self.tracker.close()
        self.tracker = None
        self.channel = None
        self.consumer_tag = None

    def on_cancelled(self) -> None:
        log.warning("the consumer is gone (cancelled or its channel closed)", extra=self.log_extra)
        self.consuming = False
        self.host.consumer_lost(
            WorkerkitError(
                f"{self.queue!r}: cancelled by the broker or its channel closed (a deleted"
                " queue?); setting every consumer up again"
            )
        )

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
        self.arrivals.clear()
        for fut in self.idle:
            if not fut.done():
                fut.set_result(None)
        self.idle.clear()

    def hurry(self) -> None:
        """Stop waiting for running handlers (a second SIGTERM)."""
        self._hurry.set()

    async def close(self, grace: float) -> None:
        """Stop consuming, let running handlers finish within ``grace``, then tear down."""
        await self.stop_consuming()
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        tasks = [slot.task for slot in self.slots if not slot.task.done()]
        if tasks:
            await self._drain(tasks, grace)
        if self.confirming:  # copies of the last failures (slots add none once they are done)
            await self._drain(list(self.confirming), max(0.0, until - loop.time()))
        await self._tear_down()

    async def _drain(self, tasks: list[asyncio.Task[None]], grace: float) -> None:
        """Wait for running handlers until ``grace`` ends (or ``hurry()``); cancel the rest,
        whose messages the broker gets back when the channel closes."""
        all_done = asyncio.ensure_future(asyncio.wait(tasks))
        hurry = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({all_done, hurry}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        all_done.cancel()
        hurry.cancel()
        pending = [task for task in tasks if not task.done()]
        if not pending:
            return
        log.warning(
            "%d handler(s) still running; leaving their messages to the broker",
            self.in_flight,
            extra=self.log_extra,
        )
        if self.tracker is not None:
            self.tracker.close()
        for slot in self.slots:
            slot.closing = True
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1)

    async def _tear_down(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.tracker is not None:
            self.tracker.close()
        if self.channel is not None:
            try:
                await self.channel.flush()
                await self.channel.close()
            except WorkerkitError:
                pass
        try:
            await self.instance.teardown()
        except Exception:
            log.exception("teardown failed", extra=self.log_extra)
        if self.once is not None:
            try:
                await self.once.close()
            except Exception:
                log.exception("closing the idempotency store failed", extra=self.log_extra)
        call_hooks(self.middleware, "on_worker_stop", self.instance)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    # -- slots -------------------------------------------------------------------------------

    def on_message(self, message: Message) -> None:
        self.deque.append(message)
        self.arrivals.append(self.tick)
        if self.idle:
            self.idle.pop().set_result(None)

    def start_slots(self) -> None:
        loop = asyncio.get_running_loop()
        self.tick = _clock()
        self.wall_offset = _wall() - self.tick
        self.slots = [self._new_slot(loop) for _ in range(self.concurrency)]
        self.watchdog = loop.create_task(self._watch())

    def _new_slot(self, loop: asyncio.AbstractEventLoop) -> Slot:
        slot = Slot()
        body = self._batch_slot(slot) if self.batch_size else self._slot(slot)
        slot.task = loop.create_task(body)
        slot.task.add_done_callback(self._slot_ended)
        return slot

    def _slot_ended(self, task: asyncio.Task[None]) -> None:
        if self.stopping:
            return
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        log.error("a handler slot ended (%s); restarting it", reason, extra=self.log_extra)
        self.host.slot_died()

    def revive(self) -> None:
        """Replace slots that ended while the worker was running."""
        if self.stopping:
            return
        loop = asyncio.get_running_loop()
        for i, slot in enumerate(self.slots):
            if slot.task.done():
                self.slots[i] = self._new_slot(loop)
                self.slot_restarts += 1

    async def _slot(self, slot: Slot) -> None:
        deque, arrivals = self.deque, self.arrivals
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
            arrived = arrivals.popleft()
            message.queue = self.queue
            tracker = self.tracker
            if tracker is None:
                continue
            self.in_flight += 1
            began = _clock()
            if self.middleware:
                message._began = began
                if self._before_hooks:
                    for hook in self._before_hooks:  # inline: the per-message path (run_hooks)
                        try:
                            hook(message)
                        except Exception:
                            hook_failed(hook, "before_handle")
            try:
                await self._process(message, tracker, slot, arrived, began, loop)
            except BaseException:
                if slot.closing:
                    # Shutdown past the grace period: not acked, the broker redelivers.
                    self._finished(message, Outcome.GIVEN_BACK)
                    raise
                # A bug of ours must not silently end the slot (and shrink concurrency).
                log.exception(
                    "unexpected error while processing; giving the message back",
                    extra={**self.log_extra, "message_id": message.message_id},
                )
                self._carry_out(message, tracker, GiveBack(), None, arrived)
            finally:
                self.in_flight -= 1
            del message  # an idle slot must not keep its last body alive

    # -- the per-message path ----------------------------------------------------------------

    async def _process(
        self,
        message: Message,
        tracker: AckTracker,
        slot: Slot,
        arrived: float,
        began: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """One delivery, taken by its slot at ``began`` (_clock()): decode, handle within the
        time limit, decide, carry out."""
        if message.redelivered and self.classic:
            await self._redelivered(message, tracker, arrived)
            return
        if self.gate.count:
            await self.gate.open.wait()
            began = _clock()  # the time limit starts now
        if message.exchange != self.exchange:
            self._restore_route(message)
        what: Happened = Happened.HANDLED
        error: BaseException | None = None
        result: Any = None
        try:
            slot.deadline = began + self.timeout
            body = self.decode(message)
            result = await self._handler_call(body, message, slot, loop)
        except DecodeError as exc:
            what, error = Happened.INVALID, exc
        except _Duplicate:
            result = _NO_REPLY
        except asyncio.CancelledError as exc:
            what, error = self._cancelled(slot, exc)
        except BaseException as exc:  # anything a handler raises is its failure
            what, error = Happened.FAILED, exc
        slot.deadline = 0.0
        slot.timed_out = False
        slot.call = None  # a def handler's finished future (and its error) is not kept
        if what is Happened.HANDLED and message.reply_to and result is not _NO_REPLY:
            await self._answer(message, result)  # a request: answer, then ack
        try:
            decision = self._decision(what, error, message)
            pending = self._carry_out(message, tracker, decision, error, arrived)
            if pending is not None:
                if self._moves_on(decision):
                    self._confirm_later(message, tracker, pending, arrived)
                else:
                    await pending
        finally:
            # The error's traceback holds this frame and the handler's, and so the error, the
            # message and its body: a cycle only the garbage collector frees, which left large
            # bodies alive well past their delivery (7 of 12 MiB with prefetch 1, measured).
            error = None

    def _handler_call(
        self, body: Any, message: Message, slot: Slot, loop: asyncio.AbstractEventLoop
    ) -> Awaitable[Any]:
        """The handler's run, to await: a plain call (no coroutine frame of its own) because it
        is on every delivery's path."""
        if self.once is not None:
            return self._once(body, message, slot, loop)
        if not self.is_async:
            return self._in_thread(body, message, slot, loop)
        if self.wants_message:
            return self.instance.handle(body, message)  # type: ignore[no-any-return]
        return self.instance.handle(body)  # type: ignore[no-any-return]

    def _moves_on(self, decision: Decision) -> bool:
        """Whether the slot takes its next delivery while this one's copy waits for its confirm:
        for retries and dead letters, unless ``after_handle`` hooks are installed (they run in
        the slot's task and context, where ``before_handle`` set things up)."""
        return isinstance(decision, (Retry, DeadLetter)) and not self._after_hooks

    def _confirm_later(
        self, message: Message, tracker: AckTracker, copy: Awaitable[None], arrived: float
    ) -> None:
        """Carry out a copy's confirm and the original's ack in a task of its own. A storm of
        failures ran at one confirm round trip per slot (about 1,450 failures/s with 10 slots on
        RabbitMQ 3.10, 2 cores) while the broker confirms 6,800-9,000 delayed copies/s sent
        back to back. The delivery stays in flight (prefetch, busy, drain) until it is acked."""
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(
            self._confirmed(message, tracker, copy, arrived)
        )
        self.confirming.add(task)
        task.add_done_callback(self.confirming.discard)

    async def _confirmed(
        self, message: Message, tracker: AckTracker, copy: Awaitable[None], arrived: float
    ) -> None:
        try:
            await copy
        except asyncio.CancelledError:
            # Shutdown past the grace period: not acked, the broker redelivers.
            self._finished(message, Outcome.GIVEN_BACK)
            raise
        except Exception:
            log.exception(
                "unexpected error while publishing a copy; giving the message back",
                extra={**self.log_extra, "message_id": message.message_id},
            )
            self._carry_out(message, tracker, GiveBack(), None, arrived)
        finally:
            self.in_flight -= 1

    def _decision(self, what: Happened, error: BaseException | None, message: Message) -> Decision:
        if what is Happened.HANDLED:
            return decide(what, self.policy)
        if isinstance(error, ClaimedElsewhere):
            return Retry(delay=error.delay, attempt=message.attempt)
        return decide(what, self.policy, attempt=message.attempt, error=error)

    async def _redelivered(self, message: Message, tracker: AckTracker, arrived: float) -> None:
        """Classic queue: count a redelivery (the broker does not) before anything runs, with
        no handler of the process running until the original's ack is on the wire
        (:class:`SettleGate`)."""
        deliveries = _deliveries(message) + 1
        counted = decide(
            Happened.REDELIVERED,
            self.policy,
            deliveries=deliveries,
            delivery_limit=self.delivery_limit,
        )
        crashed = RuntimeError(f"delivered {deliveries - 1} times without an ack (crashed?)")
        gate = self.gate
        gate.step(+1)
        try:
            await gate.quiet()  # a handler that kills the process now leaves no copy behind
            pending = self._carry_out(message, tracker, counted, crashed, arrived)
            if pending is not None:
                await pending
            if self.channel is not None:
                tracker.flush()  # the ack handed to the socket before any handler starts
                await self.channel.flush()
        finally:
            gate.step(-1)

    def _cancelled(
        self, slot: Slot, exc: asyncio.CancelledError
    ) -> tuple[Happened, BaseException | None]:
        """What a CancelledError out of a handler means: the runtime's own cancellation is
        re-raised; a timeout or the handler's own cancellation is a failure like any other."""
        if slot.closing:
            raise exc
        if not slot.timed_out:
            return Happened.FAILED, exc  # the handler's own (e.g. it awaited a cancelled task)
        _uncancel(slot.task)
        if not slot.started:
            return Happened.WAITED, None  # no handler thread came free in time
        return Happened.TIMED_OUT, HandlerTimeout(self.timeout)

    def _carry_out(
        self,
        message: Message,
        tracker: AckTracker,
        decision: Decision,
        error: BaseException | None,
        arrived: float,
    ) -> Awaitable[None] | None:
        """Carry out a decision; an awaitable when a copy must be published first."""
        match decision:
            case Ack():
                tracker.done(message.delivery_tag)
                self._finished(message, Outcome.ACKED)
                return None
            case GiveBack(requeue=requeue, pause=pause):
                if pause:
                    return self._give_back_later(message, tracker, decision)
                if requeue:
                    tracker.requeue(message.delivery_tag)
                else:
                    tracker.reject(message.delivery_tag)
                self._finished(message, Outcome.GIVEN_BACK)
                return None
            case Retry() | DeadLetter() | Recount():
                return self._copy_then_ack(message, tracker, decision, error, arrived)
            case _:
                assert_never(decision)

    def _finished(self, message: Message, outcome: Outcome) -> None:
        """The one place where the final outcome of a delivery is known (and carried out):
        counted and timed (what metrics read, stats.py), then middleware's ``after_handle``,
        once per ``before_handle`` (whose time the message keeps until then)."""
        self.outcomes[outcome] += 1
        began = message._began
        if began:  # set by the slot when there is middleware
            message._began = 0.0
            duration = _clock() - began
            timings = self.timings
            if timings is not None:
                # Timings.observe (stats.py) spelled out, the lag from the slot's clock read:
                # each call or clock read cost 300-800 instructions of the metrics' share of a
                # delivery (callgrind, benchmarks/METRICS.md). tests/unit/test_stats.py holds
                # the two equal. Sub-millisecond handlers skip the bisection.
                handler = timings.handler
                i = (
                    0
                    if duration <= FIRST_HANDLER_BUCKET
                    else bisect_left(HANDLER_BUCKETS, duration)
                )
                handler.counts[i] += 1
                handler.sum += duration
                if not (message._republished or message.redelivered):
                    headers = message.headers
                    sent = headers.get(PUBLISHED_AT_HEADER) if headers else None
                    if isinstance(sent, int) and type(sent) is not bool:
                        lag: float | None = began + self.wall_offset - sent / 1000.0
                    elif message.timestamp:
                        lag = began + self.wall_offset - message.timestamp
                    else:
                        lag = None
                    if lag is not None:
                        lag = lag if lag > 0.0 else 0.0
                        timings.lag.counts[bisect_left(LAG_BUCKETS, lag)] += 1
                        timings.lag.sum += lag
            after_hooks = self._after_hooks
            if after_hooks:
                value = outcome._value_  # .value is a Python-level property: 3x slower
                for hook in after_hooks:  # inline: the per-message path (run_hooks)
                    try:
                        hook(message, value, duration)
                    except Exception:
                        hook_failed(hook, "after_handle")

    async def _give_back_later(
        self, message: Message, tracker: AckTracker, decision: GiveBack
    ) -> None:
        await asyncio.sleep(decision.pause)
        self._carry_out(message, tracker, GiveBack(requeue=decision.requeue), None, 0.0)

    async def _copy_then_ack(
        self,
        message: Message,
        tracker: AckTracker,
        decision: Retry | DeadLetter | Recount,
        error: BaseException | None,
        arrived: float,
    ) -> None:
        """Publish the copy a decision calls for and wait for its confirm, then ack."""
        copy = self._copy(message, decision, error)
        # Wait for the confirm as long as the delivery may be held: under a memory alarm a copy
        # that timed out sooner would still be delivered later, and the original given back
        # with it would double the message on every timeout.
        timeout = max(self.publish_timeout, arrived + self.lease - self.tick)
        try:
            await self.host.publish_copy(copy, timeout)
        except WorkerkitError as exc:
            log.error(
                "could not publish the %s copy (%s); giving the original back",
                outcome_of(decision).value,
                exc,
                extra={**self.log_extra, "message_id": message.message_id},
            )
            if isinstance(exc, Unroutable):
                # The DLQ, the queue's retry binding or a delay exchange was deleted by
                # hand. Given back as it is, the message would fail forever (a nack with
                # requeue counts toward no delivery limit on RabbitMQ 4.3).
                await self.host.redeclare(self.cls)
            after = decide(Happened.COPY_FAILED, self.policy, error=exc)
            pending = self._carry_out(message, tracker, after, exc, arrived)
            if pending is not None:
                await pending
            return
        self._log_copy(message, decision, error)  # once it is true: the copy is confirmed
        if message.reply_to and isinstance(decision, DeadLetter):
            # The caller learns now, not at its timeout; retries in between say nothing.
            await self._answer_error(message, decision, error, copy)
        tracker.done(message.delivery_tag)
        self._finished(message, outcome_of(decision))

    # -- batches -----------------------------------------------------------------------------

    async def _batch_slot(self, slot: Slot) -> None:
        """A slot of a ``batch_size`` worker: collect a batch, handle it, settle each message."""
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
            batch, arrived = await self._collect(loop)
            tracker = self.tracker
            if tracker is None or not batch:
                continue
            self.in_flight += len(batch)
            settled: set[int] = set()
            for message in batch:
                message.queue = self.queue
                if self.middleware:
                    message._began = _clock()
                    run_hooks(self._before_hooks, "before_handle", message)
            try:
                await self._process_batch(batch, arrived, tracker, slot, loop, settled)
            except BaseException:
                if slot.closing:
                    self._cut_short(batch, settled)
                    raise
                log.exception("unexpected error in a batch; giving it back", extra=self.log_extra)
                for message in batch:
                    if message.delivery_tag not in settled:
                        self._carry_out(message, tracker, GiveBack(), None, 0.0)
            finally:
                self.in_flight -= len(batch)
            del batch, message  # an idle slot must not keep its last bodies alive

    def _cut_short(self, batch: list[Message], settled: set[int]) -> None:
        """Shutdown past the grace period cancelled a batch: the broker redelivers what was not
        carried out yet (a settled message may still have been waiting for its copy)."""
        for message in batch:
            if message.delivery_tag not in settled or message._began:
                self._finished(message, Outcome.GIVEN_BACK)

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> tuple[list[Message], list[float]]:
        """Up to ``batch_size`` deliveries, waiting at most ``batch_timeout`` for more."""
        deque, arrivals = self.deque, self.arrivals
        batch: list[Message] = []
        arrived: list[float] = []
        deadline = loop.time() + self.batch_timeout
        while len(batch) < self.batch_size:
            if deque:
                batch.append(deque.popleft())
                arrived.append(arrivals.popleft())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self.stopping:
                break
            fut = loop.create_future()
            self.idle.append(fut)
            await asyncio.wait({fut}, timeout=remaining)
            if not fut.done():
                self.idle.remove(fut)
                fut.cancel()
        return batch, arrived

    async def _process_batch(
        self,
        batch: list[Message],
        arrived: list[float],
        tracker: AckTracker,
        slot: Slot,
        loop: asyncio.AbstractEventLoop,
        settled: set[int],
    ) -> None:
        """Decode each message, hand the valid ones to the handler in one call, then carry out
        one decision per message (``settled`` collects the tags already taken care of)."""
        ok, bodies = await self._admit(batch, arrived, tracker, settled)
        if not ok:
            return
        if self.gate.count:
            await self.gate.open.wait()
        messages = [message for message, _ in ok]
        what, error, failures = Happened.HANDLED, None, {}
        slot.deadline = _clock() + self.timeout
        try:
            result = await self._call(bodies, messages, slot, loop)
            failures = failures_of(result, len(ok))
        except asyncio.CancelledError as exc:
            what, error = self._cancelled(slot, exc)
        except BaseException as exc:  # the whole batch failed: each message on its own
            what, error = Happened.FAILED, exc
        slot.deadline = 0.0
        slot.timed_out = False
        slot.call = None  # a def handler's finished future (and its error) is not kept
        try:
            await self._settle_batch(ok, what, error, failures, tracker, settled)
        finally:
            error = None  # no cycle through the error's traceback (see _process)

    async def _admit(
        self, batch: list[Message], arrived: list[float], tracker: AckTracker, settled: set[int]
    ) -> tuple[list[tuple[Message, float]], list[Any]]:
        """The batch's messages that go to the handler, with their bodies; the others (a
        classic queue's redeliveries, invalid bodies) are carried out here."""
        pending: list[Awaitable[None]] = []
        ok: list[tuple[Message, float]] = []
        bodies: list[Any] = []
        for message, when in zip(batch, arrived, strict=True):
            if message.redelivered and self.classic:
                settled.add(message.delivery_tag)
                pending.append(self._redelivered(message, tracker, when))
                continue
            if message.exchange != self.exchange:
                self._restore_route(message)
            try:
                bodies.append(self.decode(message))
            except DecodeError as exc:  # never reaches the handler; the DLQ says why
                settled.add(message.delivery_tag)
                invalid = decide(Happened.INVALID, self.policy)
                done = self._carry_out(message, tracker, invalid, exc, when)
                if done is not None:
                    pending.append(done)
                continue
            ok.append((message, when))
        if pending:
            await asyncio.gather(*pending)
        return ok, bodies

    async def _settle_batch(
        self,
        ok: list[tuple[Message, float]],
        what: Happened,
        error: BaseException | None,
        failures: dict[int, BaseException],
        tracker: AckTracker,
        settled: set[int],
    ) -> None:
        """One decision per message of a handled batch: its own failure, the whole batch's, or
        handled (a request among them is answered first)."""
        pending: list[Awaitable[None]] = []
        try:
            for i, (message, when) in enumerate(ok):
                item_error = failures.get(i, error)
                if item_error is None and what is Happened.HANDLED:
                    if message.reply_to:
                        await self._answer(message, None)
                    decision: Decision = decide(Happened.HANDLED, self.policy)
                else:
                    item_what = what if what is not Happened.HANDLED else Happened.FAILED
                    decision = decide(
                        item_what, self.policy, attempt=message.attempt, error=item_error
                    )
                settled.add(message.delivery_tag)
                done = self._carry_out(message, tracker, decision, item_error, when)
                if done is not None:
                    pending.append(done)
            if pending:
                await asyncio.gather(*pending)
        finally:
            error = item_error = None  # no cycle through the error's traceback (see _process)

    # -- idempotent handlers -----------------------------------------------------------------

    async def _call(
        self, body: Any, message: Any, slot: Slot, loop: asyncio.AbstractEventLoop
    ) -> Any:
        """Run the handler: ``message`` is a Message, or a list of them for a batch."""
        if not self.is_async:
            return await self._in_thread(body, message, slot, loop)
        if self.wants_message:
            return await self.instance.handle(body, message)
        return await self.instance.handle(body)

    async def _once(
        self, body: Any, message: Message, slot: Slot, loop: asyncio.AbstractEventLoop
    ) -> Any:
        """Claim the key, run the handler, commit; release the claim if the handler failed."""
        store = self.once
        assert store is not None
        key = f"{self.queue}:{self.instance.idempotency_key(body, message)}"
        token = new_message_id()
        claim, left = await store.claim(key, token, self.claim_ttl)
        if claim is Claim.DONE:
            self.duplicates += 1
            log.info(
                "duplicate of a handled message (key %s); acked without running",
                key,
                extra={**self.log_extra, "message_id": message.message_id},
            )
            raise _Duplicate
        if claim is Claim.BUSY:
            # Running elsewhere (look again soon), or claimed by a process that died (its claim
            # expires in ``left``). Not an attempt: the handler did not run.
            raise ClaimedElsewhere(key, min(max(left, 0.1), max(1.0, self.policy.delay)))
        try:
            result = await self._call(body, message, slot, loop)
        except BaseException:
            if self.pool is not None and slot.timed_out and slot.started:
                # A def handler past its time limit keeps running in its thread (a thread cannot
                # be stopped): keep the claim, which expires CLAIM_MARGIN later, not at once.
                raise
            try:
                await store.release(key, token)
            except Exception as exc:  # the claim expires on its own
                log.error("could not release the claim of %s: %s", key, exc, extra=self.log_extra)
            raise
        try:
            if not await store.commit(key, token, self.cls.idempotency_ttl):
                log.warning(
                    "the claim of %s expired before the handler returned; a duplicate may have"
                    " run meanwhile",
                    key,
                    extra=self.log_extra,
                )
        except Exception as exc:
            # The work is done: ack it. The claim expires after claim_ttl; a redelivery after
            # that would run the handler again.
            log.error("could not commit %s: %s", key, exc, extra=self.log_extra)
        return result

    # -- replies to requests -----------------------------------------------------------------

    async def _answer(self, message: Message, value: Any) -> None:
        """Reply to a request with the handler's return value."""
        try:
            reply = reply_to_request(message, value, self.max_body_size)
        except InvalidMessage as exc:  # cannot be encoded, or too large: the caller hears why
            why = _short(str(exc), MAX_ERROR_MESSAGE)
            reply = error_reply(message, _qualified(exc), why, INVALID_REPLY)
        await self._send_reply(message, reply)

    async def _answer_error(
        self,
        message: Message,
        decision: DeadLetter,
        error: BaseException | None,
        dead: Outgoing | None = None,
    ) -> None:
        """Tell a request's caller that it will not be answered (rejected, exhausted...); a
        request without a message id is named as the DLQ tools list its dead letter ``dead``."""
        reply = error_reply(
            message,
            _qualified(error) if error is not None else "unknown",
            _short(str(error), MAX_ERROR_MESSAGE) if error is not None else "",
            decision.reason,
            None if message.message_id or dead is None else content_key(dead.body, dead.headers),
        )
        await self._send_reply(message, reply)

    async def _send_reply(self, message: Message, reply: Outgoing) -> None:
        """A reply that cannot be delivered is logged and counted; the request never retries
        for it (the handler's work is done)."""
        try:
            await self.host.publish_reply(reply, self.publish_timeout)
        except WorkerkitError as exc:
            self.replies_failed += 1
            log.warning(
                "could not deliver the reply to %s (%s); the caller will time out",
                message.reply_to,
                exc,
                extra={**self.log_extra, "message_id": message.message_id},
            )
            return
        self.replies_sent += 1

    # -- plain def handlers ------------------------------------------------------------------

    def _in_thread(
        self, body: Any, message: Any, slot: Slot, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[Any]:
        """Run a plain ``def`` handler in the pool; the future settles on the loop.

        Not ``run_in_executor``: that wakes the loop once per finished handler. Here finished
        handlers queue their outcome and only the first of a batch wakes the loop. The handler's
        time limit starts when a thread picks it up; until then it may wait ``max_wait``.
        """
        assert self.pool is not None
        fut: asyncio.Future[Any] = loop.create_future()
        args = (body, message) if self.wants_message else (body,)
        slot.started = False
        slot.call = fut
        slot.deadline = _clock() + self.max_wait
        job = [fut, args, slot, loop]  # emptied by the thread (see _call_handler)
        if self.middleware:  # hooks may set context (a trace span) the handler must see
            run = contextvars.copy_context().run
            self.pool.submit(run, self._call_handler, job)
        else:
            self.pool.submit(self._call_handler, job)
        return fut

    def _call_handler(self, job: list[Any]) -> None:
        """In a pool thread. A handler's error keeps its traceback's frames, and they link back
        to the pool's work item (which holds ``job``) and to this frame: holding neither the
        future nor the error, they cannot keep the failure, and with it the delivery's body,
        alive in a cycle that only the garbage collector frees."""
        fut: asyncio.Future[Any]
        args: tuple[Any, ...]
        slot: Slot
        loop: asyncio.AbstractEventLoop
        fut, args, slot, loop = job
        job.clear()
        if fut.cancelled():
            return  # timed out or shut down before it started: never run it late
        slot.deadline = _clock() + self.timeout  # a float store: safe from this thread
        slot.started = True
        error: BaseException | None = None
        result: Any = None
        try:
            result = self.instance.handle(*args)
        except BaseException as exc:  # handed to the loop like run_in_executor would
            error = exc
        with self._finished_lock:
            self._finished_calls.append((fut, result, error))
            first = len(self._finished_calls) == 1
        del fut, error, args, slot  # see above
        if first:
            loop.call_soon_threadsafe(self._settle_finished)

    def _settle_finished(self) -> None:
        with self._finished_lock:
            finished, self._finished_calls = self._finished_calls, []
        for fut, result, error in finished:
            if fut.cancelled():
                if fut in self._abandoned:  # a timed-out handler's thread is free again
                    self._abandoned.discard(fut)
                    self.stuck_threads -= 1
                continue
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

    # -- the watchdog ------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Cancel handlers past their deadline; give back deliveries that waited too long.

        Until torn down (``_tear_down`` cancels it): a handler past its time limit while the
        worker drains is timed out and retried as at any other time, not left to run out the
        grace period."""
        interval = min(1.0, max(0.05, min(self.timeout, self.max_wait) / 10))
        while True:
            await asyncio.sleep(interval)
            now = self.tick = _clock()
            self.wall_offset = _wall() - now
            for slot in self.slots:
                if slot.deadline and now >= slot.deadline and not slot.timed_out:
                    self._time_out(slot)
            self._give_back_waited(now)

    def _time_out(self, slot: Slot) -> None:
        slot.timed_out = True
        call = slot.call
        if self.pool is not None and slot.started and call is not None and not call.done():
            # The thread keeps running the handler: count it until it returns.
            self._abandoned.add(call)
            self.stuck_threads += 1
            if self.stuck_threads >= self.concurrency:
                log.error(
                    "every handler thread is stuck in a handler past its time limit",
                    extra=self.log_extra,
                )
        slot.task.cancel()

    def _give_back_waited(self, now: float) -> None:
        tracker, deque, arrivals = self.tracker, self.deque, self.arrivals
        if tracker is None:
            return
        given = 0
        while arrivals and now - arrivals[0] > self.max_wait:
            message = deque.popleft()
            arrivals.popleft()
            self._carry_out(message, tracker, decide(Happened.WAITED, self.policy), None, 0.0)
            given += 1
        if given:
            log.warning(
                "gave back %d deliveries that waited over %.0fs for a slot (the broker's"
                " consumer_timeout counts from delivery); consider a lower prefetch",
                given,
                self.max_wait,
                extra=self.log_extra,
            )

    # -- copies ------------------------------------------------------------------------------

    def _copy(
        self, message: Message, decision: Retry | DeadLetter | Recount, error: BaseException | None
    ) -> Outgoing:
        match decision:
            case Retry(delay=delay, attempt=attempt):
                headers = self._failure_headers(message, error)
                headers[Header.ATTEMPT] = attempt
                exchange, routing_key = self.host.topology.retry_route(self.queue, delay)
            case DeadLetter(reason=reason):
                headers = self._failure_headers(message, error)
                headers[Header.REASON] = reason
                headers[Header.ATTEMPT] = message.attempt
                exchange, routing_key = "", Topology.dlq_name(self.queue)
            case Recount(deliveries=deliveries):
                self._restore_route(message)
                headers = _clean_headers(message.headers)
                headers[Header.DELIVERIES] = deliveries
                # Delivered again from ("", queue): keep the route the handler must see.
                headers.setdefault(Header.ORIGINAL_EXCHANGE, message.exchange)
                headers.setdefault(Header.ORIGINAL_ROUTING_KEY, message.routing_key)
                exchange, routing_key = "", self.queue
            case _:
                assert_never(decision)
        return Outgoing.copy_of(message, exchange, routing_key, headers)

    def _log_copy(
        self, message: Message, decision: Retry | DeadLetter | Recount, error: BaseException | None
    ) -> None:
        extra = {**self.log_extra, "message_id": message.message_id, "attempt": message.attempt}
        what = f"{type(error).__name__}: {_short(str(error), 200)}"
        if isinstance(decision, Retry) and isinstance(error, ClaimedElsewhere):
            # Not a failure: the handler did not run, and no attempt is counted.
            log.info("%s; looking again in %.1fs", error, decision.delay, extra=extra)
        elif isinstance(decision, Retry):
            log.warning("handler failed (%s); retrying in %.1fs", what, decision.delay, extra=extra)
        elif isinstance(decision, DeadLetter):
            log.error("dead-lettered (%s): %s", decision.reason, what, extra=extra)

    def _restore_route(self, message: Message) -> None:
        """Show the handler the exchange and routing key a message was published with: out of
        the delay layout (retried, scheduled) or counted again on a classic queue."""
        topology = self.host.topology
        if topology.is_delayed(message.exchange):
            message._republished = True
            message.exchange, message.routing_key = topology.original_route(
                message.routing_key, message.headers
            )
            message.headers = _clean_headers(message.headers)
        elif (
            message.exchange == ""
            and message.routing_key == self.queue
            and Header.DELIVERIES in message.headers
        ):
            headers = message.headers
            message._republished = True
            message.exchange = str(headers.get(Header.ORIGINAL_EXCHANGE, ""))
            message.routing_key = str(headers.get(Header.ORIGINAL_ROUTING_KEY, self.queue))

    def _failure_headers(self, message: Message, exc: BaseException | None) -> dict[str, Any]:
        now = _utc_now()
        headers = _clean_headers(message.headers)
        headers.setdefault(Header.FIRST_FAILURE, now)
        headers[Header.LAST_FAILURE] = now
        if exc is not None:
            headers[Header.ERROR_TYPE] = _qualified(exc)
            headers[Header.ERROR_MESSAGE] = _short(str(exc), MAX_ERROR_MESSAGE)
            headers[Header.TRACEBACK] = _short(
                "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                MAX_TRACEBACK,
            )
        headers.setdefault(Header.ORIGINAL_EXCHANGE, message.exchange)
        headers.setdefault(Header.ORIGINAL_ROUTING_KEY, message.routing_key)
        headers[Header.QUEUE] = self.queue
        return headers


class ClaimedElsewhere(Exception):
    """An idempotent worker's key is claimed by another delivery: look again after ``delay``
    seconds, without counting an attempt."""

    def __init__(self, key: str, delay: float) -> None:
        super().__init__(f"key {key} is claimed by another delivery")
        self.delay = delay


class _Duplicate(Exception):
    """An idempotent worker's key is already done: ack without running."""


_NO_REPLY: Any = object()


def _qualified(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _deliveries(message: Message) -> int:
    count = message.headers.get(Header.DELIVERIES, 1)
    return count if isinstance(count, int) and not isinstance(count, bool) else 1


def _clean_headers(headers: Any) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if k not in BROKER_DEATH_HEADERS}


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "... [truncated]"
