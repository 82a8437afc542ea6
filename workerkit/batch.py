"""Batch handlers: what a handler of a ``batch_size`` worker may return.

A batch handler receives the decoded bodies of up to ``batch_size`` messages (collected for at
most ``batch_timeout`` seconds); bodies that cannot be decoded never reach it (each goes to the
DLQ as ``invalid`` on its own). What happens to each message then:

* the handler returns ``None`` (or anything that is not a mapping): every message is acked;
* it returns ``{index: exception}`` (a dict, or :class:`Failures`): the message at ``index`` in
  the list it received is handled as if a one-message handler had raised ``exception``
  (``Reject`` dead-letters it now, ``RetryLater`` and other errors retry it per the worker's
  RetryPolicy); every other message is acked;
* it raises: every message of the batch fails with that error, each retried on its own
  attempt count (a handler that can tell which item failed should return the mapping instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["Failures", "failures_of"]


class Failures(dict[int, BaseException]):
    """``{index in the batch: the exception that item failed with}``, returned by a handler."""


def failures_of(result: Any, size: int) -> dict[int, BaseException]:
    """The per-item failures a batch handler returned; a malformed mapping fails every item
    with a ``TypeError`` that says what was wrong (a handler bug must not ack silently)."""
    if not isinstance(result, Mapping):
        return {}
    bad = [
        key
        for key, value in result.items()
        if not isinstance(key, int)
        or isinstance(key, bool)
        or not 0 <= key < size
        or not isinstance(value, BaseException)
    ]
    if bad:
        error = TypeError(
            f"a batch handler returned {bad[:3]!r} in its failures: keys must be indexes in"
            f" [0, {size}) and values exceptions"
        )
        return dict.fromkeys(range(size), error)
    return dict(result)
