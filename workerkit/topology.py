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
  exchange. The total wait is therefore the delay, rounded up to a unit.
* Every message in one level queue has the same TTL, so the queue's head always expires first:
  no head-of-line blocking, whatever the mix of delays.
* ``delay.out`` routes ``r.<bits>.<queue>`` (a retry) to exactly that queue and
  ``p.<bits>.<routing key>`` (a scheduled publish) to every queue whose bindings match, the same
  as the main exchange would. What matches nothing goes to ``<exchange>.unroutable`` (its
  alternate exchange) instead of vanishing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from .message import Header
from .settings import Settings
from .transport.specs import ExchangeSpec, QueueSpec
from .worker import Worker

__all__ = [
    "LEVELS",
    "MAX_DELAY",
    "UNIT_MS",
    "ExchangeSpec",
    "QueueSpec",
    "Topology",
    "delay_units",
]

LEVELS = 28  # 2**28 units of 100 ms: delays up to about 310 days
UNIT_MS = 100
MAX_UNITS: int = 2**LEVELS - 1
MAX_DELAY = MAX_UNITS * UNIT_MS / 1000  # seconds: about 310 days

RETRY = "r"
SCHEDULED = "p"


class Declarer(Protocol):
    """What declaring needs from a transport channel."""

    async def declare_exchange(self, spec: ExchangeSpec) -> None: ...

    async def declare_queue(self, spec: QueueSpec) -> None: ...

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None: ...

    async def bind_exchange(self, destination: str, source: str, routing_key: str) -> None: ...


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
        return self.level_name(LEVELS - 1), f"{kind}.{bits}.{target}"

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
        queues = [QueueSpec(self.unroutable, {"x-queue-type": "quorum"}, ((self.unroutable, ""),))]
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
            dlq_arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        else:
            arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq}
            dlq_arguments = {}
        arguments.update(worker._queue_arguments)  # the worker's queue options (worker.py)
        keys = (worker.queue, *(k for k in worker.bindings if k != worker.queue))
        bindings = [(self.exchange, key) for key in keys]
        bindings.append((self.delay_out, f"{RETRY}.{self._stars}.{worker.queue}"))
        bindings.extend((self.delay_out, f"{SCHEDULED}.{self._stars}.{key}") for key in keys)
        return [QueueSpec(dlq, dlq_arguments), QueueSpec(worker.queue, arguments, tuple(bindings))]

    async def declare(self, channel: Declarer, workers: Iterable[type[Worker]] = ()) -> None:
        """Declare the exchange, the delay layout and each worker's queues. Idempotent."""
        await self.declare_exchanges(channel)
        await self.declare_queues(channel, workers)

    async def declare_queues(self, channel: Declarer, workers: Iterable[type[Worker]]) -> None:
        """Each worker's queue and DLQ with their bindings (the exchanges must exist)."""
        for worker in workers:
            for queue in self.worker_queues(worker):
                await self._declare_queue(channel, queue)

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
