"""What happens to a delivery: one pure function over everything that can happen to it.

:func:`decide` maps what happened (:class:`Happened`, plus the handler's error, the attempt and
the classic-queue delivery count) to one of a small closed set of decisions. The runtime only
carries the decision out (``match`` + ``assert_never`` in ``runtime.py``); every rule lives here
and in :meth:`RetryPolicy.decide`, and is tested as a table without a broker.

============================  =================================================================
what happened                 decision
============================  =================================================================
HANDLED                       Ack
FAILED / TIMED_OUT            RetryPolicy.decide: Retry(delay, attempt) or DeadLetter(rejected
                              / exhausted)
INVALID (decode/validation)   DeadLetter("invalid")
REDELIVERED (classic queue)   Recount(n) below the delivery limit, else DeadLetter
                              ("delivery-limit")
WAITED (too long locally, or  GiveBack(requeue) - before the broker's consumer_timeout closes
no handler thread free)       the channel and redelivers everything in flight
COPY_FAILED                   the retry/DLQ copy was not confirmed: GiveBack(requeue, pause);
                              a copy that can never be encoded: GiveBack(to the broker's DLX)
============================  =================================================================
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

from .errors import InvalidMessage
from .retry import ACK, Ack, DeadLetter, Retry, RetryPolicy

__all__ = [
    "COPY_PAUSE",
    "Ack",
    "DeadLetter",
    "Decision",
    "GiveBack",
    "Happened",
    "Outcome",
    "Recount",
    "Retry",
    "decide",
    "outcome_of",
]

# Held before handing back a message whose copy could not be published, so that a broker that
# refuses publishes (alarm, outage) does not turn into a hot redelivery loop. Seconds.
COPY_PAUSE = 1.0


class Happened(enum.Enum):
    """What happened to a delivery (the input of :func:`decide`)."""

    HANDLED = "handled"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    INVALID = "invalid"
    REDELIVERED = "redelivered"
    WAITED = "waited"
    COPY_FAILED = "copy_failed"


@dataclass(frozen=True, slots=True)
class Recount:
    """Classic queue: publish a copy to the queue's tail with ``deliveries``, then ack."""

    deliveries: int


@dataclass(frozen=True, slots=True)
class GiveBack:
    """Nack the delivery: back to the queue (``requeue``) or to the broker's dead-letter exchange,
    after holding it ``pause`` seconds."""

    requeue: bool = True
    pause: float = 0.0


Decision = Ack | Retry | DeadLetter | Recount | GiveBack

GIVE_BACK = GiveBack()
GIVE_BACK_LATER = GiveBack(pause=COPY_PAUSE)
TO_BROKER_DLX = GiveBack(requeue=False)
INVALID = DeadLetter("invalid")


def decide(
    what: Happened,
    policy: RetryPolicy,
    *,
    attempt: int = 1,
    error: BaseException | None = None,
    deliveries: int = 1,
    delivery_limit: int = 0,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """The decision for a delivery given what happened to it.

    ``deliveries`` is the classic-queue delivery count including this one; ``delivery_limit``
    the number of redeliveries allowed (the quorum queue's ``x-delivery-limit`` meaning).
    """
    if what is Happened.HANDLED:
        return ACK
    if what is Happened.FAILED or what is Happened.TIMED_OUT:
        return policy.decide(error, attempt, rand)
    if what is Happened.INVALID:
        return INVALID
    if what is Happened.REDELIVERED:
        if deliveries > delivery_limit + 1:
            return DeadLetter("delivery-limit")
        return Recount(deliveries)
    if what is Happened.WAITED:
        return GIVE_BACK
    # COPY_FAILED. A copy that can never be encoded would fail the same way on every
    # redelivery: the broker's dead-letter exchange takes the original (without our headers).
    if isinstance(error, InvalidMessage):
        return TO_BROKER_DLX
    # Unconfirmed (nacked, timed out, channel lost): the original goes back. If the copy did
    # reach the queue after all, that is one duplicate per delivery and fault (see retries.md).
    return GIVE_BACK_LATER


class Outcome(str, enum.Enum):
    """The final outcome of a delivery, as named in logs, metrics and middleware."""

    ACKED = "acked"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"
    REJECTED = "rejected"
    INVALID = "invalid"
    REQUEUED = "requeued"
    GIVEN_BACK = "given_back"


def outcome_of(decision: Decision) -> Outcome:
    """The outcome a carried-out decision stands for."""
    if isinstance(decision, Ack):
        return Outcome.ACKED
    if isinstance(decision, Retry):
        return Outcome.RETRIED
    if isinstance(decision, DeadLetter):
        if decision.reason == "rejected":
            return Outcome.REJECTED
        if decision.reason == "invalid":
            return Outcome.INVALID
        return Outcome.DEAD_LETTERED
    if isinstance(decision, Recount):
        return Outcome.REQUEUED
    return Outcome.GIVEN_BACK
