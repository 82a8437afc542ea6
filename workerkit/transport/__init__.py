"""Transports: the only modules that import pika or aio-pika (see ``base.py`` for the seam)."""

from .base import Channel, Connection, Transport

__all__ = ["Channel", "Connection", "Transport"]
