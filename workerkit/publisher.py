"""Publishers: :class:`AsyncPublisher` for asyncio code and :class:`Publisher` for everything else.

Both are thin fronts on one core, :class:`_Core`: the body is encoded by
``message.build_outgoing``, published persistent and ``mandatory`` on a confirm channel, and a
publish returns only once the broker confirmed it. A lost connection is retried (tenacity,
jittered) within the publish timeout, and everything a publish does (connecting, opening the
channel, declaring the delay layout) fits inside that timeout; past it a typed error is raised.
A message that cannot be encoded raises InvalidMessage before anything is sent.

:class:`Publisher` runs the core on a private event loop (``workerkit._shared_loop``): any number
of threads can publish at once and their confirms are in flight together. After ``fork()`` the
child gets a fresh connection on first use (the parent's socket is never touched).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar, overload

import tenacity

from ._shared_loop import Settle, SharedLoop
from .compression import Compression
from .errors import (
    AccessRefused,
    ConnectionFailed,
    InvalidMessage,
    PublishError,
    PublishTimeout,
    RequestTimeout,
    WorkerkitError,
)
from .message import Message, Outgoing, build_outgoing, check_compression, new_message_id
from .middleware import Middleware, check_middleware, observed_publish, publish_started
from .reply import DIRECT_REPLY_TO, decode_reply
from .retry import AnyThreadRetrying
from .settings import Settings, load_settings
from .topology import MAX_DELAY, Topology
from .transport import default_transport
from .transport.base import Channel, Connection, OnPublished, Transport
from .worker import MAX_ROUTED_NAME

__all__ = ["AsyncPublisher", "Publisher", "allow_sync_publishes_on", "refuse_sync_publishes_on"]

log = logging.getLogger("workerkit.publisher")

#: What ``request(..., reply_type=T)`` returns: a reply validated into ``T``.
_R = TypeVar("_R")

# publish_many keeps at most this many confirms outstanding at once.
WINDOW = 1000


class _Core:
    """What both publishers do, on the event loop that owns the connection.

    One publish path: :meth:`submit` sends on the open channel with a plain callback (no
    coroutine, task or future per message: most of what a publish would otherwise cost), and
    falls back to connecting (with retries, within the deadline) only when it must.
    """

    def __init__(
        self,
        settings: Settings,
        transport: Transport | None,
        middleware: tuple[Middleware, ...] = (),
        compression: str | None = None,
    ) -> None:
        self.settings = settings
        self.compression = compression if compression is not None else settings.compression
        check_compression(self.compression, settings.compress_min_size)
        self.middleware = middleware  # publish hooks; empty means one check per publish
        self._transport = transport if transport is not None else default_transport()
        self._topology = Topology(settings)
        self._connection: Connection | None = None
        self._channel: Channel | None = None
        self._lock: asyncio.Lock | None = None
        self._delays_declared = False
        self._closed = False
        self._last_error: ConnectionFailed | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        # Requests: the reply consumer (direct reply-to) of the current channel, and the
        # requests waiting for a reply by correlation id.
        self._reply_channel: Channel | None = None
        self._reply_tag = ""
        self._reply_generation = 0
        self._requests: dict[str, _Request] = {}
        self.replies_dropped = 0  # late (timed out) or unknown replies
        self.connection_name = "workerkit-publisher"  # as the broker lists it

    # -- pure: safe from any thread ----------------------------------------------------------

    def limit(self, timeout: float | None) -> float:
        if timeout is None:
            return self.settings.publish_timeout
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise InvalidMessage(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        return float(timeout)

    def message(
        self,
        routing_key: str,
        body: object,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        delay: float | None = None,
        expiration: float | None = None,
        priority: int | None = None,
    ) -> Outgoing:
        """Encode and route a message; InvalidMessage if it cannot be sent as given."""
        if delay and expiration is not None:
            # The delay queues would expire it early and route it on at once (the broker drops
            # the expiration when it dead-letters): never what was asked for.
            raise InvalidMessage("a message cannot have both a delay and an expiration")
        message = build_outgoing(
            self.settings.exchange,
            routing_key,
            body,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            max_body_size=self.settings.max_body_size,
            expiration=expiration,
            priority=priority,
            compression=self.compression,
            compress_min_size=self.settings.compress_min_size,
        )
        if delay is None:
            return message
        if not (
            isinstance(delay, int | float)
            and not isinstance(delay, bool)  # delay=True is no number of seconds
            and math.isfinite(delay)
            and delay >= 0
        ):
            raise InvalidMessage(f"delay must be a finite number of seconds >= 0, got {delay!r}")
        if delay > MAX_DELAY:
            raise InvalidMessage(f"delay {delay}s is above the longest delay, {MAX_DELAY:.0f}s")
        if delay > 0:
            exchange, key = self._topology.scheduled_route(routing_key, delay)
            if len(key.encode()) > 255:
                raise InvalidMessage(
                    f"a delayed message's routing key must be at most {MAX_ROUTED_NAME} bytes"
                )
            message.exchange, message.routing_key = exchange, key
        return message

    # -- on the loop -------------------------------------------------------------------------

    def submit(self, message: Outgoing, limit: float, on_done: OnPublished) -> None:
        """Publish ``message``; ``on_done(error or None)`` runs once, on the loop, within
        ``limit`` seconds (plus at most the transport's timeout sweep)."""
        self._attempt(message, time.monotonic() + limit, limit, on_done, retry=False)

    async def publish(self, message: Outgoing, limit: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle(error: BaseException | None) -> None:
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

        self.submit(message, limit, settle)
        await fut

    def _attempt(
        self,
        message: Outgoing,
        deadline: float,
        limit: float,
        on_done: OnPublished,
        retry: bool,
        request: _Request | None = None,
    ) -> None:
        if request is not None and request.answered:
            return  # failed meanwhile (its connection was lost, its deadline passed)
        channel = self._channel
        delayed = message.exchange != self.settings.exchange
        if (
            retry
            or channel is None
            or not channel.is_open
            or (delayed and not self._delays_declared)
            or (request is not None and not self._replies_on(channel))
        ):
            self._keep(self._connect_then(message, deadline, limit, on_done, retry, request))
            return

        def on_confirm(error: BaseException | None) -> None:
            if isinstance(error, ConnectionFailed) and not isinstance(error, AccessRefused):
                self._forget(channel, error)
                if time.monotonic() < deadline:
                    self._attempt(message, deadline, limit, on_done, True, request)
                    return
                error = PublishTimeout(f"could not publish within {limit}s: {error}")
            on_done(error)

        remaining = max(0.001, deadline - time.monotonic())
        if request is not None:
            request.generation = self._reply_generation  # its reply comes to this consumer
        channel.publish_nowait(message, mandatory=True, timeout=remaining, on_done=on_confirm)

    async def _connect_then(
        self,
        message: Outgoing,
        deadline: float,
        limit: float,
        on_done: OnPublished,
        retry: bool,
        request: _Request | None = None,
    ) -> None:
        """Connect (and declare the delay layout, start the reply consumer, if needed) within
        the deadline, then publish."""
        delayed = message.exchange != self.settings.exchange
        try:
            if retry:  # a channel just failed under this publish: do not hammer the broker
                await asyncio.sleep(min(random.uniform(0.05, 0.2), _left(deadline)))
            await self._ready(
                deadline, limit, "publish", delays=delayed, replies=request is not None
            )
        except Exception as exc:
            on_done(exc)
            return
        except BaseException:
            on_done(PublishError("the publish was cancelled"))
            raise
        self._attempt(message, deadline, limit, on_done, False, request)

    async def _ready(
        self, deadline: float, limit: float, what: str, *, delays: bool, replies: bool = False
    ) -> None:
        """An open channel (and the delay layout, if ``delays``) by ``deadline``.

        Lost or refused connections are retried; every RPC is inside the deadline, so a publish
        with a 10 s timeout never takes 40 s on a broker that accepts but does not answer.
        """
        try:
            await asyncio.wait_for(
                self._connect_retrying(deadline, delays, replies), _left(deadline)
            )
        except AccessRefused:
            raise  # credentials or permissions: retrying cannot help, and it is not a timeout
        except (ConnectionFailed, asyncio.TimeoutError) as exc:
            cause = self._last_error or exc
            words = f": {cause}" if str(cause) else f": {self._silence()}"
            raise PublishTimeout(f"could not {what} within {limit}s{words}") from None

    def _silence(self) -> str:
        """Why a deadline passed with no error to name: no connection yet, or no answer on one."""
        if self._channel is None:
            return "no connection to the broker yet (it did not answer the connect in time)"
        return "the broker did not answer"

    async def _connect_retrying(self, deadline: float, delays: bool, replies: bool) -> None:
        async for attempt in self._retrying(deadline):
            with attempt:
                channel = await self._channel_before(deadline)
                if delays and not self._delays_declared:
                    if self._connection is not None:  # an old .unroutable: keep it as it is
                        await self._topology.adopt_dead_letter_queues(self._connection)
                    await self._topology.declare_exchanges(channel)
                    self._delays_declared = True
                if replies:
                    await self._start_replies(channel)

    def _retrying(self, deadline: float) -> tenacity.AsyncRetrying:
        """Jittered retries of a lost or refused connection until ``deadline``."""
        backoff = tenacity.wait_random_exponential(multiplier=0.1, max=2.0)
        return AnyThreadRetrying(
            # Never sleep past the deadline: the caller was promised an answer by then.
            wait=lambda state: min(backoff(state), _left(deadline)),
            stop=lambda _state: time.monotonic() >= deadline,
            retry=tenacity.retry_if_exception_type(ConnectionFailed)
            & tenacity.retry_if_not_exception_type(AccessRefused),
            reraise=True,
        )

    def _forget(self, channel: Channel, error: BaseException | None = None) -> None:
        if isinstance(error, ConnectionFailed):
            self._last_error = error
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
                # Replies to requests sent on the old channel would reach nobody once it is
                # closed (a channel retired after a nack ends without telling anyone).
                self._replies_lost(
                    self._reply_channel, ConnectionFailed("the channel was replaced")
                )
                self._close_later(old)
            settings = self.settings
            remaining = _left(deadline)
            if remaining < settings.connect_timeout:
                settings = settings.model_copy(update={"connect_timeout": max(remaining, 0.001)})
            try:
                connection = await self._transport.connect(
                    settings, name=self.connection_name, on_lost=self._on_lost
                )
            except ConnectionFailed as exc:
                self._last_error = exc
                raise
            self._last_error = None
            try:
                channel = await connection.channel(
                    confirms=True, on_closed=lambda error: self._channel_closed(channel, error)
                )
                await channel.declare_exchange(self._topology.main_exchange())
            except BaseException:
                self._close_later(connection)  # never wait past the deadline to tidy up
                raise
            self._connection, self._channel = connection, channel
            self._delays_declared = False
            return channel

    def _close_later(self, connection: Connection) -> None:
        self._keep(_quietly_close(connection))

    def _keep(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that is referenced until done (asyncio keeps only weak ones)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_lost(self, error: Exception) -> None:
        log.warning("publisher connection lost: %s", error)
        self._channel = None
        self._replies_lost(self._reply_channel, error)

    def _channel_closed(self, channel: Channel | None, error: Exception) -> None:
        """The broker closed ``channel`` (the connection may live on)."""
        if channel is not None:
            self._forget(channel, error)
            self._replies_lost(channel, error)

    # -- requests (direct reply-to) ----------------------------------------------------------

    def _replies_on(self, channel: Channel) -> bool:
        """Whether ``channel`` has its reply consumer (a local check)."""
        return self._reply_channel is channel and channel.has_consumer(self._reply_tag)

    async def _start_replies(self, channel: Channel) -> None:
        """Consume ``amq.rabbitmq.reply-to`` on ``channel`` (once: concurrent callers wait)."""
        if self._replies_on(channel):
            return
        assert self._lock is not None  # made by _channel_before
        async with self._lock:
            if self._replies_on(channel):
                return
            tag = await channel.consume(
                DIRECT_REPLY_TO,
                self._on_reply,
                lambda: self._replies_lost(channel, ConnectionFailed("the reply consumer ended")),
                no_ack=True,
            )
            self._reply_generation += 1
            self._reply_channel, self._reply_tag = channel, tag

    def _replies_lost(self, channel: Channel | None, error: Exception) -> None:
        """The reply consumer on ``channel`` is gone: fail the requests sent through it.

        Their replies would go to an address nobody consumes any more. Requests not sent yet
        (connecting) go on, through the next channel's consumer.
        """
        if channel is None or channel is not self._reply_channel:
            return
        self._reply_channel, self._reply_tag = None, ""
        generation = self._reply_generation
        lost = [r for r in self._requests.values() if r.generation == generation]
        for request in lost:
            request.answer(
                ConnectionFailed(
                    f"the connection was lost while waiting for the reply ({error}); the"
                    " request may or may not have been handled"
                ),
                None,
            )

    def _on_reply(self, reply: Message) -> None:
        request = self._requests.get(reply.correlation_id or "")
        if request is None:
            # A reply after its request timed out (or to an id this publisher never sent):
            # dropped, never handed to another caller.
            self.replies_dropped += 1
            log.info(
                "dropped a reply nobody waits for (correlation id %r; late after a timeout?)",
                reply.correlation_id,
            )
            return
        request.answer(None, reply)

    def request(self, message: Outgoing, limit: float) -> _Request:
        """Send ``message`` (with ``reply_to`` and ``correlation_id`` set by
        :func:`_request_message`) and return its :class:`_Request`, on the loop."""
        loop = asyncio.get_running_loop()
        request = _Request(self._requests, message.properties.correlation_id or "")
        self._requests[request.correlation_id] = request
        request.timer = loop.call_later(limit, self._expire, request, limit)
        deadline = time.monotonic() + limit
        self._attempt(message, deadline, limit, request.published, False, request)
        return request

    def _expire(self, request: _Request, limit: float) -> None:
        """The request's time is up: a request never confirmed says why it was not sent (an
        unreachable broker is not a silent worker), a confirmed one that no reply came."""
        if request.confirmed:
            request.answer(RequestTimeout(f"no reply within {limit}s"), None)
            return
        cause = self._last_error
        if cause is not None:
            words = f": {cause}"
        elif self._channel is None:
            words = f": {self._silence()}"
        else:
            words = ": the broker did not confirm it"
        request.answer(
            PublishTimeout(f"could not publish the request within {limit}s{words}"), None
        )

    async def connect(self, limit: float) -> None:
        await self._ready(time.monotonic() + limit, limit, "connect", delays=False)

    async def close(self) -> None:
        self._closed = True
        for request in list(self._requests.values()):
            request.answer(PublishError("the publisher was closed before the reply came"), None)
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await connection.close()
        # Tidying of failed connections (_close_later): finished, or cancelled, not left pending
        # for the interpreter to report at exit ("Task was destroyed but it is pending").
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks), timeout=1.0)
            for task in pending:
                task.cancel()

    def _answered(self, message: Outgoing, on_done: OnPublished) -> OnPublished:
        """``on_done``, preceded by the publish hooks' ``after_publish`` when there are any."""
        if not self.middleware:
            return on_done
        finished = publish_started(self.middleware, message)

        def answered(error: BaseException | None) -> None:
            finished(error)
            on_done(error)

        return answered

    async def publish_many(
        self, items: Iterable[tuple[str, object]], *, delay: float | None, limit: float
    ) -> list[str]:
        """Publish pairs in order with up to WINDOW confirms in flight; stop at the first error.

        Nothing is created per item up front: items are encoded and sent as the window allows,
        so a million of them cost a window's worth of memory (plus the returned ids).
        """
        ids: list[str] = []
        pairs = iter(items)
        first = next(pairs, None)
        if first is None:
            return ids
        # The first goes alone: it connects (and declares the delay exchanges), so the rest all
        # take the connected path and leave in order.
        try:
            message = self.message(first[0], first[1], delay=delay)
        except WorkerkitError as exc:  # cannot be sent (InvalidMessage)
            raise _stopped(exc, 0, {}) from None
        try:
            if self.middleware:
                with observed_publish(self.middleware, message):
                    await self.publish(message, limit)
            else:
                await self.publish(message, limit)
        except WorkerkitError as exc:
            raise _stopped(exc, 1, {0: exc}) from None
        ids.append(message.message_id)
        window = _Window(WINDOW)
        try:
            for routing_key, body in pairs:
                await window.room()
                if window.errors:
                    break
                message = self.message(routing_key, body, delay=delay)
                window.taken()
                self.submit(message, limit, self._answered(message, window.answer_for(len(ids))))
                ids.append(message.message_id)
        except WorkerkitError as exc:  # an item that cannot be sent (InvalidMessage)
            await window.drained()
            # The first error by position: a publish before this item may have failed too.
            earliest = window.errors[min(window.errors)] if window.errors else exc
            raise _stopped(earliest, len(ids), window.errors) from None
        finally:
            await window.drained()
        if window.errors:
            raise _stopped(window.errors[min(window.errors)], len(ids), window.errors)
        return ids


class _Unset:
    """Nothing known yet."""


_UNSET = _Unset()


class _Request:
    """One request waiting for its publish confirm and its reply, on the publisher's loop.

    Each outcome is delivered to a callback registered with :meth:`when_published` /
    :meth:`when_answered`, whichever of the two comes first (a reply may beat its confirm);
    :meth:`when_settled` hears both at once, when the second of them is in.
    """

    __slots__ = (
        "_on_answer",
        "_on_published",
        "_on_settled",
        "_pending",
        "correlation_id",
        "generation",
        "outcome",
        "publish_error",
        "timer",
    )

    def __init__(self, pending: dict[str, _Request], correlation_id: str) -> None:
        self._pending = pending
        self.correlation_id = correlation_id
        self.generation = -1  # the reply consumer it was sent through (-1: not sent yet)
        self.timer: asyncio.TimerHandle | None = None
        self.publish_error: BaseException | _Unset | None = _UNSET
        self.outcome: tuple[BaseException | None, Message | None] | _Unset = _UNSET
        self._on_published: OnPublished | None = None
        self._on_answer: Settle | None = None
        self._on_settled: Settle | None = None

    @property
    def answered(self) -> bool:
        return not isinstance(self.outcome, _Unset)

    def published(self, error: BaseException | None) -> None:
        if not isinstance(self.publish_error, _Unset):
            return
        self.publish_error = error
        if error is not None:
            self.answer(error, None)  # no reply will come
        if self._on_published is not None:
            self._on_published(error)
        self._settle()

    def answer(self, error: BaseException | None, reply: Message | None) -> None:
        if self.answered:
            return
        self.outcome = (error, reply)
        if self._pending.get(self.correlation_id) is self:
            del self._pending[self.correlation_id]
        if self.timer is not None:
            self.timer.cancel()
        if error is not None:
            # Failed before its confirm came (timed out, connection lost): a caller waiting for
            # the confirm hears it too, and a retry of the publish stops (see _Core._attempt).
            self.published(error)
        if self._on_answer is not None:
            self._on_answer(error, reply)
        self._settle()

    @property
    def confirmed(self) -> bool:
        return self.publish_error is None

    def when_published(self, callback: OnPublished) -> None:
        if isinstance(self.publish_error, _Unset):
            self._on_published = callback
        else:
            callback(self.publish_error)

    def when_answered(self, callback: Settle) -> None:
        if isinstance(self.outcome, _Unset):
            self._on_answer = callback
        else:
            callback(*self.outcome)

    def when_settled(self, callback: Settle) -> None:
        """``callback(error, reply)`` once, when both the confirm and the reply are in, or at
        the first failure; a publish error wins over a reply that beat its confirm, exactly
        as when the caller waits for the confirm first and then for the reply.

        One wait instead of two in a row: the caller's thread or task is woken once per
        request, not once for the confirm and again for the reply.
        """
        self._on_settled = callback
        self._settle()

    def _settle(self) -> None:
        callback = self._on_settled
        if callback is None or isinstance(self.publish_error, _Unset):
            return
        outcome = self.outcome
        if isinstance(outcome, _Unset):
            return
        self._on_settled = None
        if self.publish_error is not None:
            callback(self.publish_error, None)
        else:
            callback(*outcome)


def _stopped(error: BaseException, sent: int, errors: Mapping[int, BaseException]) -> BaseException:
    """``error``, the one ``publish_many`` raises, told what was sent and what failed."""
    if isinstance(error, WorkerkitError):
        error.sent = sent
        error.unconfirmed = tuple(sorted(errors))
    return error


class _Window:
    """Publishes in flight, at most ``size``; remembers which ones failed, by position."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.flying = 0
        self.errors: dict[int, BaseException] = {}
        self._changed = asyncio.Event()

    def taken(self) -> None:
        self.flying += 1

    def answer_for(self, position: int) -> OnPublished:
        def answered(error: BaseException | None) -> None:
            self.flying -= 1
            if error is not None:
                self.errors[position] = error
            self._changed.set()

        return answered

    async def room(self) -> None:
        while self.flying >= self.size and not self.errors:
            self._changed.clear()
            await self._changed.wait()

    async def drained(self) -> None:
        while self.flying:
            self._changed.clear()
            await self._changed.wait()


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def _quietly_close(connection: Connection) -> None:
    with contextlib.suppress(WorkerkitError):
        await connection.close()


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
        middleware: Sequence[Middleware] = (),
        compression: Compression | None = None,
    ) -> None:
        self.settings = load_settings(settings, url)
        self.middleware = check_middleware(middleware, "AsyncPublisher")
        self._core = _Core(self.settings, transport, self.middleware, compression)

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
        await self._core.connect(self._core.limit(timeout))

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
        expiration: float | None = None,
        priority: int | None = None,
    ) -> str:
        """Publish and wait for the broker's confirm; returns the message id.

        ``delay`` (seconds) holds the message in the broker's delay queues first.
        ``expiration`` (seconds, >= 0) is the message's TTL: not consumed by then, a worker
        queue dead-letters it (reason ``expired``); it cannot be combined with ``delay``.
        ``priority`` (0-255) orders it on a queue with ``max_priority``. Raises
        :class:`Unroutable` when no queue is bound, :class:`PublishTimeout` when no confirm came
        within ``timeout`` (default ``Settings.publish_timeout``, retries and connecting
        included), :class:`InvalidMessage` (before anything is sent) for a message that cannot
        be sent as given, :class:`MessageTooLarge` for a body above ``max_body_size``.
        """
        core = self._core
        limit = core.limit(timeout)
        message = core.message(
            routing_key,
            body,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            delay=delay,
            expiration=expiration,
            priority=priority,
        )
        if self.middleware:  # the hooks run in the caller's context (a trace from a handler)
            with observed_publish(self.middleware, message):
                await core.publish(message, limit)
        else:
            await core.publish(message, limit)
        return message.message_id

    async def publish_many(
        self,
        items: Iterable[tuple[str, object]],
        *,
        delay: float | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        """Publish ``(routing_key, body)`` pairs in order with many confirms in flight; returns
        their ids.

        Stops sending at the first error and raises it (the first by position) once the
        publishes in flight are answered. Up to 1,000 items after the failed one were on their
        way by then and are confirmed as usual. The error says which: ``error.sent`` items, from
        the first, were sent, and of those ``error.unconfirmed`` (positions) were not
        confirmed; to carry on, send those again and the items from ``error.sent`` on.
        ``items`` may be any iterable, read as it goes.
        """
        return await self._core.publish_many(items, delay=delay, limit=self._core.limit(timeout))

    @overload
    async def request(
        self,
        routing_key: str,
        body: object,
        *,
        timeout: float | None = None,
        reply_type: type[_R],
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        expiration: float | None = None,
        priority: int | None = None,
    ) -> _R: ...

    @overload
    async def request(
        self,
        routing_key: str,
        body: object,
        *,
        timeout: float | None = None,
        reply_type: object = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        expiration: float | None = None,
        priority: int | None = None,
    ) -> Any: ...

    async def request(
        self,
        routing_key: str,
        body: object,
        *,
        timeout: float | None = None,
        reply_type: object = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        expiration: float | None = None,
        priority: int | None = None,
    ) -> Any:
        """Send a request and wait for its reply; returns the reply's value.

        The request is published like :meth:`publish` (confirmed, mandatory) with ``reply_to``
        RabbitMQ's direct reply-to and a fresh ``correlation_id``; the worker's return value
        comes back. Without ``reply_type`` the reply is decoded as JSON (Python values), text
        (``str``) or ``bytes`` by its content type (``None`` for an empty reply); with it, it is
        validated into that type (:class:`DecodeError` if it does not fit).

        Raises :class:`RemoteError` when the worker gave up on the request (rejected,
        exhausted, invalid body), :class:`RequestTimeout` when it was confirmed but no reply
        came within ``timeout`` (default ``Settings.publish_timeout``: connecting and
        publishing included), :class:`PublishTimeout` with the cause when it could not even be
        published and confirmed in that time (an unreachable broker), :class:`Unroutable` at
        once when no queue takes the request, :class:`ConnectionFailed` when the channel it
        was sent on was lost before the reply came (a lost connection, or a channel retired
        after the broker nacked a publish on it).
        """
        core = self._core
        limit = core.limit(timeout)
        message = _request_message(
            core, routing_key, body, headers, message_id, expiration, priority
        )
        request = core.request(message, limit)
        try:
            if self.middleware:
                reply = await self._observed_request(request, message)
            else:
                settled: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
                request.when_settled(_settle_future(settled))
                reply = await settled
        finally:
            request.answer(PublishError("the request was cancelled"), None)  # if still waiting
        return decode_reply(reply, reply_type, self.settings.max_body_size)

    async def _observed_request(self, request: _Request, message: Outgoing) -> Message:
        """The reply to ``request``, with the publish hooks around its publish and confirm
        (they run in this task, apart from the wait for the reply)."""
        loop = asyncio.get_running_loop()
        published: asyncio.Future[None] = loop.create_future()
        answered: asyncio.Future[Message] = loop.create_future()
        request.when_published(_settle_future(published))
        request.when_answered(_settle_future(answered))
        try:
            with observed_publish(self.middleware, message):
                await published
            return await answered
        finally:
            request.answer(PublishError("the request was cancelled"), None)  # if still waiting
            if answered.done() and not answered.cancelled():
                answered.exception()  # a publish failure is in both futures: raised once

    @property
    def replies_dropped(self) -> int:
        """Replies that came after their request timed out (or to an unknown id): dropped."""
        return self._core.replies_dropped

    async def close(self) -> None:
        await self._core.close()


# Loops that must never block on a sync publish (the runner's: blocking it stalls every consumer,
# heartbeat and ack of the process for up to the publish timeout), with how many runners use each.
_async_only: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()


def refuse_sync_publishes_on(loop: asyncio.AbstractEventLoop) -> None:
    """Make a sync :class:`Publisher` called on ``loop``'s thread, while it runs, raise."""
    _async_only[loop] = _async_only.get(loop, 0) + 1


def allow_sync_publishes_on(loop: asyncio.AbstractEventLoop) -> None:
    """Undo one :func:`refuse_sync_publishes_on` (the runner calls it once it has stopped)."""
    left = _async_only.get(loop, 0) - 1
    if left > 0:
        _async_only[loop] = left
    else:
        _async_only.pop(loop, None)


def _check_calling_thread() -> None:
    running = asyncio._get_running_loop()
    if running is not None and running in _async_only:
        raise PublishError(
            "Publisher blocks its caller, and this thread runs the worker's event loop: in an"
            " async handler (or an async test running workers on its loop) use AsyncPublisher"
            " (await publisher.publish(...)), or make the handler a plain def (it then runs in"
            " a thread)"
        )


_live: weakref.WeakSet[Publisher] = weakref.WeakSet()


class Publisher:
    """Confirmed publishing from synchronous code: thread-safe and fork-safe.

    ``publisher = Publisher()`` at module level, then ``publisher.publish("orders.placed", order)``
    from any thread; it returns the message id once the broker confirmed. Calling it from a
    coroutine on a workerkit runner's loop raises :class:`PublishError` (it would stall the
    worker); use :class:`AsyncPublisher` there.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        transport: Transport | None = None,
        middleware: Sequence[Middleware] = (),
        compression: Compression | None = None,
    ) -> None:
        self.settings = load_settings(settings, url)
        self._transport = transport  # None: RabbitMQ (pika); a MemoryTransport in tests
        self.middleware = check_middleware(middleware, "Publisher")
        self.compression = compression if compression is not None else self.settings.compression
        check_compression(self.compression, self.settings.compress_min_size)
        self._guard = threading.Lock()
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._guard = threading.Lock()
        self._shared: SharedLoop | None = None
        self._core: _Core | None = None
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
        expiration: float | None = None,
        priority: int | None = None,
    ) -> str:
        """Publish and block until the broker confirmed; see :meth:`AsyncPublisher.publish`."""
        _check_calling_thread()
        core, shared = self._ensure()
        limit = core.limit(timeout)
        message = core.message(
            routing_key,
            body,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
            delay=delay,
            expiration=expiration,
            priority=priority,
        )

        def start(settle: Settle) -> None:
            core.submit(message, limit, lambda error: settle(error, None))

        if self.middleware:  # the hooks run in the calling thread and its context
            with observed_publish(self.middleware, message):
                shared.call(start, limit + 5)
        else:
            shared.call(start, limit + 5)
        return message.message_id

    def publish_many(
        self,
        items: Iterable[tuple[str, object]],
        *,
        delay: float | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        """Publish many ``(routing_key, body)`` pairs; see :meth:`AsyncPublisher.publish_many`.

        ``items`` is read on the publisher's loop thread as the window allows.
        """
        _check_calling_thread()
        core, shared = self._ensure()
        limit = core.limit(timeout)

        # The hooks run on the loop thread here: carry the caller's context (a trace) there.
        context = contextvars.copy_context()

        def start(settle: Settle) -> None:
            coro = core.publish_many(items, delay=delay, limit=limit)
            _settle_when_done(context.run(asyncio.ensure_future, coro), settle)

        # Each message has its own deadline; the batch as a whole gets no extra one.
        ids: list[str] = shared.call(start, None)
        return ids

    @overload
    def request(
        self,
        routing_key: str,
        body: object,
        *,
        timeout: float | None = None,
        reply_type: type[_R],
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        expiration: float | None = None,
        priority: int | None = None,
    ) -> _R: ...

    @overload
    def request(
        self,
        routing_key: str,
        body: object,
        *,
        timeout: float | None = None,
        reply_type: object = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        expiration: float | None = None,
        priority: int | None = None,
    ) -> Any: ...

    def request(
        self,
        routing_key: str,
        body: object,
        *,
        timeout: float | None = None,
        reply_type: object = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        expiration: float | None = None,
        priority: int | None = None,
    ) -> Any:
        """Send a request and block until its reply; see :meth:`AsyncPublisher.request`.

        Any number of threads may wait on requests at once: they share one reply consumer.
        """
        _check_calling_thread()
        core, shared = self._ensure()
        limit = core.limit(timeout)
        message = _request_message(
            core, routing_key, body, headers, message_id, expiration, priority
        )

        # The request carries its own deadline: the extra 5 s bound only a stuck loop.
        if self.middleware:
            # The hooks run in this thread around the publish and its confirm: two waits.
            def send(settle: Settle) -> None:
                request = core.request(message, limit)
                request.when_published(lambda error: settle(error, request))

            with observed_publish(self.middleware, message):
                request: _Request = shared.call(send, limit + 5)
            reply: Message = shared.call(request.when_answered, limit + 5)
        else:
            # One wait for the confirm and the reply: the loop is driven (or this thread
            # woken) once per request, not stopped at the confirm and started again.
            reply = shared.call(
                lambda settle: core.request(message, limit).when_settled(settle), limit + 5
            )
        return decode_reply(reply, reply_type, self.settings.max_body_size)

    @property
    def replies_dropped(self) -> int:
        """Replies that came after their request timed out (or to an unknown id): dropped."""
        core = self._core
        return core.replies_dropped if core is not None else 0

    def close(self) -> None:
        """Close the connection and stop the housekeeping thread (idempotent)."""
        with self._guard:
            if self._pid != os.getpid() or self._closed:
                return
            self._closed = True
            shared, core = self._shared, self._core
        if shared is None or core is None:
            return
        try:
            shared.call(
                lambda settle: _settle_when_done(asyncio.ensure_future(core.close()), settle), 10
            )
        except Exception as exc:  # closing is best effort; the broker cleans up after us
            log.debug("closing the publisher: %s", exc)
        shared.stop(10)

    def _ensure(self) -> tuple[_Core, SharedLoop]:
        if self._pid != os.getpid():
            self._reset()  # forked: the parent's connection and threads are not ours
        core, shared = self._core, self._shared
        if core is not None and shared is not None and not self._closed:
            return core, shared
        with self._guard:
            if self._closed:
                raise PublishError("publisher is closed")
            if self._core is None or self._shared is None:
                # pika sends a heartbeat every heartbeat/2 seconds when the loop runs: an idle
                # publisher's loop must run well within that.
                heartbeat = self.settings.heartbeat or 4
                interval = min(1.0, max(0.05, heartbeat / 4))
                self._shared = SharedLoop(interval)
                self._core = _Core(
                    self.settings, self._transport, self.middleware, self.compression
                )
            return self._core, self._shared


def _request_message(
    core: _Core,
    routing_key: str,
    body: object,
    headers: Mapping[str, Any] | None,
    message_id: str | None,
    expiration: float | None,
    priority: int | None,
) -> Outgoing:
    """A request: the message with direct reply-to and a fresh correlation id."""
    return core.message(
        routing_key,
        body,
        headers=headers,
        message_id=message_id,
        correlation_id=new_message_id(),
        reply_to=DIRECT_REPLY_TO,
        expiration=expiration,
        priority=priority,
    )


def _settle_future(fut: asyncio.Future[Any]) -> Callable[..., None]:
    """A callback ``(error, value=None)`` that settles ``fut`` once."""

    def settle(error: BaseException | None, value: Any = None) -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(value)
        else:
            fut.set_exception(error)

    return settle


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
