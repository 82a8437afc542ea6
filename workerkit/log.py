"""Logging set-up: one line per event, plain or JSON, with worker, queue and message id."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import orjson

__all__ = ["JsonFormatter", "PlainFormatter", "configure_logging", "log_context"]

_CONTEXT = ("child", "worker", "queue", "message_id", "attempt", "reason", "delay")

#: Extra fields for every workerkit log line written in this context (a middleware sets it in
#: ``before_handle``: every line about that delivery then carries them).
log_context: ContextVar[Mapping[str, Any]] = ContextVar(
    "workerkit_log_context", default=MappingProxyType({})
)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {key: getattr(record, key) for key in _CONTEXT if hasattr(record, key)}
    extra = log_context.get()
    if extra:
        fields.update(extra)
    return fields


class PlainFormatter(logging.Formatter):
    """One line per record: UTC time, level, logger, message, then ``[key=value ...]`` of its
    context (workerkit's fields and :data:`log_context`). Give it to your own handlers for
    your loggers' lines to carry the same context."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        context = " ".join(f"{key}={value}" for key, value in _fields(record).items())
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: "
        line += record.getMessage() + (f" [{context}]" if context else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with its context fields (as :class:`PlainFormatter`)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class _ChildIndex(logging.Filter):
    """Stamps every record with the worker process's index in its group (``child=N``)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.child = self.index
        return True


def configure_logging(level: str = "INFO", fmt: str = "plain", child: int | None = None) -> None:
    """Route workerkit's loggers to stderr in the chosen format (idempotent). ``child``: the
    index of a ``--processes`` group's worker process, carried by each of its lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    if child is not None:
        handler.addFilter(_ChildIndex(child))
    root = logging.getLogger("workerkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # pika logs every reconnect attempt at ERROR with a traceback; workerkit reports those itself.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
