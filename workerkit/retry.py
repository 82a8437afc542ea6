"""Retry policies as small values, and the pure decision of what happens after a handler ran.

:class:`RetryPolicy` says how a *message* is retried (broker-side, see ``topology.py``);
:func:`reconnecting` says how a *connection or publish* is retried (tenacity).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import tenacity

from .errors import AccessRefused, ConfigurationError, Reject, RetryLater, TopologyError

__all__ = [
    "LEVELS",
    "MAX_DELAY",
    "UNIT_MS",
    "Ack",
    "AnyThreadRetrying",
    "DeadLetter",
    "Decision",
    "Retry",
    "RetryPolicy",
    "reconnecting",
]


@dataclass(frozen=True, slots=True)
class Ack:
    """The handler succeeded: acknowledge."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Publish a copy due in ``delay`` seconds with attempt ``attempt``, then ack the original."""

    delay: float
    attempt: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Publish a copy to the DLQ with ``reason`` (rejected / exhausted / invalid), then ack."""

    reason: str


Decision = Ack | Retry | DeadLetter
ACK = Ack()


# The broker-side delay layout (topology.py): LEVELS levels of UNIT_MS-millisecond units, so the
# longest delay it holds is MAX_DELAY seconds, about 310 days. A longer one would be cut short.
LEVELS = 28
UNIT_MS = 100
MAX_DELAY = (2**LEVELS - 1) * UNIT_MS / 1000


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed message is retried.

    The n-th retry waits ``delay * backoff ** (n - 1)`` seconds, capped at ``max_delay``, plus up to
    ``jitter`` times that at random (so retries never come *sooner* than the computed delay).
    ``retry_on`` limits retries to those exception types; ``never_retry`` dead-letters at once.
    ``max_attempts`` counts the first delivery: ``max_attempts=1`` means never retry.
    """

    max_attempts: int = 5
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    never_retry: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.max_attempts < 1:
            problems.append("max_attempts must be >= 1")
        if self.delay < 0 or self.max_delay < 0:
            problems.append("delay and max_delay must be >= 0")
        if self.max_delay > MAX_DELAY:
            problems.append(f"max_delay must be at most {MAX_DELAY}s (about 310 days)")
        if self.backoff < 1:
            problems.append("backoff must be >= 1")
        if not 0 <= self.jitter <= 1:
            problems.append("jitter must be between 0 and 1")
        for types in (self.retry_on, self.never_retry):
            if not isinstance(types, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in types
            ):
                problems.append("retry_on and never_retry must be tuples of exception types")
        if problems:
            raise ConfigurationError("invalid RetryPolicy: " + "; ".join(problems))

    @classmethod
    def none(cls) -> RetryPolicy:
        """Never retry: the first failure dead-letters."""
        return cls(max_attempts=1)

    def delay_for(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before attempt ``attempt + 1``, after attempt ``attempt`` failed."""
        try:
            grown = self.delay * self.backoff ** (attempt - 1)
        except OverflowError:  # thousands of attempts: the cap applies anyway
            grown = math.inf
        base = min(grown, self.max_delay)
        return min(base + base * self.jitter * rand(), max(self.max_delay, base))

    def decide(
        self,
        error: BaseException | None,
        attempt: int,
        rand: Callable[[], float] = random.random,
    ) -> Decision:
        """What to do with a message whose ``attempt``-th handling ended with ``error``."""
        if error is None:
            return ACK
        if isinstance(error, Reject):
            return DeadLetter("rejected")
        if isinstance(error, RetryLater):
            if attempt >= self.max_attempts:
                return DeadLetter("exhausted")
            delay = error.delay
            if delay is None or not 0 <= delay <= MAX_DELAY:  # None, or a bad one slipped in
                delay = self.delay_for(attempt, rand)
            return Retry(delay=delay, attempt=attempt + 1)
        if isinstance(error, self.never_retry) or not self._retries(error):
            return DeadLetter("rejected")
        if attempt >= self.max_attempts:
            return DeadLetter("exhausted")
        return Retry(delay=self.delay_for(attempt, rand), attempt=attempt + 1)

    def _retries(self, error: BaseException) -> bool:
        # A BaseException that is not an Exception (a handler's own CancelledError, SystemExit)
        # is a handler failure like any other when the policy retries every Exception.
        if isinstance(error, self.retry_on):
            return True
        return not isinstance(error, Exception) and Exception in self.retry_on


_FATAL = (AccessRefused, TopologyError, ConfigurationError)


class AnyThreadRetrying(tenacity.AsyncRetrying):
    """tenacity's async retrying with its state kept per retrying object, not per thread.

    tenacity keeps a retry's statistics and iteration state in a ``threading.local``. The sync
    Publisher's event loop is driven by whichever calling thread is waiting (leader/follower),
    so one retry can start on one thread and resume on another, which found empty state there
    (``KeyError: 'idle_for'``). Each retry here is its own object on one event loop, so plain
    attributes are right. (tests/unit/test_retry.py checks the attribute tenacity uses.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._local = SimpleNamespace()  # type: ignore[assignment]


def reconnecting(
    *,
    max_delay: float,
    stop_after: float | None = None,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    sleep: Callable[[float], Any] | None = None,
    before_sleep: Callable[[tenacity.RetryCallState], Any] | None = None,
) -> tenacity.AsyncRetrying:
    """Jittered exponential backoff for connecting; fatal errors (refused credentials, topology
    clashes, bad settings) are never retried. ``stop_after=None`` retries forever."""
    kwargs: dict[str, Any] = {}
    if sleep is not None:
        kwargs["sleep"] = sleep
    return tenacity.AsyncRetrying(
        wait=tenacity.wait_random_exponential(multiplier=0.2, max=max_delay),
        stop=tenacity.stop_after_delay(stop_after)
        if stop_after is not None
        else tenacity.stop_never,
        retry=tenacity.retry_if_exception_type(retry_on)
        & tenacity.retry_if_not_exception_type(_FATAL),
        reraise=True,
        before_sleep=before_sleep,
        **kwargs,
    )
