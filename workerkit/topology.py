"""Exchanges, queues and bindings workerkit declares, and the broker-side delay layout.

Routing: one durable topic exchange (``Settings.exchange``). Every worker queue is bound with its
own name and its ``bindings``. Its dead-letter queue ``<queue>.dlq`` is reached through the
default exchange.

Delays (retries and scheduled publishes) use *binary levels of TTL queues* so that the broker, not
the worker, holds a waiting message, any delay works, and nothing waits behind a longer delay:

* Level ``k`` (``0 <= k < LEVELS``) is a topic exchange and a quorum queue ``<exchange>.delay.kk``
  whose every message lives ``2**k`` units (``UNIT_MS``), then is dead-lettered (at-least-once) to
  level ``k-1``'s exchange; level 0 dead-letters to ``<exchange>.delay.out``.
* A delayed message's routing key is ``<kind>.<bit LEVELS-1>. ... .<bit 0>.<target>``. Level ``k``'s
  exchange sends it to its queue when bit ``k`` is 1, else straight on to the next level's
  exchange. The total wait is therefore the delay, rounded up to a unit. It is published to the
  exchange of its highest 1 bit (level 0 for no delay): the levels above would only pass it on,
  and each hop costs the broker time per message.
* Every message in one level queue has the same TTL, so the queue's head always expires first:
  no head-of-line blocking, whatever the mix of delays.
* ``delay.out`` routes ``r.<bits>.<queue>`` (a retry) to exactly that queue and
  ``p.<bits>.<routing key>`` (a scheduled publish) to every queue whose bindings match, the same
  as the main exchange would. What matches nothing goes to ``<exchange>.unroutable`` (its
  alternate exchange) instead of vanishing.

Dead letters are never dropped by the broker, on any supported RabbitMQ (3.10 to 4.3): from 4.0
every quorum queue without an explicit ``x-delivery-limit`` has a limit of 20, and 4.0 to 4.2
count each ``basic.nack(requeue=True)`` (how ``workerkit dlq list/show`` give messages back)
toward it, so a DLQ without a dead-letter target of its own would drop its messages after about
20 listings. Every ``<queue>.dlq`` and ``<exchange>.unroutable`` is therefore declared with
:data:`DEAD_LETTER_DELIVERY_LIMIT`. Such a queue declared by an older workerkit without that
argument cannot be re-declared with it (the broker refuses inequivalent arguments):
:meth:`Topology.adopt_dead_letter_queues` finds such queues, keeps declaring them as they are
and says so (protect them with a policy, see docs/brokers.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from .errors import TopologyError
from .message import Header
from .retry import LEVELS, MAX_DELAY, UNIT_MS
from .settings import Settings
from .transport.specs import ExchangeSpec, QueueSpec
from .worker import Worker

__all__ = [
    "DEAD_LETTER_DELIVERY_LIMIT",
    "LEVELS",
    "MAX_DELAY",
    "UNIT_MS",
    "ExchangeSpec",
    "QueueSpec",
    "Topology",
    "delay_units",
]

# LEVELS levels of UNIT_MS units: delays up to MAX_DELAY, about 310 days (defined with the
# retry policy, which must not ask for more).
MAX_UNITS: int = 2**LEVELS - 1

RETRY = "r"
SCHEDULED = "p"

# A DLQ's delivery limit: effectively none (a listing a second for 68 years). -1, which means
# "unlimited" from 4.0 on, is not used: 3.10 accepts it and then drops every returned message.
DEAD_LETTER_DELIVERY_LIMIT = 2**31 - 1
_LIMIT_ARG = "x-delivery-limit"

log = logging.getLogger("workerkit.topology")


class Declarer(Protocol):
    """What declaring needs from a transport channel."""

    async def declare_exchange(self, spec: ExchangeSpec) -> None: ...

    async def declare_queue(self, spec: QueueSpec) -> None: ...

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None: ...

    async def bind_exchange(self, destination: str, source: str, routing_key: str) -> None: ...


class ClosableDeclarer(Declarer, Protocol):
    async def close(self) -> None: ...


class ChannelSource(Protocol):
    """What adopting DLQs needs from a transport connection: throwaway channels."""

    async def channel(self) -> ClosableDeclarer: ...


def delay_units(seconds: float) -> int:
    """The delay in units, rounded up so that a message is never due sooner than asked."""
    if seconds <= 0:
        return 0
    units = math.ceil(round(seconds * 1000 / UNIT_MS, 6))
    return min(units, MAX_UNITS)


class Topology:
    """Names and arguments of everything workerkit declares on one exchange."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.exchange = settings.exchange
        self.delay_out = f"{self.exchange}.delay.out"
        self.unroutable = f"{self.exchange}.unroutable"
        self._stars = ".".join(["*"] * LEVELS)
        self._delay_prefix = f"{self.exchange}.delay."
        # DLQs that exist without a delivery limit (declared by an older workerkit): declared
        # with their old arguments, see adopt_dead_letter_queues.
        self.legacy_queues: set[str] = set()

    # -- names -------------------------------------------------------------------------------

    def level_name(self, level: int) -> str:
        return f"{self.exchange}.delay.{level:02d}"

    @staticmethod
    def dlq_name(queue: str) -> str:
        return f"{queue}.dlq"

    def delayed_route(self, kind: str, target: str, seconds: float) -> tuple[str, str]:
        """(exchange, routing key) that delivers to ``target`` after ``seconds``."""
        units = delay_units(seconds)
        bits = ".".join("1" if units >> level & 1 else "0" for level in reversed(range(LEVELS)))
        # Enter at the level of the highest 1 bit: every level above it only passes the message
        # down, one topic-exchange hop each. Through all 28 a 2 s retry cost the broker 2.4 ms
        # per publish (RabbitMQ 3.10, serial, confirmed), from level 4 0.7 ms; a storm of
        # failures is bounded by that.
        return self.level_name(max(units.bit_length() - 1, 0)), f"{kind}.{bits}.{target}"

    def is_delayed(self, exchange: str) -> bool:
        """Whether a delivery came out of the delay layout (its exchange is one of ours)."""
        return exchange.startswith(self._delay_prefix)

    def original_route(self, routing_key: str, headers: Mapping[str, Any]) -> tuple[str, str]:
        """(exchange, routing key) a delayed delivery was first published with.

        A retry carries them in workerkit headers; a scheduled publish's key is the delay route
        with the kind and the bits in front of the routing key the publisher gave.
        """
        if routing_key.startswith(f"{RETRY}."):
            return (
                str(headers.get(Header.ORIGINAL_EXCHANGE, self.exchange)),
                str(headers.get(Header.ORIGINAL_ROUTING_KEY, routing_key)),
            )
        return self.exchange, routing_key.split(".", 1 + LEVELS)[-1]

    @staticmethod
    def scheduled_target(routing_key: str) -> str | None:
        """The routing key a scheduled publish (``delay=``) was given, from its delay route
        (``p.<28 bits>.<key>``); None for any other routing key."""
        parts = routing_key.split(".", 1 + LEVELS)
        if len(parts) != 2 + LEVELS or parts[0] != SCHEDULED:
            return None
        if not all(bit in ("0", "1") for bit in parts[1:-1]):
            return None
        return parts[-1]

    def retry_route(self, queue: str, seconds: float) -> tuple[str, str]:
        return self.delayed_route(RETRY, queue, seconds)

    def scheduled_route(self, routing_key: str, seconds: float) -> tuple[str, str]:
        return self.delayed_route(SCHEDULED, routing_key, seconds)

    # -- specs -------------------------------------------------------------------------------

    def main_exchange(self) -> ExchangeSpec:
        return ExchangeSpec(self.exchange)

    def _next_hop(self, level: int) -> str:
        return self.level_name(level - 1) if level else self.delay_out

    def _bit_pattern(self, level: int, bit: str) -> str:
        return "*." * (1 + LEVELS - 1 - level) + bit + ".#"

    def delay_exchanges(self) -> list[ExchangeSpec]:
        specs = [
            ExchangeSpec(self.unroutable, type="fanout"),
            ExchangeSpec(self.delay_out, arguments={"alternate-exchange": self.unroutable}),
        ]
        # Declared top level first so that each "bit is 0" binding finds its source declared.
        for level in reversed(range(LEVELS)):
            specs.append(ExchangeSpec(self.level_name(level)))
        return specs

    def delay_exchange_bindings(self) -> list[tuple[str, str, str]]:
        """(destination, source, key): a 0 bit passes the message on to the next level at once."""
        return [
            (self._next_hop(level), self.level_name(level), self._bit_pattern(level, "0"))
            for level in range(LEVELS)
        ]

    def delay_queues(self) -> list[QueueSpec]:
        queues = [
            QueueSpec(
                self.unroutable, self._store_arguments(self.unroutable), ((self.unroutable, ""),)
            )
        ]
        for level in range(LEVELS):
            queues.append(
                QueueSpec(
                    self.level_name(level),
                    {
                        "x-queue-type": "quorum",
                        "x-message-ttl": UNIT_MS * 2**level,
                        "x-dead-letter-exchange": self._next_hop(level),
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                    },
                    ((self.level_name(level), self._bit_pattern(level, "1")),),
                )
            )
        return queues

    def worker_queues(self, worker: type[Worker]) -> list[QueueSpec]:
        """The work queue (bound to the exchange and to delay.out) and its dead-letter queue."""
        dlq = self.dlq_name(worker.queue)
        delivery_limit = worker.delivery_limit or self.settings.delivery_limit
        if worker.queue_type == "quorum":
            arguments: dict[str, Any] = {
                "x-queue-type": "quorum",
                "x-delivery-limit": delivery_limit,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dlq,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
            dlq_arguments = self._store_arguments(dlq)
        else:
            arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq}
            dlq_arguments = {}
        arguments.update(worker._queue_arguments)  # the worker's queue options (worker.py)
        keys = (worker.queue, *(k for k in worker.bindings if k != worker.queue))
        bindings = [(self.exchange, key) for key in keys]
        bindings.append((self.delay_out, f"{RETRY}.{self._stars}.{worker.queue}"))
        bindings.extend((self.delay_out, f"{SCHEDULED}.{self._stars}.{key}") for key in keys)
        return [QueueSpec(dlq, dlq_arguments), QueueSpec(worker.queue, arguments, tuple(bindings))]

    def _store_arguments(self, name: str) -> dict[str, Any]:
        """A quorum queue that keeps dead or unroutable messages: no delivery limit drops them."""
        if name in self.legacy_queues:
            return {"x-queue-type": "quorum"}
        return {"x-queue-type": "quorum", _LIMIT_ARG: DEAD_LETTER_DELIVERY_LIMIT}

    async def declare(self, channel: Declarer, workers: Iterable[type[Worker]] = ()) -> None:
        """Declare the exchange, the delay layout and each worker's queues. Idempotent."""
        await self.declare_exchanges(channel)
        await self.declare_queues(channel, workers)

    async def declare_queues(self, channel: Declarer, workers: Iterable[type[Worker]]) -> None:
        """Each worker's queue and DLQ with their bindings (the exchanges must exist)."""
        for worker in workers:
            for queue in self.worker_queues(worker):
                await self._declare_queue(channel, queue)

    async def adopt_dead_letter_queues(
        self, connection: ChannelSource, workers: Iterable[type[Worker]] = ()
    ) -> None:
        """Declare ``<exchange>.unroutable`` and each quorum worker's DLQ on channels of their
        own, before anything else, so that such a queue left by an older workerkit (no delivery
        limit: the broker refuses the new argument and closes the channel) is found without
        breaking the caller's channel. It is then declared with its old arguments from here on,
        and a warning says how to protect it."""
        stores = [self.delay_queues()[0]]
        stores += [self.worker_queues(worker)[0] for worker in workers]
        for spec in stores:
            if spec.arguments.get(_LIMIT_ARG) != DEAD_LETTER_DELIVERY_LIMIT:
                continue  # a classic DLQ, or one already known to be legacy
            channel = await connection.channel()
            try:
                await channel.declare_queue(spec)
            except TopologyError as exc:
                if f"inequivalent arg '{_LIMIT_ARG}'" not in str(exc):
                    raise
                self.legacy_queues.add(spec.name)
                log.warning(
                    "%s exists without a delivery limit (declared by an older workerkit): kept"
                    " as it is. On RabbitMQ 4.0-4.2 every `dlq list`/`dlq show` counts toward"
                    " the default limit of 20 and would drop its messages: protect it with"
                    " `rabbitmqctl set_policy --apply-to queues workerkit-dead-letters"
                    " '\\.(dlq|unroutable)$' '{\"delivery-limit\": %d}'`, or replay it and"
                    " delete it so that workerkit re-declares it (see docs/brokers.md).",
                    spec.name,
                    DEAD_LETTER_DELIVERY_LIMIT,
                )
                continue  # the refusal closed that channel
            await channel.close()

    async def declare_exchanges(self, channel: Declarer) -> None:
        """The main exchange and the delay layout (what a publisher needs)."""
        await channel.declare_exchange(self.main_exchange())
        for spec in self.delay_exchanges():
            await channel.declare_exchange(spec)
        for destination, source, key in self.delay_exchange_bindings():
            await channel.bind_exchange(destination, source, key)
        for queue in self.delay_queues():
            await self._declare_queue(channel, queue)

    @staticmethod
    async def _declare_queue(channel: Declarer, spec: QueueSpec) -> None:
        await channel.declare_queue(spec)
        for exchange, key in spec.bindings:
            await channel.bind_queue(spec.name, exchange, key)
