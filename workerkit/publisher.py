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
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import tenacity

from .errors import (
    AccessRefused,
    ConnectionFailed,
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
        """Open the connection now instead of on the first publish."""
        deadline = time.monotonic() + (timeout or self.settings.publish_timeout)
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

        Raises the first error; the other messages, before and after it, may already be
        confirmed (they are published concurrently; publishing them again is safe under
        at-least-once delivery).
        """
        window = asyncio.Semaphore(WINDOW)

        async def one(routing_key: str, body: object) -> str:
            async with window:
                return await self.publish(routing_key, body, delay=delay, timeout=timeout)

        return list(await asyncio.gather(*(one(rk, body) for rk, body in items)))

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
                raise ValueError(f"delay {delay}s is above the longest delay, {MAX_DELAY:.0f}s")
            if len(routing_key) > 190:
                raise ValueError("a delayed message's routing key must be at most 190 bytes")
            message.exchange, message.routing_key = self._topology.scheduled_route(
                routing_key, delay
            )
        return message

    def _submit(
        self, message: Outgoing, limit: float, result: concurrent.futures.Future[None]
    ) -> None:
        """On the loop thread: publish and settle ``result`` with the confirm.

        Connected, this is a plain callback (no coroutine or task per message, which is most
        of what a hand-off from another thread costs); otherwise it takes the retrying path.
        """
        channel = self._channel
        delayed = message.exchange != self.settings.exchange
        if channel is None or not channel.is_open or (delayed and not self._delays_declared):
            _settle_with(asyncio.ensure_future(self._send(message, limit)), result)
            return
        started = time.monotonic()
        confirm = channel.publish_nowait(message, mandatory=True, timeout=limit)

        def settle(done: asyncio.Future[None]) -> None:
            error = done.exception()
            if isinstance(error, ConnectionFailed) and not isinstance(error, AccessRefused):
                self._forget(channel)
                remaining = limit - (time.monotonic() - started)
                _settle_with(asyncio.ensure_future(self._send(message, remaining)), result)
            else:
                _resolve(result, error)

        confirm.add_done_callback(settle)

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
        backoff = tenacity.wait_random_exponential(multiplier=0.1, max=2.0)
        retrying = tenacity.AsyncRetrying(
            # Never sleep past the deadline: the caller was promised an answer by then.
            wait=lambda state: min(backoff(state), max(0.0, deadline - time.monotonic())),
            stop=_StopAt(deadline),
            retry=tenacity.retry_if_exception_type(ConnectionFailed)
            & tenacity.retry_if_not_exception_type(AccessRefused),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    channel = await self._channel_before(deadline)
                    if delayed and not self._delays_declared:
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
        except AccessRefused:
            raise  # credentials or permissions: retrying cannot help, and it is not a timeout
        except ConnectionFailed as exc:
            cause = self._last_error or exc
            raise PublishTimeout(f"could not publish within {limit}s: {cause}") from exc

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


def _settle_with(task: asyncio.Future[None], result: concurrent.futures.Future[None]) -> None:
    """Copy the outcome of ``task`` into the thread-safe ``result`` when it is done."""

    def copy(done: asyncio.Future[None]) -> None:
        if done.cancelled():
            result.cancel()
        else:
            _resolve(result, done.exception())

    task.add_done_callback(copy)


def _resolve(result: concurrent.futures.Future[None], error: BaseException | None) -> None:
    # The caller may have given up (and cancelled) already; its answer no longer matters.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            result.set_exception(error)
        else:
            result.set_result(None)


class _StopAt(tenacity.stop.stop_base):
    """Stop retrying once the publish deadline has passed."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return time.monotonic() >= self.deadline


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
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
        publisher, loop = self._ensure()
        # Encoding happens here, in the caller's thread; the I/O thread only sends.
        message = publisher._outgoing(
            routing_key, body, headers, message_id, correlation_id, reply_to, delay
        )
        limit = timeout if timeout is not None else self.settings.publish_timeout
        confirmed: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop.call_soon_threadsafe(publisher._submit, message, limit, confirmed)
        self._wait(confirmed, limit + 5)
        return message.message_id

    def publish_many(
        self,
        items: Iterable[tuple[str, object]],
        *,
        delay: float | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        """Publish many ``(routing_key, body)`` pairs with their confirms in flight together."""
        publisher, loop = self._ensure()
        coro = publisher.publish_many(list(items), delay=delay, timeout=timeout)
        # Each message has its own deadline; the batch as a whole gets no extra one.
        ids: list[str] = self._wait(asyncio.run_coroutine_threadsafe(coro, loop), None)
        return ids

    def close(self) -> None:
        """Close the connection and stop the I/O thread (idempotent)."""
        with self._guard:
            if self._pid != os.getpid() or self._closed:
                return
            self._closed = True
            loop, thread, publisher = self._loop, self._thread, self._async
        if loop is None or thread is None or publisher is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(publisher.close(), loop).result(10)
        except Exception as exc:  # closing is best effort; the broker cleans up after us
            log.debug("closing the publisher: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    @staticmethod
    def _wait(future: concurrent.futures.Future[Any], limit: float | None) -> Any:
        """The coroutine's result; ``limit`` only guards against a wedged I/O thread."""
        try:
            return future.result(limit)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise PublishTimeout(f"no confirm within {limit}s") from None

    def _ensure(self) -> tuple[AsyncPublisher, asyncio.AbstractEventLoop]:
        if self._pid != os.getpid():
            self._reset()  # forked: the parent's connection and thread are not ours
        publisher, loop = self._async, self._loop
        if publisher is not None and loop is not None and not self._closed:
            return publisher, loop
        with self._guard:
            if self._closed:
                raise PublishError("publisher is closed")
            if self._async is None or self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = threading.Thread(
                    target=_serve, args=(loop, ready), name="workerkit-publisher", daemon=True
                )
                thread.start()
                ready.wait()
                self._async = AsyncPublisher(settings=self.settings)
                self._loop, self._thread = loop, thread
            return self._async, self._loop


def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    try:
        loop.run_forever()
    finally:
        loop.close()


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
