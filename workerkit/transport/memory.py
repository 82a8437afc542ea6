"""An in-memory broker behind the transport seam, for tests that need no RabbitMQ.

It follows RabbitMQ's rules where workerkit relies on them, so that a bug the real broker would
catch is caught here too:

* exchanges (``topic`` with ``*``/``#``, ``fanout``, ``direct``, the default exchange ``""``),
  exchange-to-exchange bindings and ``alternate-exchange``;
* FIFO queues whose re-declaration with other arguments fails, naming the queue and argument;
* consumers limited by the channel's prefetch, delivery tags per channel, ack (``multiple``),
  nack with requeue (``redelivered``), unacked messages returned when a channel closes;
* an ack of an unknown delivery tag closes the channel (recorded in ``channel_errors``);
* ``x-message-ttl``, ``x-dead-letter-exchange``, ``x-dead-letter-routing-key`` and
  ``x-delivery-limit`` (timers on the event loop), so workerkit's delay levels really delay;
* deliveries are scheduled with ``loop.call_soon``, never made inside the publishing call;
* ``no_ack`` consumers, and direct reply-to: a channel consuming ``amq.rabbitmq.reply-to`` (no_ack
  only) gets an address ``amq.rabbitmq.reply-to.<id>``; a publish from it with that ``reply_to``
  carries the address instead, a publish to ``""`` with the address as routing key reaches the
  consumer (or is dropped, unreturned, once the channel is gone), and a request published with
  ``reply_to = amq.rabbitmq.reply-to`` from a channel without that consumer closes the channel.

Per-message ``expiration`` and ``priority`` are carried but not acted on.

A broker lives on one event loop (its *home*, the first loop that connects, or the one given to
:meth:`MemoryBroker.bind_loop`). A client on another loop or thread (the sync ``Publisher``'s
private loop, a runner in a background thread) gets a connection whose every call is run on the
home loop and whose callbacks come back on the client's loop, as with a broker across a socket.

:meth:`MemoryBroker.drop_connections` simulates a lost connection; ``connect_error`` makes
connecting fail; :meth:`MemoryBroker.set_alarm` a memory alarm (publishes held, connections
blocked). Nothing is persisted and ``durable`` is ignored.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ..errors import ConnectionFailed, PublishTimeout, TopologyError, Unroutable, WorkerkitError
from ..message import _NO_HEADERS, Message, Outgoing, Properties
from ..settings import Settings
from .base import Channel, Connection, OnClosed, OnLost, OnMessage, OnPublished, wait_set
from .specs import ExchangeSpec, QueueSpec

__all__ = ["MemoryBroker", "MemoryChannel", "MemoryConnection", "MemoryTransport"]

T = TypeVar("T")

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"  # the same name as workerkit.reply's
REPLY_ADDRESS_PREFIX = DIRECT_REPLY_TO + "."

EXCHANGE_TYPES = frozenset({"topic", "fanout", "direct"})


@dataclass(eq=False)
class _Envelope:
    """One copy of a message sitting in one queue (identity matters: eq=False)."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Properties  # headers: a dict of this copy's own
    redelivered: bool = False
    returns: int = 0  # times handed back unacked (quorum queues' delivery count)
    expiry: asyncio.TimerHandle | None = None

    @property
    def headers(self) -> dict[Any, Any]:
        headers = self.properties.headers
        assert isinstance(headers, dict)
        return headers

    @classmethod
    def from_outgoing(cls, message: Outgoing) -> _Envelope:
        props = message.properties
        own = replace(props, headers=dict(props.headers), message_id=props.message_id or None)
        return cls(message.exchange, message.routing_key, message.body, own)

    def copy(self) -> _Envelope:
        own = replace(self.properties, headers=dict(self.headers))
        return _Envelope(self.exchange, self.routing_key, self.body, own)

    def to_message(self, delivery_tag: int) -> Message:
        headers = dict(self.headers) if self.headers else _NO_HEADERS
        return Message(
            self.body,
            delivery_tag,
            self.routing_key,
            self.exchange,
            self.redelivered,
            properties=replace(self.properties, headers=headers),
        )


@dataclass(eq=False)
class _Consumer:
    tag: str
    queue: _Queue
    channel: MemoryChannel
    on_message: OnMessage
    on_cancelled: Callable[[], None]
    active: bool = True
    no_ack: bool = False


@dataclass(eq=False)
class _Queue:
    name: str
    arguments: dict[str, Any]
    ready: collections.deque[_Envelope] = field(default_factory=collections.deque)
    consumers: list[_Consumer] = field(default_factory=list)
    next_consumer: int = 0
    dispatch_scheduled: bool = False
    deleted: bool = False


@dataclass(frozen=True)
class _Binding:
    destination: str
    routing_key: str
    to_exchange: bool


@dataclass(eq=False)
class _Exchange:
    name: str
    type: str
    arguments: dict[str, Any]
    bindings: list[_Binding] = field(default_factory=list)

    def matches(self, binding_key: str, routing_key: str) -> bool:
        if self.type == "fanout":
            return True
        if self.type == "direct":
            return binding_key == routing_key
        return topic_matches(binding_key, routing_key)


@functools.lru_cache(maxsize=8192)
def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` is zero or more words."""
    return _match_words(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match_words(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match_words(rest, key[i:]) for i in range(len(key) + 1))
    if not key:
        return False
    return (head == "*" or head == key[0]) and _match_words(rest, key[1:])


class MemoryBroker:
    """Exchanges, queues and connections of one in-memory broker (one per test)."""

    def __init__(self) -> None:
        self.exchanges: dict[str, _Exchange] = {}
        self.queues: dict[str, _Queue] = {}
        self.connections: list[MemoryConnection] = []
        # Protocol errors that made the broker close a channel (a real broker would log them).
        self.channel_errors: list[str] = []
        # When set, connect() raises it: a broker that is down or refuses the credentials.
        self.connect_error: WorkerkitError | None = None
        self.connects = 0
        self._consumer_tags = itertools.count(1)
        # Direct reply-to: the address of each channel consuming amq.rabbitmq.reply-to.
        self.reply_consumers: dict[str, _Consumer] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        # A memory alarm (set_alarm) and the publishes it holds, in the order they were made.
        self.alarm = False
        self._held: list[tuple[MemoryChannel, _Envelope, asyncio.Future[int | WorkerkitError]]] = []

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``loop`` this broker's home (before anything connected)."""
        if self.loop is not None and self.loop is not loop:
            raise RuntimeError("this MemoryBroker already lives on another event loop")
        self.loop = loop

    def on_home(self, call: Callable[[], T]) -> T:
        """Run ``call`` on the home loop (blocking until done) unless this thread runs it."""
        home = self.loop
        if home is None or home.is_closed() or not home.is_running() or _running_loop() is home:
            return call()

        async def run() -> T:
            return call()

        return asyncio.run_coroutine_threadsafe(run(), home).result(timeout=30)

    # -- inspection for tests ----------------------------------------------------------------

    def messages(self, queue: str) -> list[Message]:
        """The ready (not delivered, not unacked) messages of ``queue``, head first."""
        return self.on_home(lambda: [env.to_message(0) for env in self._queue(queue).ready])

    def unacked(self, queue: str | None = None) -> int:
        """Messages delivered but not yet acked, on every open channel (of ``queue`` only)."""
        return self.on_home(
            lambda: sum(
                1
                for conn in self.connections
                for channel in conn.channels
                for q, _env in channel.unacked.values()
                if queue is None or q.name == queue
            )
        )

    def ready_count(self, queue: str) -> int:
        """Messages waiting in ``queue`` (0 for a queue that does not exist)."""
        return self.on_home(lambda: len(q.ready) if (q := self.queues.get(queue)) else 0)

    def consumer_count(self, queue: str) -> int:
        return self.on_home(lambda: len(self._queue(queue).consumers))

    def drop_connections(self) -> int:
        """Simulate the network failing: every connection is lost and its channels fail.

        Unacked messages go back to their queues (redelivered) and each connection's
        ``on_lost`` runs soon after, as it would from a client library. Returns the count.
        """
        dropped = list(self.connections)
        for conn in dropped:
            conn._lose(ConnectionFailed("connection reset (MemoryBroker.drop_connections)"))
        return len(dropped)

    def set_alarm(self, raised: bool) -> None:
        """Raise or clear a memory alarm, as RabbitMQ has them: while raised, a connection that
        publishes is blocked and what it publishes is neither routed nor confirmed, however long
        its publisher waits; once cleared, the held publishes are routed in order and confirmed
        and the connections unblocked. A connection lost meanwhile loses what it had sent."""
        self.on_home(lambda: self._set_alarm(raised))

    def _set_alarm(self, raised: bool) -> None:
        self.alarm = raised
        if raised:
            return
        held, self._held = self._held, []
        for channel, envelope, outcome in held:
            try:
                outcome.set_result(self.publish(envelope))
            except TopologyError as exc:
                channel._fail(exc)
                outcome.set_result(exc)
        for conn in self.connections:
            conn._unblocked.set()

    def _drop_held(self, channel: MemoryChannel, error: WorkerkitError) -> None:
        """A closed channel's held publishes never reach a queue."""
        for held in [h for h in self._held if h[0] is channel]:
            self._held.remove(held)
            if not held[2].done():
                held[2].set_result(error)

    # -- topology ----------------------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise TopologyError(f"NOT_FOUND - no queue {name!r}")
        return queue

    def declare_exchange(self, spec: ExchangeSpec) -> None:
        if not spec.name:
            raise TopologyError("the default exchange cannot be declared")
        if spec.type not in EXCHANGE_TYPES:
            raise TopologyError(f"exchange {spec.name!r}: unsupported type {spec.type!r}")
        existing = self.exchanges.get(spec.name)
        if existing is None:
            self.exchanges[spec.name] = _Exchange(spec.name, spec.type, dict(spec.arguments))
            return
        if existing.type != spec.type:
            raise TopologyError(
                f"inequivalent arg 'type' for exchange {spec.name!r}: received {spec.type!r} "
                f"but current is {existing.type!r}"
            )
        _check_equivalent("exchange", spec.name, existing.arguments, spec.arguments)

    def declare_queue(self, spec: QueueSpec) -> None:
        existing = self.queues.get(spec.name)
        if existing is None:
            self.queues[spec.name] = _Queue(spec.name, dict(spec.arguments))
            return
        _check_equivalent("queue", spec.name, existing.arguments, spec.arguments)

    def bind(self, destination: str, source: str, routing_key: str, to_exchange: bool) -> None:
        exchange = self.exchanges.get(source)
        if exchange is None:
            raise TopologyError(f"NOT_FOUND - no exchange {source!r}")
        if to_exchange and destination not in self.exchanges:
            raise TopologyError(f"NOT_FOUND - no exchange {destination!r}")
        if not to_exchange:
            self._queue(destination)
        binding = _Binding(destination, routing_key, to_exchange)
        if binding not in exchange.bindings:
            exchange.bindings.append(binding)

    def unbind(self, destination: str, source: str, routing_key: str) -> None:
        exchange = self.exchanges.get(source)
        if exchange is None:
            raise TopologyError(f"NOT_FOUND - no exchange {source!r}")
        self._queue(destination)
        binding = _Binding(destination, routing_key, False)
        if binding in exchange.bindings:  # RabbitMQ answers unbind-ok for a missing binding
            exchange.bindings.remove(binding)

    def delete_exchange(self, name: str) -> None:
        if self.exchanges.pop(name, None) is None:
            return
        for exchange in self.exchanges.values():
            exchange.bindings = [
                b for b in exchange.bindings if not (b.to_exchange and b.destination == name)
            ]

    def delete_queue(self, name: str) -> None:
        queue = self.queues.pop(name, None)
        if queue is None:
            return  # RabbitMQ answers delete-ok for a queue that does not exist
        queue.deleted = True
        for env in queue.ready:
            _cancel_expiry(env)
        queue.ready.clear()
        for exchange in self.exchanges.values():
            exchange.bindings = [
                b for b in exchange.bindings if b.to_exchange or b.destination != name
            ]
        loop = asyncio.get_running_loop()
        for consumer in queue.consumers:
            consumer.active = False
            consumer.channel.consumers.pop(consumer.tag, None)
            loop.call_soon(consumer.on_cancelled)  # consumer_cancel_notify
        queue.consumers.clear()

    # -- routing -----------------------------------------------------------------------------

    def route(self, exchange: str, routing_key: str) -> list[_Queue]:
        """The queues a message published to ``exchange`` with ``routing_key`` reaches."""
        if exchange not in self.exchanges and exchange != "":
            raise TopologyError(f"NOT_FOUND - no exchange {exchange!r}")
        found: dict[str, _Queue] = {}
        self._route(exchange, routing_key, found, set())
        return list(found.values())

    def _route(self, name: str, key: str, found: dict[str, _Queue], seen: set[str]) -> None:
        if name == "":
            if key in self.queues:
                found[key] = self.queues[key]
            return
        exchange = self.exchanges.get(name)
        if exchange is None or name in seen:
            return
        seen.add(name)
        matched = False
        for binding in exchange.bindings:
            if not exchange.matches(binding.routing_key, key):
                continue
            if binding.to_exchange:
                if binding.destination in self.exchanges:
                    matched = True
                    self._route(binding.destination, key, found, seen)
            elif binding.destination in self.queues:
                matched = True
                found[binding.destination] = self.queues[binding.destination]
        alternate = exchange.arguments.get("alternate-exchange")
        if not matched and isinstance(alternate, str):
            self._route(alternate, key, found, seen)

    def publish(self, envelope: _Envelope) -> int:
        """Enqueue a copy in every queue the message routes to; the number of queues."""
        if envelope.exchange == "" and envelope.routing_key.startswith(REPLY_ADDRESS_PREFIX):
            consumer = self.reply_consumers.get(envelope.routing_key)
            if consumer is None or not consumer.active:
                return 0  # the caller is gone: dropped, as RabbitMQ does
            message = envelope.copy().to_message(0)
            asyncio.get_running_loop().call_soon(consumer.on_message, message)
            return 1
        queues = self.route(envelope.exchange, envelope.routing_key)
        headers = envelope.headers
        if "CC" in headers or "BCC" in headers:
            queues = self._sender_selected(envelope, queues)
        for queue in queues:
            self._enqueue(queue, envelope.copy())
        return len(queues)

    def _sender_selected(self, envelope: _Envelope, queues: list[_Queue]) -> list[_Queue]:
        """RabbitMQ's sender-selected distribution: the routing keys of the ``CC`` and ``BCC``
        headers route copies on the same exchange, each queue once; ``BCC`` is removed before
        any queue sees it."""
        found = {queue.name: queue for queue in queues}
        headers = envelope.headers
        for name in ("CC", "BCC"):
            keys = headers.get(name)
            if isinstance(keys, list):
                for key in keys:
                    if isinstance(key, str | bytes):
                        key = key if isinstance(key, str) else key.decode("utf-8", "replace")
                        for queue in self.route(envelope.exchange, key):
                            found.setdefault(queue.name, queue)
        headers.pop("BCC", None)
        return list(found.values())

    # -- queues ------------------------------------------------------------------------------

    def _enqueue(self, queue: _Queue, env: _Envelope, *, front: bool = False) -> None:
        if queue.deleted:
            return
        if front:
            queue.ready.appendleft(env)
        else:
            queue.ready.append(env)
        ttl = queue.arguments.get("x-message-ttl")
        if isinstance(ttl, int) and env.expiry is None:
            loop = asyncio.get_running_loop()
            env.expiry = loop.call_later(ttl / 1000, self._expire, queue, env)
        self.schedule_dispatch(queue)

    def _expire(self, queue: _Queue, env: _Envelope) -> None:
        env.expiry = None
        if queue.deleted:
            return
        if queue.ready and queue.ready[0] is env:
            queue.ready.popleft()
        else:
            try:
                queue.ready.remove(env)
            except ValueError:
                return  # delivered meanwhile: TTL only applies to messages waiting in a queue
        self._dead_letter(queue, env, "expired")

    def _dead_letter(self, queue: _Queue, env: _Envelope, reason: str) -> None:
        """Republish to the queue's dead-letter exchange (or drop, as RabbitMQ does)."""
        _cancel_expiry(env)
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if not isinstance(exchange, str):
            return
        key = queue.arguments.get("x-dead-letter-routing-key", env.routing_key)
        dead = env.copy()
        _record_death(dead.headers, queue.name, reason, env)
        dead.headers.pop("x-delivery-count", None)
        dead.exchange = exchange
        dead.routing_key = str(key)
        try:
            targets = self.route(exchange, dead.routing_key)
        except TopologyError:
            return  # a missing dead-letter exchange drops the message, as RabbitMQ does
        for target in targets:
            self._enqueue(target, dead.copy())

    def give_back(self, queue: _Queue, env: _Envelope) -> None:
        """An unacked message returns to the head of its queue, marked redelivered."""
        if queue.deleted:
            return
        env.redelivered = True
        env.returns += 1
        limit = queue.arguments.get("x-delivery-limit")
        if isinstance(limit, int):
            env.headers["x-delivery-count"] = env.returns
            if env.returns > limit:
                self._dead_letter(queue, env, "delivery_limit")
                return
        self._enqueue(queue, env, front=True)

    def schedule_dispatch(self, queue: _Queue) -> None:
        if not queue.dispatch_scheduled and queue.consumers:
            queue.dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch, queue)

    def _dispatch(self, queue: _Queue) -> None:
        queue.dispatch_scheduled = False
        loop = asyncio.get_running_loop()
        while queue.ready and not queue.deleted:
            consumer = _next_with_room(queue)
            if consumer is None:
                return
            env = queue.ready.popleft()
            _cancel_expiry(env)
            if consumer.no_ack:  # settled once sent: nothing is tracked
                loop.call_soon(consumer.on_message, env.to_message(0))
                continue
            tag = consumer.channel.take(queue, env)
            loop.call_soon(consumer.channel.deliver, consumer, tag)

    def new_consumer_tag(self) -> str:
        return f"memory.ctag.{next(self._consumer_tags)}"


def _record_death(headers: dict[str, Any], queue: str, reason: str, env: _Envelope) -> None:
    """The headers RabbitMQ (3.10) writes when it dead-letters: an ``x-death`` entry per
    (queue, reason), counted and moved to the front when it happens again, and the
    ``x-first-death-*`` headers of the first time."""
    deaths = [dict(d) for d in headers.get("x-death", [])]
    found = next((d for d in deaths if d.get("queue") == queue and d.get("reason") == reason), None)
    if found is not None:
        deaths.remove(found)
        found["count"] = int(found.get("count", 1)) + 1
    else:
        found = {
            "count": 1,
            "reason": reason,
            "queue": queue,
            "exchange": env.exchange,
            "routing-keys": [env.routing_key],
            "time": int(time.time()),
        }
    deaths.insert(0, found)
    headers["x-death"] = deaths
    if "x-first-death-reason" not in headers:
        headers["x-first-death-reason"] = reason
        headers["x-first-death-queue"] = queue
        headers["x-first-death-exchange"] = env.exchange


def _next_with_room(queue: _Queue) -> _Consumer | None:
    consumers = queue.consumers
    for step in range(len(consumers)):
        index = (queue.next_consumer + step) % len(consumers)
        consumer = consumers[index]
        if consumer.no_ack or consumer.channel.has_room():
            queue.next_consumer = index + 1
            return consumer
    return None


def _cancel_expiry(env: _Envelope) -> None:
    if env.expiry is not None:
        env.expiry.cancel()
        env.expiry = None


def _check_equivalent(
    kind: str, name: str, current: dict[str, Any], wanted: dict[str, Any]
) -> None:
    for arg in sorted(set(current) | set(wanted)):
        if current.get(arg) != wanted.get(arg):
            raise TopologyError(
                f"inequivalent arg {arg!r} for {kind} {name!r}: received {_shown(wanted, arg)} "
                f"but current is {_shown(current, arg)}. The {kind} already exists with other "
                "arguments: delete it (after draining) or change the Worker to match"
            )


def _shown(arguments: dict[str, Any], name: str) -> str:
    return repr(arguments[name]) if name in arguments else "none"


class MemoryChannel:
    """A channel on a :class:`MemoryBroker`; the same contract as the pika channel."""

    def __init__(
        self,
        connection: MemoryConnection,
        prefetch: int | None,
        confirms: bool,
        on_closed: OnClosed | None = None,
    ) -> None:
        self.connection = connection
        self._on_closed = on_closed
        self.broker = connection.broker
        self.prefetch = prefetch or 0
        self.confirms = confirms
        self.unacked: dict[int, tuple[_Queue, _Envelope]] = {}
        self.consumers: dict[str, _Consumer] = {}
        # Every ack and nack in order, for tests: ("ack", tag, multiple) / ("nack", tag, requeue).
        self.history: list[tuple[str, int, bool]] = []
        self.published = 0
        self._tags = itertools.count(1)
        self._close_error: WorkerkitError | None = None
        self.reply_address: str | None = None  # direct reply-to, once consumed

    @property
    def is_open(self) -> bool:
        return self._close_error is None

    async def _rpc(self) -> None:
        """Every broker call is a round trip: check the channel, then let the loop run."""
        if self._close_error is not None:
            raise self._close_error
        await asyncio.sleep(0)
        if self._close_error is not None:
            raise self._close_error

    def _broker_call(self, call: Callable[[], Any]) -> Any:
        """Run a broker operation; an error closes the channel, as a channel exception does."""
        try:
            return call()
        except TopologyError as exc:
            self._fail(exc)
            raise

    # -- topology ----------------------------------------------------------------------------

    async def declare_exchange(self, spec: ExchangeSpec) -> None:
        await self._rpc()
        self._broker_call(lambda: self.broker.declare_exchange(spec))

    async def declare_queue(self, spec: QueueSpec) -> None:
        await self._rpc()
        self._broker_call(lambda: self.broker.declare_queue(spec))

    async def queue_state(self, name: str) -> tuple[int, int]:
        await self._rpc()
        queue: _Queue = self._broker_call(lambda: self.broker._queue(name))
        return len(queue.ready), len(queue.consumers)

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._rpc()
        self._broker_call(lambda: self.broker.bind(queue, exchange, routing_key, False))

    async def bind_exchange(self, destination: str, source: str, routing_key: str) -> None:
        await self._rpc()
        self._broker_call(lambda: self.broker.bind(destination, source, routing_key, True))

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._rpc()
        self._broker_call(lambda: self.broker.unbind(queue, exchange, routing_key))

    async def delete_queue(self, name: str) -> None:
        await self._rpc()
        self.broker.delete_queue(name)

    async def delete_exchange(self, name: str) -> None:
        await self._rpc()
        self.broker.delete_exchange(name)

    async def purge(self, name: str) -> int:
        await self._rpc()
        queue: _Queue = self._broker_call(lambda: self.broker._queue(name))
        count = len(queue.ready)
        for env in queue.ready:
            _cancel_expiry(env)
        queue.ready.clear()
        return count

    async def get(self, queue: str) -> Message | None:
        await self._rpc()
        source: _Queue = self._broker_call(lambda: self.broker._queue(queue))
        if not source.ready:
            return None
        env = source.ready.popleft()
        _cancel_expiry(env)
        return env.to_message(self.take(source, env))

    # -- consuming ---------------------------------------------------------------------------

    async def consume(
        self,
        queue: str,
        on_message: OnMessage,
        on_cancelled: Callable[[], None],
        *,
        no_ack: bool = False,
    ) -> str:
        await self._rpc()
        if queue == DIRECT_REPLY_TO:
            return self._consume_replies(on_message, on_cancelled, no_ack)
        source: _Queue = self._broker_call(lambda: self.broker._queue(queue))
        consumer = _Consumer(
            self.broker.new_consumer_tag(), source, self, on_message, on_cancelled, no_ack=no_ack
        )
        source.consumers.append(consumer)
        self.consumers[consumer.tag] = consumer
        self.broker.schedule_dispatch(source)
        return consumer.tag

    def _consume_replies(
        self, on_message: OnMessage, on_cancelled: Callable[[], None], no_ack: bool
    ) -> str:
        """Direct reply-to: this channel's address, with RabbitMQ's rules."""
        if not no_ack:
            self._protocol_error("PRECONDITION_FAILED - reply consumer cannot acknowledge")
        if self.reply_address is not None:
            self._protocol_error("PRECONDITION_FAILED - reply consumer already set")
        address = f"{REPLY_ADDRESS_PREFIX}{next(self.broker._consumer_tags)}"
        pseudo = _Queue(address, {})
        consumer = _Consumer(
            self.broker.new_consumer_tag(), pseudo, self, on_message, on_cancelled, no_ack=True
        )
        self.reply_address = address
        self.broker.reply_consumers[address] = consumer
        self.consumers[consumer.tag] = consumer
        return consumer.tag

    def _protocol_error(self, error: str) -> None:
        self.broker.channel_errors.append(error)
        failure = TopologyError(error)
        self._fail(failure)
        raise failure

    def _drop_reply_address(self) -> None:
        if self.reply_address is not None:
            self.broker.reply_consumers.pop(self.reply_address, None)
            self.reply_address = None

    async def cancel(self, consumer_tag: str) -> None:
        if not self.is_open:
            return
        consumer = self.consumers.pop(consumer_tag, None)
        if consumer is not None and consumer.queue.name == self.reply_address:
            self._drop_reply_address()
        if consumer is not None:
            consumer.active = False
            if consumer in consumer.queue.consumers:
                consumer.queue.consumers.remove(consumer)
        await self._rpc()

    def has_consumer(self, consumer_tag: str) -> bool:
        return self.is_open and consumer_tag in self.consumers

    async def flush(self) -> None:
        await asyncio.sleep(0)  # nothing is buffered; a turn of the loop like a socket write

    def has_room(self) -> bool:
        return self.prefetch == 0 or len(self.unacked) < self.prefetch

    def take(self, queue: _Queue, env: _Envelope) -> int:
        """Record a delivery on this channel; its delivery tag."""
        tag = next(self._tags)
        self.unacked[tag] = (queue, env)
        return tag

    def deliver(self, consumer: _Consumer, tag: int) -> None:
        entry = self.unacked.get(tag)
        if entry is None or not self.is_open:
            return  # the channel closed meanwhile and the message went back to its queue
        if not consumer.active:
            # Like pika: a delivery for a cancelled consumer is handed back to the broker.
            del self.unacked[tag]
            self.broker.give_back(*entry)
            return
        consumer.on_message(entry[1].to_message(tag))

    def _settle(self, delivery_tag: int, multiple: bool) -> list[tuple[_Queue, _Envelope]]:
        # As in RabbitMQ, the named tag must be outstanding even with multiple=True (0: all).
        if multiple and delivery_tag == 0:
            tags = list(self.unacked)
        elif delivery_tag in self.unacked:
            tags = [t for t in self.unacked if t <= delivery_tag] if multiple else [delivery_tag]
        else:
            tags = []
        if not tags:
            error = f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}"
            self.broker.channel_errors.append(error)
            self._fail(ConnectionFailed(f"channel closed by the broker: {error}"))
            return []
        settled = [self.unacked.pop(t) for t in sorted(tags)]
        for queue in {id(q): q for q, _ in settled}.values():
            self.broker.schedule_dispatch(queue)
        self._refill()
        return settled

    def _refill(self) -> None:
        for consumer in self.consumers.values():
            self.broker.schedule_dispatch(consumer.queue)

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        if not self.is_open:
            return  # like the pika transport: the broker has requeued it already
        self.history.append(("ack", delivery_tag, multiple))
        self._settle(delivery_tag, multiple)

    def nack(self, delivery_tag: int, requeue: bool = True) -> None:
        if not self.is_open:
            return
        self.history.append(("nack", delivery_tag, requeue))
        for queue, env in self._settle(delivery_tag, False):
            if requeue:
                self.broker.give_back(queue, env)
            else:
                self.broker._dead_letter(queue, env, "rejected")

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, message: Outgoing, *, mandatory: bool, timeout: float) -> None:
        await self._rpc()
        envelope = _Envelope.from_outgoing(message)
        if envelope.properties.reply_to == DIRECT_REPLY_TO:
            if self.reply_address is None:
                self._protocol_error("PRECONDITION_FAILED - fast reply consumer does not exist")
            envelope.properties.reply_to = self.reply_address
        if self.broker.alarm:
            count = await self._held_by_alarm(envelope, timeout)
        else:
            count = self._broker_call(lambda: self.broker.publish(envelope))
        self.published += 1
        if mandatory and count == 0:
            raise Unroutable(message.exchange, message.routing_key)

    async def _held_by_alarm(self, envelope: _Envelope, timeout: float) -> int:
        """Under an alarm: block the connection, hold the publish until the alarm clears. A
        publisher that stops waiting does not take it back (it is routed all the same)."""
        outcome: asyncio.Future[int | WorkerkitError] = asyncio.get_running_loop().create_future()
        self.broker._held.append((self, envelope, outcome))
        self.connection._unblocked.clear()
        try:
            result = await asyncio.wait_for(asyncio.shield(outcome), timeout)
        except asyncio.TimeoutError:
            raise PublishTimeout(
                f"no confirm from the broker within {timeout:.1f}s (the broker has blocked this"
                " connection: alarm)"
            ) from None
        if isinstance(result, WorkerkitError):
            raise result
        return result

    def publish_nowait(
        self, message: Outgoing, *, mandatory: bool, timeout: float, on_done: OnPublished
    ) -> None:
        task = asyncio.ensure_future(self.publish(message, mandatory=mandatory, timeout=timeout))

        def report(done: asyncio.Future[None]) -> None:
            cancelled = done.cancelled()
            on_done(
                ConnectionFailed("the publish was cancelled") if cancelled else done.exception()
            )

        task.add_done_callback(report)

    # -- closing -----------------------------------------------------------------------------

    def _fail(self, error: WorkerkitError) -> None:
        """The channel is gone: consumers end, unacked messages go back (redelivered)."""
        if self._close_error is not None:
            return
        self._close_error = error
        self._drop_reply_address()
        self.broker._drop_held(self, error)
        for consumer in self.consumers.values():
            consumer.active = False
            if consumer in consumer.queue.consumers:
                consumer.queue.consumers.remove(consumer)
        self.consumers.clear()
        unacked, self.unacked = self.unacked, {}
        # Handed back newest first so that the oldest ends up at the head, as in RabbitMQ.
        for tag in sorted(unacked, reverse=True):
            self.broker.give_back(*unacked[tag])
        if self in self.connection.channels:
            self.connection.channels.remove(self)
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            asyncio.get_running_loop().call_soon(on_closed, error)

    async def close(self) -> None:
        if self._close_error is not None:
            return
        self._on_closed = None  # closed by its owner: nobody to tell
        self._fail(ConnectionFailed("channel closed"))
        await asyncio.sleep(0)


class MemoryConnection:
    def __init__(self, broker: MemoryBroker, name: str, on_lost: OnLost) -> None:
        self.broker = broker
        self.name = name
        self.channels: list[MemoryChannel] = []
        self._on_lost = on_lost
        self._open = True
        self._unblocked = asyncio.Event()  # cleared by a publish under an alarm (set_alarm)
        self._unblocked.set()

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def blocked(self) -> bool:
        return not self._unblocked.is_set()

    async def wait_unblocked(self, timeout: float) -> bool:
        return await wait_set(self._unblocked, timeout)

    async def channel(
        self,
        *,
        prefetch: int | None = None,
        confirms: bool = False,
        on_closed: OnClosed | None = None,
    ) -> MemoryChannel:
        if not self._open:
            raise ConnectionFailed("connection is closed")
        await asyncio.sleep(0)
        channel = MemoryChannel(self, prefetch, confirms, on_closed)
        self.channels.append(channel)
        return channel

    def _shut(self, error: WorkerkitError) -> None:
        self._open = False
        self._unblocked.set()
        for channel in list(self.channels):
            channel._fail(error)
        if self in self.broker.connections:
            self.broker.connections.remove(self)

    def _lose(self, error: WorkerkitError) -> None:
        if not self._open:
            return
        self._shut(error)
        asyncio.get_running_loop().call_soon(self._on_lost, error)

    async def close(self) -> None:
        if self._open:
            self._shut(ConnectionFailed("connection closed"))
        await asyncio.sleep(0)


class MemoryTransport:
    """``Runner(workers, transport=MemoryTransport(broker))`` runs workers on ``broker``."""

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker if broker is not None else MemoryBroker()

    async def connect(self, settings: Settings, *, name: str, on_lost: OnLost) -> Connection:
        loop = asyncio.get_running_loop()
        broker = self.broker
        if broker.loop is None or broker.loop.is_closed():
            broker.loop = loop
        if broker.loop is loop:
            return await self._connect_here(name, on_lost)
        # A client on another loop: the broker works on its home loop, callbacks come back here.
        home = broker.loop
        lost = _back_on(loop, on_lost)
        inner = await _on(home, self._connect_here(name, lost))
        return _RemoteConnection(inner, home, loop)

    async def _connect_here(self, name: str, on_lost: OnLost) -> MemoryConnection:
        await asyncio.sleep(0)
        if self.broker.connect_error is not None:
            raise self.broker.connect_error
        self.broker.connects += 1
        connection = MemoryConnection(self.broker, name, on_lost)
        self.broker.connections.append(connection)
        return connection


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _on(home: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` run on ``home`` from another loop."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, home))


def _back_on(loop: asyncio.AbstractEventLoop, callback: Callable[..., None]) -> Callable[..., None]:
    """``callback`` made callable from the home loop: it runs on ``loop``, the client's."""

    def call(*args: Any) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    return call


class _RemoteConnection:
    """A :class:`MemoryConnection` used from another loop than the broker's."""

    def __init__(
        self,
        inner: MemoryConnection,
        home: asyncio.AbstractEventLoop,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._inner, self._home, self._loop = inner, home, loop

    @property
    def is_open(self) -> bool:
        return self._inner.is_open

    @property
    def blocked(self) -> bool:
        return self._inner.blocked

    async def wait_unblocked(self, timeout: float) -> bool:
        return await _on(self._home, self._inner.wait_unblocked(timeout))

    async def channel(
        self,
        *,
        prefetch: int | None = None,
        confirms: bool = False,
        on_closed: OnClosed | None = None,
    ) -> Channel:
        closed = _back_on(self._loop, on_closed) if on_closed is not None else None
        inner = await _on(
            self._home,
            self._inner.channel(prefetch=prefetch, confirms=confirms, on_closed=closed),
        )
        return _RemoteChannel(inner, self._home, self._loop)

    async def close(self) -> None:
        await _on(self._home, self._inner.close())


class _RemoteChannel:
    """A :class:`MemoryChannel` used from another loop: each call runs on the broker's loop, in
    the order made (acks included), and each callback runs on the client's loop."""

    def __init__(
        self, inner: MemoryChannel, home: asyncio.AbstractEventLoop, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._inner, self._home, self._loop = inner, home, loop

    @property
    def is_open(self) -> bool:
        return self._inner.is_open

    async def declare_exchange(self, spec: ExchangeSpec) -> None:
        await _on(self._home, self._inner.declare_exchange(spec))

    async def declare_queue(self, spec: QueueSpec) -> None:
        await _on(self._home, self._inner.declare_queue(spec))

    async def queue_state(self, name: str) -> tuple[int, int]:
        return await _on(self._home, self._inner.queue_state(name))

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await _on(self._home, self._inner.bind_queue(queue, exchange, routing_key))

    async def bind_exchange(self, destination: str, source: str, routing_key: str) -> None:
        await _on(self._home, self._inner.bind_exchange(destination, source, routing_key))

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await _on(self._home, self._inner.unbind_queue(queue, exchange, routing_key))

    async def delete_queue(self, name: str) -> None:
        await _on(self._home, self._inner.delete_queue(name))

    async def delete_exchange(self, name: str) -> None:
        await _on(self._home, self._inner.delete_exchange(name))

    async def purge(self, name: str) -> int:
        return await _on(self._home, self._inner.purge(name))

    async def get(self, queue: str) -> Message | None:
        return await _on(self._home, self._inner.get(queue))

    async def consume(
        self,
        queue: str,
        on_message: OnMessage,
        on_cancelled: Callable[[], None],
        *,
        no_ack: bool = False,
    ) -> str:
        back_message, back_cancelled = (
            _back_on(self._loop, on_message),
            _back_on(self._loop, on_cancelled),
        )
        return await _on(
            self._home, self._inner.consume(queue, back_message, back_cancelled, no_ack=no_ack)
        )

    async def cancel(self, consumer_tag: str) -> None:
        await _on(self._home, self._inner.cancel(consumer_tag))

    def has_consumer(self, consumer_tag: str) -> bool:
        return self._inner.has_consumer(consumer_tag)

    async def flush(self) -> None:
        await _on(self._home, self._inner.flush())

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._home.call_soon_threadsafe(self._inner.ack, delivery_tag, multiple)

    def nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self._home.call_soon_threadsafe(self._inner.nack, delivery_tag, requeue)

    async def publish(self, message: Outgoing, *, mandatory: bool, timeout: float) -> None:
        await _on(self._home, self._inner.publish(message, mandatory=mandatory, timeout=timeout))

    def publish_nowait(
        self, message: Outgoing, *, mandatory: bool, timeout: float, on_done: OnPublished
    ) -> None:
        done = _back_on(self._loop, on_done)
        self._home.call_soon_threadsafe(
            functools.partial(
                self._inner.publish_nowait,
                message,
                mandatory=mandatory,
                timeout=timeout,
                on_done=done,
            )
        )

    async def close(self) -> None:
        await _on(self._home, self._inner.close())
