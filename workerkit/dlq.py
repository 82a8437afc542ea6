"""Dead-letter queue tooling: list, show, replay and purge ``<queue>.dlq`` (the API behind
``workerkit dlq``).

Every function takes the *work* queue name (``receipts``; ``receipts.dlq`` is accepted too) and
``settings=`` / ``url=`` like everything else that connects. The async functions have ``*_sync``
twins for scripts and shells.

Guarantees:

* Listing and showing never lose or reorder messages: every message that was in the DLQ when the
  call started is read with manual acks and handed back with ``basic.nack(requeue=True)`` one by
  one in the order it was read. (A quorum queue delivers returned messages first, in the order they
  were returned; closing the channel would return them in reverse, and returning only a prefix
  would rotate the queue.) Each return counts as a delivery on the DLQ, which has no delivery
  limit, so nothing moves.
* Messages are read ahead by a consumer whose prefetch covers the whole count (basic.get costs a
  round trip per message), falling back to ``basic.get`` when the consumer stalls. Returns go back
  in batches of at most ``RETURN_BATCH``, each waited for: RabbitMQ 3.10 applies a larger batch of
  returns to a quorum queue in hash order (over 32 at once came back shuffled here).
* Replay publishes a copy to the work queue and acks the dead message only once the broker
  confirmed *that* copy: a crash in between leaves a duplicate, never a loss. Up to
  ``REPLAY_WINDOW`` copies are in flight at once, in reading order. The copy keeps its body,
  message id and user headers; workerkit's failure headers and attempt count, and the broker's
  death headers, are dropped so the message starts over as a first attempt.
* Replay only looks at the messages that were in the DLQ when it started, so a replayed message
  that fails again and comes back is not replayed a second time in the same call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import orjson

from .errors import ConfigurationError, PublishError, TopologyError, WorkerkitError
from .message import Header, Message, Outgoing
from .settings import Settings, load_settings
from .topology import Topology
from .transport import default_transport
from .transport.base import Channel, Connection, Transport

__all__ = [
    "DeadLetter",
    "ReplayResult",
    "count",
    "count_sync",
    "dlq_of",
    "list_dead",
    "list_dead_sync",
    "purge",
    "purge_sync",
    "replay",
    "replay_sync",
    "show",
    "show_sync",
]

T = TypeVar("T")
Progress = Callable[[int], None]  # the number of messages done so far

log = logging.getLogger("workerkit.dlq")

RETURN_TIMEOUT = 30.0
# Confirms in flight during replay: enough to hide the quorum work queue's commit latency, few
# enough that a failure leaves little to wait for.
REPLAY_WINDOW = 256
# basic.qos prefetch_count is a 16-bit field; a longer DLQ is read on with basic.get.
MAX_READ_AHEAD = 65535
# No delivery for this long while the consumer could take more: finish with basic.get, which
# also tells an emptied queue (another tool took messages since the count) from a slow one.
STALL_TIMEOUT = 1.0
# Returns per batch; 32 is the largest that RabbitMQ 3.10 keeps in order (see the docstring).
RETURN_BATCH = 32

# The quorum DLQ rewrites these on every return (x-acquired-count from RabbitMQ 4.3), so they
# must not count towards a message's identity.
_VOLATILE_HEADERS = frozenset({"x-delivery-count", "x-acquired-count"})
UNROUTABLE_SUFFIX = ".unroutable"


@dataclass(frozen=True)
class DeadLetter:
    """One message in a dead-letter queue, with what workerkit (or the broker) recorded about it."""

    id: str
    reason: str
    error_type: str | None
    error_message: str | None
    traceback: str | None
    attempts: int | None
    first_failure: str | None
    failed_at: str | None
    original_exchange: str | None
    original_routing_key: str | None
    body: bytes
    content_type: str | None
    headers: Mapping[str, Any] = field(repr=False)
    message_id: str | None = None

    def body_preview(self, limit: int = 2000) -> str:
        """The body as readable text: pretty JSON, UTF-8 text, or a bytes repr; cut at ``limit``."""
        text = _readable(self.body, self.content_type)
        return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more]"


@dataclass(frozen=True)
class ReplayResult:
    """Ids put back on the work queue, and the requested ids that were not in the DLQ."""

    replayed: list[str]
    not_found: list[str]


def dlq_of(queue: str) -> str:
    """The dead-letter queue of a work queue. A name already ending in ``.dlq`` is kept, and so
    is ``<exchange>.unroutable``, where scheduled messages that matched no queue wait."""
    if queue.endswith((".dlq", UNROUTABLE_SUFFIX)):
        return queue
    return Topology.dlq_name(queue)


def work_queue_of(queue: str) -> str:
    if queue.endswith(UNROUTABLE_SUFFIX):
        raise ConfigurationError(
            f"{queue!r} holds messages that matched no queue: there is no work queue to replay"
            " them to (read them with `workerkit dlq list/show`, then publish them again)"
        )
    return queue.removesuffix(".dlq")


# -- reading -----------------------------------------------------------------------------------


def dead_letter_from(message: Message, queue: str = "") -> DeadLetter:
    """Interpret a message read from a DLQ (``queue``, else the message's own queue)."""
    queue = queue or message.queue
    headers = _str_keys(message.headers)
    attempts = headers.get(Header.ATTEMPT)
    exchange = _text(headers.get(Header.ORIGINAL_EXCHANGE)) or _text(
        headers.get("x-first-death-exchange")
    )
    # A scheduled message no queue took when it came due, in <exchange>.unroutable: the broker
    # dead-lettered it out of a delay queue ("expired"), under the layout's routing key.
    scheduled = (
        Topology.scheduled_target(_first_death_routing_key(headers) or "")
        if queue.endswith(UNROUTABLE_SUFFIX)
        else None
    )
    routing_key: str | None
    if scheduled is not None:
        reason, routing_key = "unroutable", scheduled
        exchange = queue.removesuffix(UNROUTABLE_SUFFIX)  # the exchange it was published to
    else:
        reason = _reason(headers)
        routing_key = _text(headers.get(Header.ORIGINAL_ROUTING_KEY)) or _first_death_routing_key(
            headers
        )
    return DeadLetter(
        id=message_key(message),
        reason=reason,
        error_type=_text(headers.get(Header.ERROR_TYPE)),
        error_message=_text(headers.get(Header.ERROR_MESSAGE)),
        traceback=_text(headers.get(Header.TRACEBACK)),
        attempts=int(attempts) if isinstance(attempts, int) else None,
        first_failure=_text(headers.get(Header.FIRST_FAILURE)) or _death_time(headers, first=True),
        failed_at=_text(headers.get(Header.LAST_FAILURE)) or _death_time(headers, first=False),
        original_exchange=exchange,
        original_routing_key=routing_key,
        body=message.body,
        content_type=message.content_type,
        headers=headers,
        message_id=message.message_id,
    )


def _str_keys(headers: Mapping[Any, Any]) -> dict[str, Any]:
    """Headers for reading: a key another client sent as non-UTF-8 bytes (the client keeps it as
    ``bytes``) is shown with backslash escapes, so keys sort and print like the others."""
    return {
        key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else str(key): value
        for key, value in headers.items()
    }


def message_key(message: Message) -> str:
    """The message id, or (when a publisher set none) a stable hash of body and headers."""
    return message.message_id or content_key(message.body, message.headers)


def content_key(body: bytes, headers: Mapping[Any, Any]) -> str:
    """``h-<hash>`` of a body and its headers (less the broker's delivery counts): the id the DLQ
    tools show for a dead letter without a message id, and that a request's error reply
    names (runtime: computed from the dead-letter copy it sent)."""
    stable = {k: v for k, v in _str_keys(headers).items() if k not in _VOLATILE_HEADERS}
    digest = hashlib.sha256(body)
    digest.update(orjson.dumps(stable, default=str, option=orjson.OPT_SORT_KEYS))
    return "h-" + digest.hexdigest()[:16]


def _reason(headers: Mapping[str, Any]) -> str:
    reason = _text(headers.get(Header.REASON))
    if reason:
        return reason
    # Dead-lettered by the broker itself: a queue's message_ttl ("expired"), a quorum queue's
    # delivery limit, a nack... The latest death is the one into this DLQ (x-death is most
    # recent first); the first may be an earlier expiry in workerkit's delay queues.
    deaths = _deaths(headers)
    latest = _text(deaths[0].get("reason")) if deaths else None
    broker_reason = latest or _text(headers.get("x-first-death-reason"))
    if broker_reason:
        return broker_reason.replace("_", "-")
    return "unknown"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _deaths(headers: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    deaths = headers.get("x-death")
    return [d for d in deaths if isinstance(d, Mapping)] if isinstance(deaths, list) else []


def _death_time(headers: Mapping[str, Any], *, first: bool) -> str | None:
    # x-death is most recent first.
    deaths = _deaths(headers)
    if not deaths:
        return None
    when = (deaths[-1] if first else deaths[0]).get("time")
    if isinstance(when, datetime):
        return when.isoformat().replace("+00:00", "Z")
    return _text(when)


def _first_death_routing_key(headers: Mapping[str, Any]) -> str | None:
    deaths = _deaths(headers)
    keys = deaths[-1].get("routing-keys") if deaths else None
    return _text(keys[0]) if isinstance(keys, list) and keys else None


def _readable(body: bytes, content_type: str | None) -> str:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return repr(body)
    if content_type is None or content_type.startswith("application/json"):
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    return text


# -- broker access -----------------------------------------------------------------------------


@asynccontextmanager
async def _dlq_connection(
    settings: Settings, transport: Transport | None = None
) -> AsyncIterator[Connection]:
    connection = await (transport or default_transport()).connect(
        settings, name="workerkit-dlq", on_lost=lambda _exc: None
    )
    try:
        yield connection
    finally:
        await connection.close()


@asynccontextmanager
async def _dlq_channel(
    settings: Settings, transport: Transport | None = None
) -> AsyncIterator[Channel]:
    async with _dlq_connection(settings, transport) as connection:
        yield await connection.channel(confirms=True)


class _Reader:
    """Reads a queue with manual acks and hands back, in order, whatever it did not settle."""

    @classmethod
    async def open(cls, connection: Connection, queue: str, count: int) -> _Reader:
        """A reader on its own channel, with a prefetch for ``count`` messages."""
        # The prefetch must cover every message held unsettled (all of them, when listing), or
        # the consumer would stall; past MAX_READ_AHEAD the reader goes on with basic.get.
        read_ahead = max(1, min(count, MAX_READ_AHEAD))
        return cls(await connection.channel(prefetch=read_ahead), queue, read_ahead)

    def __init__(self, channel: Channel, queue: str, read_ahead: int) -> None:
        self.channel = channel
        self.queue = queue
        self.read_ahead = read_ahead
        self._held: dict[int, None] = {}  # insertion-ordered: the order of reading
        self._arrived: deque[Message] = deque()
        self._wakeup = asyncio.Event()
        self._consumer: str | None = None
        self._consumer_gone = False

    def _on_message(self, message: Message) -> None:
        # Held from arrival, even past the count: deliveries in flight when the consumer is
        # cancelled must be given back too, behind the rest, where they were in the queue.
        self._held[message.delivery_tag] = None
        self._arrived.append(message)
        self._wakeup.set()

    def _on_cancelled(self) -> None:
        self._consumer_gone = True
        self._wakeup.set()

    async def read(self, count: int) -> AsyncGenerator[Message, None]:
        """The first ``count`` messages (fewer if the queue runs out first).

        The consumer stays until :meth:`give_back`: RabbitMQ 3.10 loses some acks that reach a
        quorum queue after their consumer was cancelled (the messages came back as duplicates).
        """
        if count <= 0:
            return
        self._consumer = await self.channel.consume(
            self.queue, self._on_message, self._on_cancelled
        )
        for _ in range(count):
            message = await self._next()
            if message is None:
                return
            yield message

    async def _next(self) -> Message | None:
        while not self._arrived:
            if self._consumer is None:
                message = await self.channel.get(self.queue)
                if message is not None:
                    self._held[message.delivery_tag] = None
                return message
            if self._consumer_gone or len(self._held) >= self.read_ahead:
                await self._stop()
                continue
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), STALL_TIMEOUT)
            except asyncio.TimeoutError:
                await self._stop()
        return self._arrived.popleft()

    async def _stop(self) -> None:
        # Deliveries sent before the cancel arrive before its answer, so once this returns no
        # message can arrive behind a return (a live consumer would be handed its returns).
        tag, self._consumer = self._consumer, None
        if tag is not None and self.channel.is_open:
            await self.channel.cancel(tag)

    def settle(self, message: Message) -> None:
        """Ack ``message``: it is gone from the queue."""
        self.channel.ack(message.delivery_tag)
        del self._held[message.delivery_tag]

    async def give_back(self) -> None:
        """Return every unsettled message in reading order, and wait until the queue has them."""
        tags = list(self._held)  # ascending: keeps the queue's order (see the module docstring)
        self._held.clear()
        self._arrived.clear()
        if not self.channel.is_open:
            return  # the broker returns them itself (in reverse: nothing better is possible)
        returned = 0
        try:
            await self._stop()
            visible = await _ready_count(self.channel, self.queue) if tags else 0
            while returned < len(tags):
                batch = tags[returned : returned + RETURN_BATCH]
                for tag in batch:
                    self.channel.nack(tag, requeue=True)
                returned += len(batch)
                visible += len(batch)
                if not await _wait_returned(self.channel, self.queue, visible):
                    # Someone else is taking from this queue: the count cannot tell, and one
                    # timeout is enough to wait; the rest go back at once.
                    for tag in tags[returned:]:
                        self.channel.nack(tag, requeue=True)
                    return
        except WorkerkitError as exc:  # they come back anyway; only the wait (and order) is lost
            log.warning("%s: could not return messages in order: %s", self.queue, exc)
            for tag in tags[returned:]:
                self.channel.nack(tag, requeue=True)


async def _wait_returned(channel: Channel, queue: str, ready: int) -> bool:
    """Wait until ``queue`` shows ``ready`` messages: a quorum queue applies returns
    asynchronously, and the next batch (or command) must not start before them. False when
    they did not show up within RETURN_TIMEOUT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RETURN_TIMEOUT
    while await _ready_count(channel, queue) < ready:
        if loop.time() > deadline:
            log.warning("%s: returned messages not all visible after %.0fs", queue, RETURN_TIMEOUT)
            return False
        await asyncio.sleep(0.001)
    return True


async def _ready_count(channel: Channel, queue: str) -> int:
    """Messages ready in ``queue``; TopologyError naming it when it does not exist."""
    try:
        ready, _consumers = await channel.queue_state(queue)
    except TopologyError:
        raise TopologyError(
            f"queue {queue!r} does not exist (declare it with `workerkit topology` or by running"
            " its worker)"
        ) from None
    return ready


async def list_dead(
    queue: str,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    limit: int | None = None,
    transport: Transport | None = None,
) -> list[DeadLetter]:
    """The DLQ of ``queue``, oldest first (at most ``limit`` messages); nothing is removed."""
    settings = load_settings(settings, url)
    dlq = dlq_of(queue)
    async with _dlq_connection(settings, transport) as connection:
        channel = await connection.channel()
        present = await _ready_count(channel, dlq)  # a missing DLQ: TopologyError, not "empty"
        reader = await _Reader.open(connection, dlq, present)
        found: list[DeadLetter] = []
        try:
            # Read all of it even with a limit: a quorum queue puts returned messages behind the
            # ones returned before, so returning only a prefix would rotate the queue.
            async for message in reader.read(present):
                if limit is None or len(found) < limit:
                    found.append(dead_letter_from(message, dlq))
            return found
        finally:
            await reader.give_back()
            await reader.channel.close()


async def show(
    queue: str,
    message_id: str,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    transport: Transport | None = None,
) -> list[DeadLetter]:
    """Every message in the DLQ of ``queue`` with id ``message_id`` (usually one, or none)."""
    found = await list_dead(queue, settings=settings, url=url, transport=transport)
    return [dead for dead in found if dead.id == message_id]


class _Copies:
    """Replay copies in flight, in reading order; each original is acked when its copy is."""

    def __init__(
        self, channel: Channel, reader: _Reader, *, timeout: float, progress: Progress | None
    ) -> None:
        self.progress = progress  # called with the number confirmed so far (progress bars)
        self.channel = channel
        self.reader = reader
        self.timeout = timeout
        self.sent: list[str] = []  # keys, in reading order
        self.confirmed: set[int] = set()  # indexes into sent
        self._flying: dict[int, Message] = {}
        self.failure: tuple[str, BaseException] | None = None  # the first failed, in send order
        # The broker's refusal of a copy, if any: the transport then closes the channel (see
        # pika_asyncio), which fails earlier copies still in flight; the refusal is the cause.
        self.refusal: tuple[str, PublishError] | None = None
        self._failed_at: int | None = None
        self._in_flight = 0
        self._answered = asyncio.Event()

    async def send(self, key: str, message: Message, copy: Outgoing) -> None:
        """Publish ``copy`` once fewer than REPLAY_WINDOW are unanswered."""
        while self._in_flight >= REPLAY_WINDOW:
            self._answered.clear()
            await self._answered.wait()
        index = len(self.sent)
        self.sent.append(key)
        self._flying[index] = message
        self._in_flight += 1
        self.channel.publish_nowait(
            copy,
            mandatory=True,
            timeout=self.timeout,
            on_done=lambda error: self._on_done(index, error),
        )

    def _on_done(self, index: int, error: BaseException | None) -> None:
        self._in_flight -= 1
        self._answered.set()
        message = self._flying.pop(index)
        if error is None:
            # Only this original: a multiple ack could take an earlier one whose copy failed.
            # A later copy confirmed after an earlier failure is acked too: its copy is safely
            # in the work queue, and keeping the original would only make a duplicate.
            self.reader.settle(message)
            self.confirmed.add(index)
            if self.progress is not None:
                self.progress(len(self.confirmed))
        else:
            if isinstance(error, PublishError) and self.refusal is None:
                self.refusal = (self.sent[index], error)
            if self._failed_at is None or index < self._failed_at:
                self._failed_at = index
                self.failure = (self.sent[index], error)

    async def drain(self) -> None:
        """Wait for every answer (each publish is answered: a confirm, a timeout or a close)."""
        while self._in_flight:
            self._answered.clear()
            await self._answered.wait()

    def replayed(self) -> list[str]:
        return [key for index, key in enumerate(self.sent) if index in self.confirmed]


async def replay(
    queue: str,
    ids: Iterable[str] | None = None,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    transport: Transport | None = None,
    progress: Callable[[int], Progress] | None = None,
) -> ReplayResult:
    """Move messages from the DLQ of ``queue`` back to ``queue`` as first attempts.

    ``ids=None`` replays everything that is in the DLQ when the call starts. Each copy is
    confirmed by the broker before its dead original is acked (duplicate, never loss).
    ``progress(total)`` is called once the total is known and returns a callback that gets
    the number replayed so far after each confirm.
    """
    settings = load_settings(settings, url)
    dlq, target = dlq_of(queue), work_queue_of(dlq_of(queue))
    wanted = None if ids is None else set(ids)
    async with _dlq_connection(settings, transport) as connection:
        channel = await connection.channel(confirms=True)
        await _ready_count(channel, target)  # refuse early if the work queue does not exist
        # Only what is there now: a replayed message that fails again must not come round again.
        present = await _ready_count(channel, dlq)
        reader = await _Reader.open(connection, dlq, present)
        total = present if wanted is None else min(present, len(wanted))
        copies = _Copies(
            channel,
            reader,
            timeout=settings.publish_timeout,
            progress=progress(total) if progress is not None else None,
        )
        try:
            async for message in reader.read(present):
                if copies.failure is not None:
                    break
                key = message_key(message)
                if wanted is None or key in wanted:
                    await copies.send(key, message, _fresh_copy(message, target))
        finally:
            # Even when failing: the copies in flight are answered before anything is given back,
            # so no original is returned while its copy may still be confirmed and acked.
            await copies.drain()
            await reader.give_back()
            await reader.channel.close()
        replayed = copies.replayed()
        if copies.failure is not None:
            key, exc = copies.refusal or copies.failure
            if not isinstance(exc, PublishError):
                raise exc  # a lost connection says so itself (and exits 4, not 1)
            raise PublishError(
                f"replaying {key!r} to {target!r}: {exc} ({len(replayed)} message(s)"
                f" replayed; the rest are still in {dlq!r})"
            ) from exc
    missing = sorted(wanted - set(replayed)) if wanted is not None else []
    return ReplayResult(replayed=replayed, not_found=missing)


def _fresh_copy(message: Message, queue: str) -> Outgoing:
    headers = {
        key: value
        for key, value in message.headers.items()
        if not (isinstance(key, str) and key.lower().startswith(Header.PREFIX))
    }
    # Keep the id: handlers deduplicate on it. An id-less message gets its stable hash, so a
    # duplicate replay carries the same id and a broker return can be matched to it.
    return Outgoing.copy_of(message, "", queue, headers, message_id=message_key(message))


async def count(
    queue: str,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    transport: Transport | None = None,
) -> int:
    """How many messages wait in the DLQ of ``queue``."""
    settings = load_settings(settings, url)
    async with _dlq_channel(settings, transport) as channel:
        return await _ready_count(channel, dlq_of(queue))


async def purge(
    queue: str,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    transport: Transport | None = None,
) -> int:
    """Delete every message in the DLQ of ``queue``; returns how many were deleted."""
    settings = load_settings(settings, url)
    dlq = dlq_of(queue)
    async with _dlq_channel(settings, transport) as channel:
        await _ready_count(channel, dlq)
        return await channel.purge(dlq)


# -- sync twins --------------------------------------------------------------------------------


def _sync(start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(start())
    raise RuntimeError("the *_sync DLQ functions block; inside an event loop await the async ones")


def list_dead_sync(queue: str, **kwargs: Any) -> list[DeadLetter]:
    """Blocking :func:`list_dead`."""
    return _sync(lambda: list_dead(queue, **kwargs))


def show_sync(queue: str, message_id: str, **kwargs: Any) -> list[DeadLetter]:
    """Blocking :func:`show`."""
    return _sync(lambda: show(queue, message_id, **kwargs))


def replay_sync(queue: str, ids: Iterable[str] | None = None, **kwargs: Any) -> ReplayResult:
    """Blocking :func:`replay`."""
    return _sync(lambda: replay(queue, ids, **kwargs))


def count_sync(queue: str, **kwargs: Any) -> int:
    """Blocking :func:`count`."""
    return _sync(lambda: count(queue, **kwargs))


def purge_sync(queue: str, **kwargs: Any) -> int:
    """Blocking :func:`purge`."""
    return _sync(lambda: purge(queue, **kwargs))
