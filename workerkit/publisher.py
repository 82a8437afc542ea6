"""Publishers: :class:`AsyncPublisher` for asyncio code and :class:`Publisher` for everything else.

Both share one core: the body is encoded by ``message.build_outgoing``, published persistent and
``mandatory`` on a confirm channel, and a publish returns only once the broker confirmed it. A lost
connection is retried (tenacity, jittered) within the publish timeout; past it a typed error is
raised. Nothing here waits without a deadline.

:class:`Publisher` runs one :class:`AsyncPublisher` on a private event-loop thread: any number of
threads can publish at once and their confirms are in flight together. After ``fork()`` the child
gets a fresh connection on first use (the parent's socket is never touched).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import selectors
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import tenacity

from .errors import (
    AccessRefused,
    ConnectionFailed,
    InvalidMessage,
    PublishError,
    PublishTimeout,
    WorkerkitError,
)
from .message import Outgoing, build_outgoing
from .settings import Settings, load_settings
from .topology import MAX_DELAY, Topology
from .transport.base import Channel, Connection, Transport

__all__ = ["AsyncPublisher", "Publisher"]

log = logging.getLogger("workerkit.publisher")

# publish_many keeps at most this many confirms outstanding at once.
WINDOW = 1000

# What a loop-side operation reports back: (error, value).
Settle = Callable[[BaseException | None, Any], None]


class AsyncPublisher:
    """Confirmed, persistent, mandatory publishing from asyncio code.

    ``async with AsyncPublisher() as p: await p.publish("orders.placed", order)``. Connects on first
    use; safe to share between tasks of one event loop.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.settings = load_settings(settings, url)
        if transport is None:
            from .transport.pika_asyncio import PikaTransport

            transport = PikaTransport()
        self._transport = transport
        self._topology = Topology(self.settings)
        self._connection: Connection | None = None
        self._channel: Channel | None = None
        self._lock: asyncio.Lock | None = None
        self._delays_declared = False
        self._closed = False
        self._last_error: ConnectionFailed | None = None

    async def __aenter__(self) -> AsyncPublisher:
        await self.connect()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float | None = None) -> None:
        """Open the connection now instead of on the first publish.

        Retried like a publish within ``timeout`` (default ``Settings.publish_timeout``): past
        it :class:`PublishTimeout`; refused credentials raise :class:`AccessRefused` at once.
        """
        limit = timeout if timeout is not None else self.settings.publish_timeout
        deadline = time.monotonic() + limit
        with self._timeout_after(limit, "connect"):
            async for attempt in self._retrying(deadline):
                with attempt:
                    await self._channel_before(deadline)

    async def publish(
        self,
        routing_key: str,
        body: object,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        delay: float | None = None,
        timeout: float | None = None,
    ) -> str:
        """Publish and wait for the broker's confirm; returns the message id.

        ``delay`` (seconds) holds the message in the broker's delay queues first. Raises
        :class:`Unroutable` when no queue is bound, :class:`PublishTimeout` when no confirm came
        within ``timeout`` (default ``Settings.publish_timeout``, retries included),
        :class:`MessageTooLarge` for a body above ``max_body_size``.
        """
        message = self._outgoing(
            routing_key, body, headers, message_id, correlation_id, reply_to, delay
        )
        await self._send(message, timeout)
        return message.message_id

    async def publish_many(
        self,
        items: Iterable[tuple[str, object]],
        *,
        delay: float | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        """Publish ``(routing_key, body)`` pairs with many confirms in flight; returns their ids.

        They are sent in the list's order. Raises the first error; the other messages, before
        and after it, may already be confirmed (they are published concurrently; publishing
        them again is safe under at-least-once delivery).
        """
        batch = list(items)
        if not batch:
            return []
        # The first goes alone: it connects (and declares the delay exchanges), so the rest all
        # take the connected path and leave in order, not in the order they got the connection.
        first = await self.publish(*batch[0], delay=delay, timeout=timeout)
        window = asyncio.Semaphore(WINDOW)

        async def one(routing_key: str, body: object) -> str:
            async with window:
                return await self.publish(routing_key, body, delay=delay, timeout=timeout)

        rest = await asyncio.gather(*(one(rk, body) for rk, body in batch[1:]))
        return [first, *rest]

    async def close(self) -> None:
        self._closed = True
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await connection.close()

    # -- internals ---------------------------------------------------------------------------

    def _outgoing(
        self,
        routing_key: str,
        body: object,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        correlation_id: str | None,
        reply_to: str | None,
        delay: float | None,
    ) -> Outgoing:
        """Encode and route a message (pure: safe to call from any thread)."""
        message = build_outgoing(
            self.settings.exchange,
            routing_key,
            body,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            max_body_size=self.settings.max_body_size,
        )
        if delay is not None and delay > 0:
            if delay > MAX_DELAY:
                raise InvalidMessage(f"delay {delay}s is above the longest delay, {MAX_DELAY:.0f}s")
            if len(routing_key) > 190:
                raise InvalidMessage("a delayed message's routing key must be at most 190 bytes")
            message.exchange, message.routing_key = self._topology.scheduled_route(
                routing_key, delay
            )
        return message

    def _submit(self, message: Outgoing, limit: float, settle: Settle) -> None:
        """On the loop: publish, then ``settle(error)`` once the broker answered.

        Connected, this is a plain callback (no coroutine or task per message, which is most
        of what a publish from another thread would otherwise cost); else the retrying path.
        """
        channel = self._channel
        delayed = message.exchange != self.settings.exchange
        if channel is None or not channel.is_open or (delayed and not self._delays_declared):
            _settle_when_done(asyncio.ensure_future(self._send(message, limit)), settle)
            return
        started = time.monotonic()

        def on_confirm(error: BaseException | None) -> None:
            if isinstance(error, ConnectionFailed) and not isinstance(error, AccessRefused):
                self._forget(channel)
                remaining = limit - (time.monotonic() - started)
                _settle_when_done(asyncio.ensure_future(self._send(message, remaining)), settle)
            else:
                settle(error, None)

        channel.publish_nowait(message, mandatory=True, timeout=limit, on_done=on_confirm)

    async def _send(self, message: Outgoing, timeout: float | None) -> None:
        limit = timeout if timeout is not None else self.settings.publish_timeout
        deadline = time.monotonic() + limit
        delayed = message.exchange != self.settings.exchange
        channel = self._channel
        if channel is not None and channel.is_open and (self._delays_declared or not delayed):
            # The usual case: connected, so publish without setting up the retry machinery.
            try:
                await channel.publish(message, mandatory=True, timeout=limit)
                return
            except ConnectionFailed:
                self._forget(channel)
        with self._timeout_after(limit, "publish"):
            async for attempt in self._retrying(deadline):
                with attempt:
                    channel = await self._channel_before(deadline)
                    if delayed and not self._delays_declared:
                        if self._connection is not None:  # an old .unroutable: keep it
                            await self._topology.adopt_dead_letter_queues(self._connection)
                        await self._topology.declare_exchanges(channel)
                        self._delays_declared = True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise PublishTimeout(f"no confirm within {limit}s")
                    try:
                        await channel.publish(message, mandatory=True, timeout=remaining)
                    except ConnectionFailed:
                        self._forget(channel)
                        raise

    @staticmethod
    def _retrying(deadline: float) -> tenacity.AsyncRetrying:
        """Jittered retries of a lost or refused connection until ``deadline``."""
        backoff = tenacity.wait_random_exponential(multiplier=0.1, max=2.0)
        return tenacity.AsyncRetrying(
            # Never sleep past the deadline: the caller was promised an answer by then.
            wait=lambda state: min(backoff(state), max(0.0, deadline - time.monotonic())),
            stop=_StopAt(deadline),
            retry=tenacity.retry_if_exception_type(ConnectionFailed)
            & tenacity.retry_if_not_exception_type(AccessRefused),
            reraise=True,
        )

    @contextlib.contextmanager
    def _timeout_after(self, limit: float, what: str) -> Iterator[None]:
        """A connection problem that outlived the retries is a PublishTimeout naming its cause."""
        try:
            yield
        except AccessRefused:
            raise  # credentials or permissions: retrying cannot help, and it is not a timeout
        except ConnectionFailed as exc:
            cause = self._last_error or exc
            raise PublishTimeout(f"could not {what} within {limit}s: {cause}") from exc

    def _forget(self, channel: Channel) -> None:
        if self._channel is channel:
            self._channel = None

    async def _channel_before(self, deadline: float) -> Channel:
        channel = self._channel
        if channel is not None and channel.is_open:
            return channel
        if self._closed:
            raise PublishError("publisher is closed")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._channel is not None and self._channel.is_open:
                return self._channel
            if self._connection is not None:
                old, self._connection = self._connection, None
                with contextlib.suppress(WorkerkitError):
                    await old.close()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionFailed("no time left to connect")
            settings = self.settings
            if remaining < settings.connect_timeout:
                settings = settings.model_copy(update={"connect_timeout": remaining})
            try:
                connection = await self._transport.connect(
                    settings, name="workerkit-publisher", on_lost=self._on_lost
                )
            except ConnectionFailed as exc:
                self._last_error = exc
                raise
            self._last_error = None
            try:
                channel = await connection.channel(confirms=True)
                await channel.declare_exchange(self._topology.main_exchange())
            except BaseException:
                await connection.close()
                raise
            self._connection, self._channel = connection, channel
            self._delays_declared = False
            return channel

    def _on_lost(self, error: Exception) -> None:
        log.warning("publisher connection lost: %s", error)
        self._channel = None


def _settle_when_done(task: asyncio.Future[Any], settle: Settle) -> None:
    """Call ``settle`` with the outcome of ``task`` once it is done."""

    def copy(done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            settle(PublishError("the publish was cancelled"), None)
        elif (error := done.exception()) is not None:
            settle(error, None)
        else:
            settle(None, done.result())

    task.add_done_callback(copy)


class _StopAt(tenacity.stop.stop_base):
    """Stop retrying once the publish deadline has passed."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return time.monotonic() >= self.deadline


class _TurnEndSelector(selectors.DefaultSelector):
    """The loop's selector, running ``turn_end`` callbacks just before each poll.

    Before the poll is the end of a turn of the loop: frames queued during the turn go out
    and answered threads are woken there, without a turn (and a poll that lets go of the
    GIL) of their own, and without waking a thread while this one still has work to do.
    """

    def __init__(self) -> None:
        super().__init__()
        self.turn_end: list[Callable[[], object]] = []

    def end_turn(self) -> None:
        while self.turn_end:
            callbacks = self.turn_end[:]
            del self.turn_end[:]
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # one broken callback must not stop the loop or the others
                    log.exception("publisher loop: end-of-turn callback failed")

    def select(self, timeout: float | None = None) -> list[Any]:
        self.end_turn()
        return super().select(timeout)


class _Waiter:
    """One synchronous call waiting for its answer, or for its turn to drive the loop.

    ``wake`` is a lock held from birth: releasing it is the cheapest wake-up CPython has.
    """

    __slots__ = ("can_drive", "done", "error", "promoted", "value", "wake")

    def __init__(self, can_drive: bool) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.can_drive = can_drive
        self.done = False
        self.promoted = False
        self.error: BaseException | None = None
        self.value: Any = None


_HOUSEKEEPER = _Waiter(can_drive=False)  # marks the housekeeping thread as the driver


class _SharedLoop:
    """An event loop driven by the threads that wait on it (leader/follower).

    A thread that calls while nobody drives runs the loop itself until its own answer is in: no
    hand-off to an I/O thread and back, so one thread publishes about as fast as a blocking
    client. Threads that call meanwhile queue their callback and sleep; the loop wakes each
    with its answer, and a driver whose answer is in hands the loop to a waiting thread. A
    housekeeping thread drives when nobody else does: heartbeats while idle, and callers that
    cannot drive because their thread already runs an event loop.
    """

    def __init__(self, housekeeping_interval: float) -> None:
        self._selector = _TurnEndSelector()
        self.loop = asyncio.SelectorEventLoop(self._selector)
        # The pika transport looks for this to send a turn's frames at its end (not next turn).
        self.loop.wk_turn_end = self._selector.turn_end  # type: ignore[attr-defined]
        self._interval = housekeeping_interval
        self._mutex = threading.Lock()
        self._driver: _Waiter | None = None
        self._waiting: dict[_Waiter, None] = {}  # oldest first
        self._inbox: list[tuple[Callable[[Settle], None], _Waiter]] = []
        self._nudge = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._housekeep, name="workerkit-publisher", daemon=True
        )
        self._thread.start()

    def call(self, start: Callable[[Settle], None], limit: float | None) -> Any:
        """Run ``start(settle)`` on the loop; return what it settles with, or raise it.

        ``limit`` bounds only the wait for a loop that another thread drives and that never
        answers; the work itself carries its own deadlines.
        """
        waiter = _Waiter(can_drive=asyncio._get_running_loop() is None)
        with self._mutex:
            if self._stopping:
                raise PublishError("publisher is closed")
            driver = self._driver
            drive = driver is None and waiter.can_drive
            if drive:
                self._driver = waiter
            else:
                self._waiting[waiter] = None
            self._inbox.append((start, waiter))
            first = len(self._inbox) == 1
        if drive:
            if first:
                self.loop.call_soon(self._drain)
            self._drive(waiter)
        else:
            # Under load the loop is awake anyway: one wake-up serves every queued call.
            if first:
                self.loop.call_soon_threadsafe(self._drain)
            if driver is None:
                self._nudge.set()
            elif driver is _HOUSEKEEPER and waiter.can_drive:
                self.loop.call_soon_threadsafe(self.loop.stop)  # let this thread drive instead
            self._follow(waiter, limit)
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    def _drain(self) -> None:
        """On the loop: start every queued call."""
        with self._mutex:
            batch, self._inbox = self._inbox, []
        for start, waiter in batch:
            settle = functools.partial(self._settle, waiter)
            try:
                start(settle)
            except Exception as exc:  # a bug must reach its caller, not hang it
                settle(exc, None)

    def stop(self, timeout: float) -> None:
        """Stop the housekeeping thread and close the loop once nobody waits on it."""
        with self._mutex:
            self._stopping = True
        self._nudge.set()
        self._thread.join(timeout)

    def _settle(self, waiter: _Waiter, error: BaseException | None, value: Any) -> None:
        """On the loop: record the answer and wake whoever waits for it."""
        with self._mutex:
            if waiter.done:
                return  # its caller gave up
            waiter.done = True
            waiter.error, waiter.value = error, value
            self._waiting.pop(waiter, None)
            driver = self._driver
            idle = driver is _HOUSEKEEPER and not self._waiting
        if driver is waiter or idle:
            self.loop.stop()
        if driver is not waiter:
            # Woken now, the thread would fight this one for the GIL at each of its system
            # calls; at the end of the turn this thread is about to block instead.
            self._selector.turn_end.append(waiter.wake.release)

    def _drive(self, waiter: _Waiter) -> None:
        try:
            while not waiter.done:
                self.loop.run_forever()
                self._selector.end_turn()  # stop() ends the loop before its turn's end
        finally:
            waiter.done = True  # interrupted: a late answer is dropped
            self._hand_over()

    def _follow(self, waiter: _Waiter, limit: float | None) -> None:
        try:
            woke = waiter.wake.acquire(timeout=-1 if limit is None else limit)
        except BaseException:  # interrupted: never keep the loop to ourselves
            if not self._withdraw(waiter) and waiter.promoted:
                waiter.done = True
                self._hand_over()
            raise
        if not woke:
            if self._withdraw(waiter):
                raise PublishTimeout(f"no answer within {limit}s: the publisher loop is stuck")
            waiter.wake.acquire()  # answered or promoted just now: the wake-up is due
        if waiter.promoted:
            self._drive(waiter)

    def _withdraw(self, waiter: _Waiter) -> bool:
        """Stop waiting; False if ``waiter`` was answered or handed the loop meanwhile."""
        with self._mutex:
            if waiter.done or waiter.promoted:
                return False
            waiter.done = True
            del self._waiting[waiter]
            return True

    def _hand_over(self) -> None:
        """Pass the loop to the oldest waiting thread that can drive, else to the housekeeper."""
        with self._mutex:
            successor = next((w for w in self._waiting if w.can_drive), None)
            self._driver = successor
            if successor is not None:
                del self._waiting[successor]
                successor.promoted = True
            unattended = successor is None and bool(self._waiting)
        if successor is not None:
            successor.wake.release()
        elif unattended:
            self._nudge.set()

    def _housekeep(self) -> None:
        while True:
            self._nudge.wait(self._interval)
            self._nudge.clear()
            with self._mutex:
                if self._driver is not None:
                    continue
                self._driver = _HOUSEKEEPER
                finished = self._stopping and not self._waiting
                if not self._waiting:
                    self.loop.call_soon(self.loop.stop)  # one pass: timers and heartbeats
            if finished:
                break
            try:
                while True:
                    self.loop.run_forever()
                    self._selector.end_turn()
                    with self._mutex:
                        if not self._waiting or any(w.can_drive for w in self._waiting):
                            break
            finally:
                self._hand_over()
        self.loop.close()


_live: weakref.WeakSet[Publisher] = weakref.WeakSet()


class Publisher:
    """Confirmed publishing from synchronous code: thread-safe and fork-safe.

    ``publisher = Publisher()`` at module level, then ``publisher.publish("orders.placed", order)``
    from any thread; it returns the message id once the broker confirmed.
    """

    def __init__(self, url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = load_settings(settings, url)
        self._guard = threading.Lock()
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._guard = threading.Lock()
        self._shared: _SharedLoop | None = None
        self._async: AsyncPublisher | None = None
        self._closed = False

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def publish(
        self,
        routing_key: str,
        body: object,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        delay: float | None = None,
        timeout: float | None = None,
    ) -> str:
        """Publish and block until the broker confirmed; see :meth:`AsyncPublisher.publish`."""
        core, shared = self._ensure()
        message = core._outgoing(
            routing_key, body, headers, message_id, correlation_id, reply_to, delay
        )
        limit = timeout if timeout is not None else self.settings.publish_timeout
        shared.call(functools.partial(core._submit, message, limit), limit + 5)
        return message.message_id

    def publish_many(
        self,
        items: Iterable[tuple[str, object]],
        *,
        delay: float | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        """Publish many ``(routing_key, body)`` pairs with their confirms in flight together."""
        core, shared = self._ensure()
        batch = list(items)

        def start(settle: Settle) -> None:
            coro = core.publish_many(batch, delay=delay, timeout=timeout)
            _settle_when_done(asyncio.ensure_future(coro), settle)

        # Each message has its own deadline; the batch as a whole gets no extra one.
        ids: list[str] = shared.call(start, None)
        return ids

    def close(self) -> None:
        """Close the connection and stop the housekeeping thread (idempotent)."""
        with self._guard:
            if self._pid != os.getpid() or self._closed:
                return
            self._closed = True
            shared, core = self._shared, self._async
        if shared is None or core is None:
            return
        try:
            shared.call(
                lambda settle: _settle_when_done(asyncio.ensure_future(core.close()), settle), 10
            )
        except Exception as exc:  # closing is best effort; the broker cleans up after us
            log.debug("closing the publisher: %s", exc)
        shared.stop(10)

    def _ensure(self) -> tuple[AsyncPublisher, _SharedLoop]:
        if self._pid != os.getpid():
            self._reset()  # forked: the parent's connection and threads are not ours
        core, shared = self._async, self._shared
        if core is not None and shared is not None and not self._closed:
            return core, shared
        with self._guard:
            if self._closed:
                raise PublishError("publisher is closed")
            if self._async is None or self._shared is None:
                # pika sends a heartbeat every heartbeat/2 seconds when the loop runs: an idle
                # publisher's loop must run well within that.
                heartbeat = self.settings.heartbeat or 4
                interval = min(1.0, max(0.05, heartbeat / 4))
                self._shared = _SharedLoop(interval)
                self._async = AsyncPublisher(settings=self.settings)
            return self._async, self._shared


def _after_fork_in_child() -> None:
    for publisher in list(_live):
        publisher._reset()


@atexit.register
def _close_all() -> None:
    for publisher in list(_live):
        with contextlib.suppress(Exception):  # the interpreter is going away
            publisher.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
