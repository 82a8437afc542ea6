"""Middleware: hooks around handlers, publishes and worker start/stop.

Subclass :class:`Middleware`, override the hooks you need, and install an instance per worker
(``middleware = (Timing(),)`` on the class) or for everything a runner or publisher does
(``Runner(..., middleware=[...])``, ``Publisher(middleware=[...])``). workerkit's metrics
(:mod:`workerkit.metrics`) and tracing (:mod:`workerkit.tracing`) are built on these hooks.

Hooks are plain (not ``async``) functions called on the thread that does the work: the event
loop for handler hooks, the publishing thread for publish hooks. They must be quick.

A hook that raises is logged (at most once per 10 s per hook, with a count of the rest) and
changes nothing: the message is handled, acked, retried or dead-lettered exactly as without
it. With no middleware installed the per-message cost is one truthiness check.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .decision import Outcome
from .errors import ConfigurationError, PublishTimeout, Unroutable
from .stats import WorkerStats

if TYPE_CHECKING:
    from .message import Message, Outgoing
    from .worker import Worker

__all__ = [
    "HANDLER_OUTCOMES",
    "PUBLISH_OUTCOMES",
    "Middleware",
    "WorkerStats",
    "check_middleware",
    "observed_publish",
]

log = logging.getLogger("workerkit.middleware")

#: What happened to a delivery, as ``after_handle`` sees it (the values of
#: :class:`workerkit.decision.Outcome`). The first five are handler outcomes; ``requeued`` (a
#: classic queue's redelivery, put back at the tail with its delivery count) and ``given_back``
#: (nacked to the broker: the retry copy was not confirmed, the delivery waited too long
#: locally, or shutdown past the grace period cancelled the handler) are not.
HANDLER_OUTCOMES = tuple(outcome.value for outcome in Outcome)

#: What happened to a publish, as ``after_publish`` sees it.
PUBLISH_OUTCOMES = ("confirmed", "unroutable", "timeout", "error")

# A broken hook is reported at most this often (seconds), with a count of the failures since.
REPORT_EVERY = 10.0


class Middleware:
    """Base class: every hook is a no-op; override the ones you need."""

    #: True: the runtime keeps handler-time and delivery-lag histograms for the workers this is
    #: installed on (``stats.timings`` in :meth:`on_worker_stats`), which costs a few percent of
    #: a no-op delivery; reading them costs nothing per delivery.
    reads_timings: bool = False

    def on_worker_start(self, worker: Worker) -> None:
        """A worker's ``setup()`` returned; it is about to consume."""

    def on_worker_stats(self, worker: Worker, stats: WorkerStats) -> None:
        """Right after ``on_worker_start``: ``stats`` stays live for as long as the process runs
        (its counts only grow, reconnects included). Read it when asked, not per delivery."""

    def on_worker_stop(self, worker: Worker) -> None:
        """A worker's ``teardown()`` returned on shutdown."""

    def on_reconnected(self, seconds: float) -> None:
        """The runner lost its broker connection and every consumer is back after ``seconds``."""

    def before_handle(self, message: Message) -> None:
        """A delivery is taken by a handler slot, before decoding (so bad bodies are seen too).

        ``message`` is as delivered: a retried message still shows the delay layout's exchange
        and routing key here (the handler sees the original ones).
        """

    def after_handle(self, message: Message, outcome: str, duration: float) -> None:
        """The outcome (one of :data:`HANDLER_OUTCOMES`) has been carried out.

        Called once for every ``before_handle``, in the same task; ``duration`` is seconds since
        ``before_handle``, decoding and the confirm of a retry/dead-letter copy included.
        """

    def before_publish(self, outgoing: Outgoing) -> None:
        """About to publish; ``outgoing.headers`` (a dict) may be changed."""

    def after_publish(self, outgoing: Outgoing, outcome: str, duration: float) -> None:
        """The broker answered (outcome in :data:`PUBLISH_OUTCOMES`), or the publish failed."""


def check_middleware(value: object, owner: str) -> tuple[Middleware, ...]:
    """``value`` as a tuple of Middleware instances, else ConfigurationError naming ``owner``."""
    if value is None:
        return ()
    if isinstance(value, Middleware) or not isinstance(value, Iterable):
        raise ConfigurationError(f"{owner}: middleware must be a tuple of Middleware instances")
    items = tuple(value)
    for item in items:
        if isinstance(item, type) and issubclass(item, Middleware):
            raise ConfigurationError(
                f"{owner}: middleware {item.__name__} is a class; install an instance:"
                f" {item.__name__}()"
            )
        if not isinstance(item, Middleware):
            raise ConfigurationError(
                f"{owner}: middleware {item!r} is not a workerkit.middleware.Middleware"
            )
    return items


class _Reporter:
    """Rate-limited error logging for broken hooks (a hook failing on every message must not
    flood the log, nor stay silent)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[int, str], float] = {}
        self._missed: dict[tuple[int, str], int] = {}

    def failed(self, hook: object, name: str) -> None:
        key = (id(hook), name)
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < REPORT_EVERY:
                self._missed[key] = self._missed.get(key, 0) + 1
                return
            self._last[key] = now
            missed = self._missed.pop(key, 0)
        more = f" ({missed} more failure(s) since the last report)" if missed else ""
        log.exception(
            "middleware %s.%s raised; ignored, the message is unaffected%s",
            type(hook).__name__,
            name,
            more,
        )


_report = _Reporter()


def call_hooks(hooks: Sequence[Middleware], name: str, *args: Any) -> None:
    """Call hook ``name`` of each middleware in order; a raising hook is logged and skipped."""
    for hook in hooks:
        try:
            getattr(hook, name)(*args)
        except Exception:
            _report.failed(hook, name)


def call_hooks_reversed(hooks: Sequence[Middleware], name: str, *args: Any) -> None:
    """Like :func:`call_hooks`, innermost first (``after_*`` hooks unwind like a stack)."""
    call_hooks(tuple(reversed(hooks)), name, *args)


def bound_hooks(hooks: Iterable[Middleware], name: str) -> tuple[Callable[..., None], ...]:
    """The ``name`` hooks of ``hooks`` that do something, as bound methods, for
    :func:`run_hooks` on a per-message path: a middleware that keeps the base class's no-op
    costs nothing there, and the method is looked up once instead of per message."""
    base = getattr(Middleware, name)
    found = []
    for hook in hooks:
        method = getattr(hook, name)
        if getattr(method, "__func__", None) is not base:
            found.append(method)
    return tuple(found)


def run_hooks(methods: Sequence[Callable[..., None]], name: str, *args: Any) -> None:
    """:func:`call_hooks` for the ``name`` methods from :func:`bound_hooks`: a raising hook is
    logged and skipped (the runtime's per-message path inlines this loop)."""
    for method in methods:
        try:
            method(*args)
        except Exception:
            hook_failed(method, name)


def hook_failed(method: Callable[..., None], name: str) -> None:
    """Report that hook ``name`` (a method from :func:`bound_hooks`) raised; call it from the
    ``except`` block."""
    _report.failed(getattr(method, "__self__", method), name)


def publish_outcome(error: BaseException | None) -> str:
    """The :data:`PUBLISH_OUTCOMES` name of a publish that raised ``error`` (None: confirmed)."""
    if error is None:
        return "confirmed"
    if isinstance(error, Unroutable):
        return "unroutable"
    if isinstance(error, PublishTimeout):
        return "timeout"
    return "error"


def publish_started(
    hooks: Sequence[Middleware], outgoing: Outgoing
) -> Callable[[BaseException | None], None]:
    """Run ``before_publish`` now; returns what to call with the publish's error (None once
    confirmed), which runs ``after_publish``."""
    call_hooks(hooks, "before_publish", outgoing)
    started = time.perf_counter()

    def finished(error: BaseException | None) -> None:
        duration = time.perf_counter() - started
        call_hooks_reversed(hooks, "after_publish", outgoing, publish_outcome(error), duration)

    return finished


@contextlib.contextmanager
def observed_publish(hooks: Sequence[Middleware], outgoing: Outgoing) -> Iterator[None]:
    """Run the publish hooks around the body of the block (the publish and its confirm).

    The same for the sync and the async publisher: the hooks run in the caller's thread and
    context (which is what carries a trace from a handler into its publishes).
    """
    finished = publish_started(hooks, outgoing)
    try:
        yield
    except BaseException as exc:
        finished(exc)
        raise
    finished(None)
