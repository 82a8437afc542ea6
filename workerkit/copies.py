"""Retry, dead-letter and recount copies, published so that an alarm cannot multiply them.

Under a memory or disk alarm RabbitMQ stops reading what a connection publishes (and tells it so
with ``connection.blocked`` after the first publish). A copy sent then is neither confirmed nor
refused: it waits in the connection and is routed once the alarm clears, however long ago the
runtime stopped waiting and gave its original back. The original is delivered again, fails again
and wants the same copy again; with a copy of its own each time, one failing message became one
copy per consumer timeout of alarm (per publish timeout, before the lease), each climbing the
retry ladder into the DLQ. Two rules keep it within at-least-once (one extra copy per delivery in
flight and fault):

* **Nothing is sent on a blocked connection.** A copy waits for the broker to unblock the
  connection within the caller's time; if it does not, :class:`PublishTimeout` is raised with
  nothing sent, so the original goes back and no copy exists that could arrive later.
* **A copy sent is not sent twice.** One whose confirm does not come in time stays pending with
  the transport (until the broker answers, the connection is lost, or ``HORIZON`` seconds), and
  the same copy wanted again (same message id and body, same destination, attempt, reason and
  delivery count) waits for that one instead of sending another. A confirmed one that was waited
  for in vain is remembered for ``KEEP`` seconds, for an original that comes back just after.

Copies of messages without a message id are never matched: nothing tells two of them apart.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from .errors import ConnectionFailed, PublishTimeout
from .message import Header, Outgoing
from .transport.base import Channel, Connection

__all__ = ["HORIZON", "KEEP", "Copies", "identity"]

# Seconds the transport waits for a pending copy's confirm: an alarm lasts as long as it lasts,
# and what is pending is bounded by the deliveries in flight when the connection was blocked
# (nothing is sent after). An alarm longer than this may cost one more copy of each.
HORIZON = 3600.0

# Seconds a confirmed copy that was waited for in vain is remembered: long enough for its original,
# given back when the wait ended, to be delivered again and ask for it.
KEEP = 60.0

Key = tuple[str, ...]


def identity(copy: Outgoing) -> Key | None:
    """What makes two copies the same copy: the message id, where it goes and which step of the
    message's life it is. None without a message id."""
    props = copy.properties
    if not props.message_id:
        return None
    headers = props.headers
    # A retry's routing key and entry exchange carry its delay, jittered anew on every run: the
    # worker queue header says where it goes. The DLQ and recount copies go to ("", queue).
    direct = copy.exchange == ""
    route = copy.routing_key if direct else headers.get(Header.QUEUE)
    return (
        props.message_id,
        "" if direct else "delayed",
        str(route),
        str(headers.get(Header.ATTEMPT)),
        str(headers.get(Header.REASON)),
        str(headers.get(Header.DELIVERIES)),
    )


def _digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


class _Pending:
    """One copy sent and not yet answered (or answered and kept for ``KEEP``)."""

    __slots__ = ("body", "digest", "done", "waited_in_vain")

    def __init__(self, body: bytes, done: asyncio.Future[None]) -> None:
        self.body: bytes | None = body  # while the transport holds the copy anyway
        self.digest: bytes | None = None  # once answered: the body is let go
        self.done = done
        self.waited_in_vain = False

    def same_body(self, body: bytes) -> bool:
        if self.body is not None:
            return self.body == body
        return self.digest == _digest(body)


class Copies:
    """Publishes copies on the runner's publish channel under the two rules above."""

    def __init__(self, horizon: float = HORIZON, keep: float = KEEP) -> None:
        self.horizon = horizon  # how long the transport waits for a copy's confirm at most
        self.keep = keep
        self._pending: dict[Key, _Pending] = {}

    async def publish(
        self, connection: Connection, channel: Channel, copy: Outgoing, timeout: float
    ) -> None:
        """Confirmed publish of ``copy`` within ``timeout`` seconds; PublishTimeout if not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        key = identity(copy)
        entry = self._pending.get(key) if key is not None else None
        if entry is not None and not entry.same_body(copy.body):
            entry, key = None, None  # another message with the same id: a copy of its own
        if entry is None:
            if connection.blocked and not await connection.wait_unblocked(timeout):
                raise PublishTimeout(
                    f"the broker has blocked publishing (memory or disk alarm) for {timeout:.1f}s;"
                    " the copy was not sent"
                )
            entry = self._send(channel, copy, key, max(timeout, self.horizon))
        error = await _answer(entry, max(0.0, deadline - loop.time()), timeout)
        # A refusal raised from here holds this frame in its traceback, and the entry's future
        # holds the refusal: without the entry no cycle keeps the error, the caller's delivery
        # and its body alive until the garbage collector runs (asyncio.wait_for made one too).
        del entry
        if error is None:
            return
        try:
            raise error
        finally:
            error = None

    def _send(self, channel: Channel, copy: Outgoing, key: Key | None, limit: float) -> _Pending:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = _Pending(copy.body, done)

        def answered(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        if key is not None and key not in self._pending:
            self._pending[key] = entry
            done.add_done_callback(lambda _f: self._answered(key, entry))
        else:
            done.add_done_callback(_retrieve)
        channel.publish_nowait(copy, mandatory=True, timeout=limit, on_done=answered)
        return entry

    def _answered(self, key: Key, entry: _Pending) -> None:
        done = entry.done
        confirmed = not done.cancelled() and done.exception() is None  # retrieves the error
        body, entry.body = entry.body, None
        if confirmed and entry.waited_in_vain and body is not None:
            # Its original went back: when it comes again, it finds its copy confirmed.
            entry.digest = _digest(body)
            asyncio.get_running_loop().call_later(self.keep, self._forget, key, entry)
        else:
            self._forget(key, entry)

    def _forget(self, key: Key, entry: _Pending) -> None:
        if self._pending.get(key) is entry:
            del self._pending[key]


async def _answer(entry: _Pending, timeout: float, asked: float) -> BaseException | None:
    """The broker's answer to a pending copy within ``timeout``: None (confirmed) or the error;
    PublishTimeout when it did not come (the copy stays pending). ``asked``: the caller's whole
    time, for the message."""
    done = entry.done
    if not done.done():
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        done.add_done_callback(wake)
        timer = loop.call_later(timeout, wake)
        try:
            await woken
        finally:
            timer.cancel()
            done.remove_done_callback(wake)
    if not done.done():
        entry.waited_in_vain = True
        raise PublishTimeout(
            f"no confirm from the broker within {asked:.1f}s; the copy stays pending and is"
            " not sent again while it may still arrive"
        )
    if done.cancelled():
        return ConnectionFailed("the copy's publish was cancelled")
    return done.exception()


def _retrieve(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()  # read, so that an unawaited failure is not reported as lost
