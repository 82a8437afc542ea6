"""The transport seam: the only I/O interface the runner, publishers and tools use.

A transport opens :class:`Connection` objects; a connection opens :class:`Channel` objects. All
methods run on the event loop that opened the connection. Every failure is raised as a
``workerkit.errors`` exception; client-library exceptions never cross this seam.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from ..message import Message, Outgoing
from ..settings import Settings
from .specs import ExchangeSpec, QueueSpec

OnMessage = Callable[[Message], None]
OnLost = Callable[[Exception], None]
OnPublished = Callable[[BaseException | None], None]
OnClosed = Callable[[Exception], None]


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

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None: ...

    async def delete_queue(self, name: str) -> None: ...

    async def delete_exchange(self, name: str) -> None: ...

    async def purge(self, name: str) -> int: ...

    async def get(self, queue: str) -> Message | None:
        """One message with manual ack, or None when the queue is empty."""
        ...

    async def consume(
        self,
        queue: str,
        on_message: OnMessage,
        on_cancelled: Callable[[], None],
        *,
        no_ack: bool = False,
    ) -> str:
        """Start consuming; ``on_cancelled`` runs if the broker cancels the consumer (on the
        pika transport also when the channel ends without its owner closing it: closed by the
        broker, or retired after a nack and closed once its publishes were answered).

        ``no_ack``: the broker considers a message handled once sent (nothing to ack, no
        prefetch limit). Direct reply-to needs it: a caller consumes the pseudo-queue
        ``amq.rabbitmq.reply-to`` with ``no_ack`` on the channel it then publishes its requests
        on, and replies to that channel's address arrive there.
        """
        ...

    async def cancel(self, consumer_tag: str) -> None: ...

    def has_consumer(self, consumer_tag: str) -> bool:
        """Whether this channel's consumer ``consumer_tag`` is still active (neither cancelled by
        the broker nor gone with the channel): a local check, no round trip."""
        ...

    async def flush(self) -> None:
        """Return once the frames buffered so far (acks, publishes) are handed to the socket."""
        ...

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

    @property
    def blocked(self) -> bool:
        """The broker has blocked this connection's publishes (a memory or disk alarm): what it
        sends now is neither confirmed nor refused until the alarm clears. RabbitMQ says so
        after the connection's first publish under the alarm."""
        ...

    async def wait_unblocked(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the broker to unblock this connection (at once
        when it is not blocked, or once it closes); False when it is still blocked."""
        ...

    async def channel(
        self,
        *,
        prefetch: int | None = None,
        confirms: bool = False,
        on_closed: OnClosed | None = None,
    ) -> Channel:
        """Open a channel; ``on_closed(error)`` runs once if the broker or the connection closes
        it (not when it is closed by :meth:`Channel.close`)."""
        ...

    async def close(self) -> None: ...


class Transport(Protocol):
    async def connect(self, settings: Settings, *, name: str, on_lost: OnLost) -> Connection:
        """Open a connection; ``on_lost`` runs once if it later closes unexpectedly.

        Raises AccessRefused (bad credentials or vhost permissions) or ConnectionFailed.
        """
        ...


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Whether ``event`` is set within ``timeout`` seconds (a connection's unblocking)."""
    if event.is_set():
        return True
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True
