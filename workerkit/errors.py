"""Every error workerkit raises, in one tree.

::

    WorkerkitError
    ├── ConfigurationError            bad settings, bad Worker class, bad CLI target
    ├── TopologyError                 a queue/exchange exists with other arguments
    ├── ConnectionFailed              broker unreachable, refused credentials or permissions
    │   └── AccessRefused             credentials or vhost permissions refused (fatal, no retry)
    ├── PublishError                  a publish did not reach the broker's durable state
    │   ├── Unroutable                no queue is bound for the routing key (mandatory return)
    │   ├── PublishTimeout            no confirm within the timeout (broker down, blocked, slow)
    │   │   └── RequestTimeout        no reply to a request within its timeout
    │   ├── InvalidMessage            cannot be sent as given (also a ValueError); never sent
    │   │   └── MessageTooLarge       body above ``max_body_size``
    │   └── PublishNacked             the broker refused the message (nack)
    ├── DecodeError                   a body that cannot be decoded or validated (goes to the DLQ)
    ├── RemoteError                   a request's handler failed for good: rejected, exhausted,
    │                                 invalid body (its type, message and the request's id)
    └── HandlerTimeout                a handler ran past its time limit (retried like a failure)

Control flow raised by handlers (not errors of workerkit's own):

* :class:`Reject` - dead-letter this message now, never retry.
* :class:`RetryLater` - retry this message after ``delay`` seconds (counts as an attempt).

pika and aio-pika exceptions never escape workerkit: ``workerkit.transport`` translates them at
one seam into this tree.
"""

from __future__ import annotations

import math
from typing import Any


class WorkerkitError(Exception):
    """Base class of every error raised by workerkit."""

    #: Set on the error ``publish_many`` raises: how many items, from the first, it sent before
    #: it stopped (None on any other error). Items from there on were never sent.
    sent: int | None = None
    #: Set with ``sent``: the positions, among the items sent, that the broker did not confirm
    #: (the failed ones). Every other item sent was confirmed, those after the failure included:
    #: up to 1,000 were on their way when it came.
    unconfirmed: tuple[int, ...] = ()


class ConfigurationError(WorkerkitError, ValueError):
    """Settings, a Worker class or a CLI target is invalid; start-up stops."""


class TopologyError(WorkerkitError):
    """A queue or exchange already exists with arguments other than the ones workerkit declares."""


class ConnectionFailed(WorkerkitError):
    """The broker could not be reached or the connection was lost."""


class AccessRefused(ConnectionFailed):
    """Credentials or permissions were refused: retrying cannot help."""


class PublishError(WorkerkitError):
    """A message was not confirmed by the broker."""


class Unroutable(PublishError):
    """No queue is bound to the routing key; the broker returned the message."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        super().__init__(
            f"no queue is bound to routing key {routing_key!r} on exchange {exchange!r}"
        )
        self.exchange = exchange
        self.routing_key = routing_key


class PublishTimeout(PublishError):
    """No confirm arrived in time (broker down, blocked by an alarm, or overloaded)."""


class InvalidMessage(PublishError, ValueError):
    """The message cannot be sent as given: routing key, reserved header, delay or a body that
    cannot be encoded. Raised before anything is sent."""


class MessageTooLarge(InvalidMessage):
    """The encoded body is larger than the configured ``max_body_size``."""


class PublishNacked(PublishError):
    """The broker answered the publish with a nack."""


class RequestTimeout(PublishTimeout):
    """No reply to a request arrived within its timeout (the whole of its retries included)."""


class DecodeError(WorkerkitError):
    """A message body could not be decoded or validated for its handler."""


class RemoteError(WorkerkitError):
    """The worker answering a request gave up on it: its handler raised Reject, its attempts
    were exhausted, or the request's body was invalid.

    ``type`` is the error's qualified name on the worker's side (``workerkit.errors.DecodeError``
    for an invalid body), ``message`` its text, ``request_id`` the request's message id and
    ``reason`` the dead-letter reason (rejected, exhausted, delivery-limit, invalid).
    """

    def __init__(self, type: str, message: str, request_id: str, reason: str = "") -> None:
        super().__init__(f"{type}: {message} (request {request_id or '?'}, {reason or 'failed'})")
        self.type = type
        self.message = message
        self.request_id = request_id
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type, self.message, self.request_id, self.reason))


class HandlerTimeout(WorkerkitError, TimeoutError):
    """A handler ran longer than its worker's ``handler_timeout``; it counts as a failure."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"handler ran longer than {limit:g}s")
        self.limit = limit


class Reject(Exception):
    """Raised by a handler: send this message to the dead-letter queue now, without retrying."""

    def __init__(self, reason: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(Exception):
    """Raised by a handler: retry this message after ``delay`` seconds (counts as an attempt).

    With ``delay=None`` the worker's RetryPolicy chooses the delay.
    """

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        from .retry import MAX_DELAY  # (retry.py imports this module)

        if delay is not None and not (math.isfinite(delay) and 0 <= delay <= MAX_DELAY):
            raise ValueError(
                f"RetryLater delay must be a finite number from 0 to {MAX_DELAY}s (about 310"
                f" days, the longest delay the broker-side layout holds), got {delay!r}"
            )
        self.delay = delay
        self.reason = reason
