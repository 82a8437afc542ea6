"""Transports: the only modules that import pika (see ``base.py`` for the seam)."""

from .base import Channel, Connection, Transport
from .specs import ExchangeSpec, QueueSpec

__all__ = ["Channel", "Connection", "ExchangeSpec", "QueueSpec", "Transport", "default_transport"]


def default_transport() -> Transport:
    """The transport used when none is given: pika's asyncio adapter (imported on first use)."""
    from .pika_asyncio import PikaTransport

    return PikaTransport()
