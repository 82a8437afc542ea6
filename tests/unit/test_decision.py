"""The whole table of what can happen to a delivery -> what is done with it, without a broker."""

from __future__ import annotations

import asyncio
import math

import pytest

from workerkit.decision import (
    Ack,
    DeadLetter,
    GiveBack,
    Happened,
    Outcome,
    Recount,
    Retry,
    decide,
    outcome_of,
)
from workerkit.errors import (
    ConnectionFailed,
    DecodeError,
    HandlerTimeout,
    InvalidMessage,
    PublishNacked,
    PublishTimeout,
    Reject,
    RetryLater,
    Unroutable,
)
from workerkit.retry import RetryPolicy

POLICY = RetryPolicy(max_attempts=3, delay=1.0, backoff=2.0, jitter=0.0, never_retry=(KeyError,))


def no_jitter() -> float:
    return 0.0


@pytest.mark.parametrize(
    ("what", "error", "attempt", "expected"),
    [
        (Happened.HANDLED, None, 1, Ack()),
        (Happened.HANDLED, None, 3, Ack()),
        (Happened.FAILED, RuntimeError("x"), 1, Retry(delay=1.0, attempt=2)),
        (Happened.FAILED, RuntimeError("x"), 2, Retry(delay=2.0, attempt=3)),
        (Happened.FAILED, RuntimeError("x"), 3, DeadLetter("exhausted")),
        (Happened.FAILED, asyncio.CancelledError(), 1, Retry(delay=1.0, attempt=2)),
        (Happened.FAILED, SystemExit(1), 1, Retry(delay=1.0, attempt=2)),
        (Happened.FAILED, Reject(), 1, DeadLetter("rejected")),
        (Happened.FAILED, KeyError("k"), 1, DeadLetter("rejected")),
        (Happened.FAILED, RetryLater(5.0), 1, Retry(delay=5.0, attempt=2)),
        (Happened.FAILED, RetryLater(), 2, Retry(delay=2.0, attempt=3)),
        (Happened.FAILED, RetryLater(5.0), 3, DeadLetter("exhausted")),
        (Happened.TIMED_OUT, HandlerTimeout(1.0), 1, Retry(delay=1.0, attempt=2)),
        (Happened.TIMED_OUT, HandlerTimeout(1.0), 3, DeadLetter("exhausted")),
        (Happened.INVALID, DecodeError("bad json"), 1, DeadLetter("invalid")),
        (Happened.INVALID, DecodeError("bad json"), 3, DeadLetter("invalid")),
        (Happened.WAITED, None, 1, GiveBack()),
        (Happened.COPY_FAILED, PublishTimeout("t"), 1, GiveBack(pause=1.0)),
        (Happened.COPY_FAILED, PublishNacked("n"), 1, GiveBack(pause=1.0)),
        (Happened.COPY_FAILED, Unroutable("", "q.dlq"), 1, GiveBack(pause=1.0)),
        (Happened.COPY_FAILED, ConnectionFailed("c"), 1, GiveBack(pause=1.0)),
        (Happened.COPY_FAILED, InvalidMessage("float header"), 1, GiveBack(requeue=False)),
    ],
)
def test_decision_table(
    what: Happened, error: BaseException | None, attempt: int, expected: object
) -> None:
    assert decide(what, POLICY, attempt=attempt, error=error, rand=no_jitter) == expected


@pytest.mark.parametrize(
    ("deliveries", "limit", "expected"),
    [
        (2, 3, Recount(2)),
        (4, 3, Recount(4)),
        (5, 3, DeadLetter("delivery-limit")),
        (2, 0, DeadLetter("delivery-limit")),
    ],
)
def test_classic_redelivery_counts_until_the_limit(
    deliveries: int, limit: int, expected: object
) -> None:
    got = decide(Happened.REDELIVERED, POLICY, deliveries=deliveries, delivery_limit=limit)
    assert got == expected


def test_every_happening_is_decided() -> None:
    errors = {Happened.FAILED: RuntimeError(), Happened.TIMED_OUT: HandlerTimeout(1)}
    for what in Happened:
        decision = decide(what, POLICY, error=errors.get(what))
        assert isinstance(decision, Ack | Retry | DeadLetter | Recount | GiveBack)


@pytest.mark.parametrize(
    ("decision", "outcome"),
    [
        (Ack(), Outcome.ACKED),
        (Retry(1.0, 2), Outcome.RETRIED),
        (DeadLetter("exhausted"), Outcome.DEAD_LETTERED),
        (DeadLetter("delivery-limit"), Outcome.DEAD_LETTERED),
        (DeadLetter("rejected"), Outcome.REJECTED),
        (DeadLetter("invalid"), Outcome.INVALID),
        (Recount(2), Outcome.REQUEUED),
        (GiveBack(), Outcome.GIVEN_BACK),
        (GiveBack(requeue=False), Outcome.GIVEN_BACK),
    ],
)
def test_outcome_names(decision: object, outcome: Outcome) -> None:
    assert outcome_of(decision) is outcome  # type: ignore[arg-type]
    assert outcome.value in {
        "acked",
        "retried",
        "dead_lettered",
        "rejected",
        "invalid",
        "requeued",
        "given_back",
    }


@pytest.mark.parametrize("delay", [math.inf, math.nan, -1.0, -math.inf])
def test_retry_later_refuses_delays_that_are_not_finite_and_positive(delay: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        RetryLater(delay)


def test_a_non_finite_delay_that_slipped_in_falls_back_to_the_policy() -> None:
    later = RetryLater()
    later.delay = math.nan
    assert decide(Happened.FAILED, POLICY, error=later, rand=no_jitter) == Retry(1.0, 2)


def test_a_policy_that_retries_only_some_exceptions_rejects_base_exceptions() -> None:
    narrow = RetryPolicy(retry_on=(ConnectionError,))
    assert decide(Happened.FAILED, narrow, error=SystemExit(1)) == DeadLetter("rejected")
