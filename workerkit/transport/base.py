"""The transport seam: the only I/O interface the runner, publishers and tools use.

A transport opens :class:`Connection` objects; a connection opens :class:`Channel` objects. All
methods run on the event loop that opened the connection. Every failure is raised as a
``workerkit.errors`` exception; client-library exceptions never cross this seam.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..message import Message, Outgoing
from ..settings import Settings
from .specs import ExchangeSpec, QueueSpec

OnMessage = Callable[[Message], None]
OnLost = Callable[[Exception], None]
OnPublished = Callable[[BaseException | None], None]


class Channel(Protocol):
    @property
    def is_open(self) -> bool: ...

    async def declare_exchange(self, spec: ExchangeSpec) -> None: ...

    async def declare_queue(self, spec: QueueSpec) -> None: ...

    async def queue_state(self, name: str) -> tuple[int, int]:
        """(messages ready, consumers) of an existing queue; TopologyError if it is missing."""
        ...

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None: ...

    async def bind_exchange(self, destination: str, source: str, routing_key: str) -> None: ...

    async def delete_queue(self, name: str) -> None: ...

    async def purge(self, name: str) -> int: ...

    async def get(self, queue: str) -> Message | None:
        """One message with manual ack, or None when the queue is empty."""
        ...

    async def consume(
        self, queue: str, on_message: OnMessage, on_cancelled: Callable[[], None]
    ) -> str:
        """Start consuming; ``on_cancelled`` runs if the broker cancels the consumer."""
        ...

    async def cancel(self, consumer_tag: str) -> None: ...

    def ack(self, delivery_tag: int, multiple: bool = False) -> None: ...

    def nack(self, delivery_tag: int, requeue: bool = True) -> None: ...

    async def publish(self, message: Outgoing, *, mandatory: bool, timeout: float) -> None:
        """Publish persistently and wait for the broker's confirm (confirm channels only).

        Raises Unroutable, PublishNacked, PublishTimeout or ConnectionFailed.
        """
        ...

    def publish_nowait(
        self, message: Outgoing, *, mandatory: bool, timeout: float, on_done: OnPublished
    ) -> None:
        """Like :meth:`publish`, for callbacks: ``on_done(error or None)`` runs exactly once,
        on the loop, when the broker answered (or the timeout or a lost channel did)."""
        ...

    async def close(self) -> None: ...


class Connection(Protocol):
    @property
    def is_open(self) -> bool: ...

    async def channel(self, *, prefetch: int | None = None, confirms: bool = False) -> Channel: ...

    async def close(self) -> None: ...


class Transport(Protocol):
    async def connect(self, settings: Settings, *, name: str, on_lost: OnLost) -> Connection:
        """Open a connection; ``on_lost`` runs once if it later closes unexpectedly.

        Raises AccessRefused (bad credentials or vhost permissions) or ConnectionFailed.
        """
        ...
