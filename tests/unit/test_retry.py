"""RetryPolicy: the pure decision after a handler ran, with an injected random source."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from workerkit import ConfigurationError, Reject, RetryLater, RetryPolicy, Settings
from workerkit.errors import AccessRefused, ConnectionFailed, HandlerTimeout, TopologyError
from workerkit.retry import MAX_DELAY, Ack, DeadLetter, Retry, reconnecting


def zero() -> float:
    return 0.0


def one() -> float:
    return 0.999999


def test_delay_grows_by_backoff_without_jitter() -> None:
    policy = RetryPolicy(delay=1.0, backoff=2.0, max_delay=300.0, jitter=0.0)
    assert [policy.delay_for(n, one) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_delay_is_capped_at_max_delay() -> None:
    policy = RetryPolicy(delay=1.0, backoff=10.0, max_delay=50.0, jitter=0.5)
    assert policy.delay_for(3, zero) == 50.0
    assert policy.delay_for(10, one) == 50.0  # jitter never pushes past the cap


def test_huge_attempt_numbers_do_not_overflow() -> None:
    policy = RetryPolicy(max_attempts=5000, delay=1.0, backoff=2.0, max_delay=60.0, jitter=0.0)
    assert policy.delay_for(1100, one) == 60.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_jitter_bounds_and_never_sooner(attempt: int) -> None:
    policy = RetryPolicy(delay=0.5, backoff=3.0, max_delay=1000.0, jitter=0.2)
    base = 0.5 * 3.0 ** (attempt - 1)
    assert policy.delay_for(attempt, zero) == pytest.approx(base)
    assert policy.delay_for(attempt, one) == pytest.approx(base * 1.2, rel=1e-5)
    samples = [policy.delay_for(attempt) for _ in range(500)]  # the real random source
    assert min(samples) >= base
    assert max(samples) <= base * 1.2 + 1e-9
    assert len(set(samples)) > 1  # jitter really spreads retries out


def test_success_acks() -> None:
    assert isinstance(RetryPolicy().decide(None, 1), Ack)


def test_exception_retries_with_next_attempt_and_computed_delay() -> None:
    policy = RetryPolicy(max_attempts=5, delay=2.0, backoff=2.0, jitter=0.0)
    assert policy.decide(ValueError("x"), 1, zero) == Retry(delay=2.0, attempt=2)
    assert policy.decide(ValueError("x"), 3, zero) == Retry(delay=8.0, attempt=4)


def test_exhaustion_at_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert isinstance(policy.decide(RuntimeError(), 2, zero), Retry)
    assert policy.decide(RuntimeError(), 3, zero) == DeadLetter("exhausted")
    assert policy.decide(RuntimeError(), 9, zero) == DeadLetter("exhausted")


def test_none_never_retries() -> None:
    assert RetryPolicy.none().decide(RuntimeError(), 1) == DeadLetter("exhausted")


def test_reject_dead_letters_at_once() -> None:
    assert RetryPolicy(max_attempts=10).decide(Reject("no address"), 1) == DeadLetter("rejected")


def test_retry_later_with_its_own_delay() -> None:
    policy = RetryPolicy(max_attempts=4, delay=100.0)
    assert policy.decide(RetryLater(delay=2.5), 1, one) == Retry(delay=2.5, attempt=2)
    assert policy.decide(RetryLater(delay=0), 2, one) == Retry(delay=0, attempt=3)


def test_retry_later_without_delay_uses_the_policy() -> None:
    policy = RetryPolicy(max_attempts=4, delay=3.0, backoff=2.0, jitter=0.0)
    assert policy.decide(RetryLater(), 2, zero) == Retry(delay=6.0, attempt=3)


def test_retry_later_counts_as_an_attempt_and_exhausts() -> None:
    assert RetryPolicy(max_attempts=2).decide(RetryLater(1.0), 2) == DeadLetter("exhausted")


def test_retry_later_refuses_negative_delay() -> None:
    with pytest.raises(ValueError):
        RetryLater(delay=-1)


def test_retry_later_refuses_a_delay_the_layout_cannot_hold() -> None:
    """The broker-side layout holds up to MAX_DELAY: a longer copy was due sooner than logged."""
    assert RetryPolicy().decide(RetryLater(MAX_DELAY), 1) == Retry(delay=MAX_DELAY, attempt=2)
    with pytest.raises(ValueError, match="310 days"):
        RetryLater(delay=MAX_DELAY + 1)
    with pytest.raises(ConfigurationError, match="WORKERKIT_RETRY_MAX_DELAY"):
        Settings(retry_max_delay=MAX_DELAY + 1)


class Transient(Exception):
    pass


class Permanent(Transient):
    pass


def test_retry_on_limits_what_is_retried() -> None:
    # A handler timeout is a workerkit.errors.HandlerTimeout, which is a TimeoutError.
    policy = RetryPolicy(retry_on=(Transient, TimeoutError))
    assert isinstance(policy.decide(Transient(), 1), Retry)
    assert isinstance(policy.decide(TimeoutError(), 1), Retry)
    assert isinstance(policy.decide(HandlerTimeout(5.0), 1), Retry)
    assert policy.decide(KeyError("k"), 1) == DeadLetter("rejected")


def test_never_retry_wins_over_retry_on() -> None:
    policy = RetryPolicy(retry_on=(Transient,), never_retry=(Permanent,))
    assert policy.decide(Permanent(), 1) == DeadLetter("rejected")
    assert isinstance(policy.decide(Transient(), 1), Retry)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"delay": -1},
        {"max_delay": -1},
        {"max_delay": MAX_DELAY + 1},  # the delay layout would cut it short
        {"backoff": 0.5},
        {"jitter": 1.5},
        {"retry_on": Exception},
        {"never_retry": (int,)},
    ],
)
def test_invalid_policies(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="invalid RetryPolicy"):
        RetryPolicy(**kwargs)


async def test_reconnecting_retries_transient_errors_then_succeeds() -> None:
    calls: list[int] = []
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async for attempt in reconnecting(max_delay=2.0, sleep=sleep):
        with attempt:
            calls.append(1)
            if len(calls) < 4:
                raise ConnectionFailed("down")
    assert len(calls) == 4
    assert len(slept) == 3
    assert all(0 <= s <= 2.0 for s in slept)


@pytest.mark.parametrize("fatal", [AccessRefused("bad password"), TopologyError("clash")])
async def test_reconnecting_never_retries_fatal_errors(fatal: Exception) -> None:
    calls = 0

    async def sleep(seconds: float) -> None:
        raise AssertionError("a fatal error must not be retried")

    with pytest.raises(type(fatal)):
        async for attempt in reconnecting(max_delay=1.0, sleep=sleep):
            with attempt:
                calls += 1
                raise fatal
    assert calls == 1


def test_any_thread_retrying_replaces_tenacitys_per_thread_state() -> None:
    # AnyThreadRetrying relies on tenacity keeping its state in ``_local``: if a tenacity
    # release renames it, this fails instead of the sync Publisher failing mid-retry.
    from workerkit.retry import AnyThreadRetrying

    retrying = AnyThreadRetrying()
    retrying.statistics["idle_for"] = 1.0
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(retrying.statistics.get("idle_for")))
    thread.start()
    thread.join()
    assert seen == [1.0]
