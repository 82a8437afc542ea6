"""The oracle: what was published (with confirms) versus what handlers finished or dead-lettered.

* **lost** = confirmed - (finished | dead-lettered): must be empty, always.
* **unexpected** = (finished | dead-lettered) - attempted: must be empty (nothing made up).
* **duplicates**: deliveries finished more than once; at-least-once allows them, but only for
  messages that were in flight when a fault hit, so they are bounded by in-flight x faults.

A publish that raised is "unknown": it may or may not have reached the queue (the confirm may
have been lost with the connection), so it may be finished or not, but it must not be counted
as lost.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
from broker import version_under_test

RESULTS_ENV = "WORKERKIT_TEST_RELIABILITY_RESULTS"


@dataclass
class Oracle:
    name: str
    attempted: set[str] = field(default_factory=set)
    confirmed: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    attempted_at: dict[str, float] = field(default_factory=dict)  # time.time() of the attempt
    finished: collections.Counter[str] = field(default_factory=collections.Counter)
    dead: set[str] = field(default_factory=set)
    recovery: list[float] = field(default_factory=list)
    faults: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- recording (thread-safe) -------------------------------------------------------------

    def attempt(self, message_id: str) -> None:
        with self._lock:
            self.attempted.add(message_id)
            self.attempted_at.setdefault(message_id, time.time())

    def confirm(self, message_id: str) -> None:
        with self._lock:
            self.confirmed.add(message_id)

    def fail(self, message_id: str) -> None:
        with self._lock:
            self.unknown.add(message_id)

    def finish(self, message_id: str) -> None:
        with self._lock:
            self.finished[message_id] += 1

    def finish_many(self, ids: Iterable[str]) -> None:
        with self._lock:
            self.finished.update(ids)

    def fault(self) -> None:
        self.faults += 1

    def recovered(self, seconds: float | None) -> None:
        if seconds is not None:
            self.recovery.append(seconds)

    # -- verdicts ----------------------------------------------------------------------------

    @property
    def accounted(self) -> set[str]:
        return set(self.finished) | self.dead

    @property
    def lost(self) -> set[str]:
        return self.confirmed - self.accounted

    @property
    def unexpected(self) -> set[str]:
        return self.accounted - self.attempted

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.finished.values() if count > 1)

    def all_confirmed_accounted(self) -> bool:
        return not self.lost

    def check(self, *, max_duplicates: int) -> None:
        """Assert the verdict and record this scenario's row when asked to."""
        self.write_row()
        assert not self.lost, (
            f"{self.name}: {len(self.lost)} confirmed message(s) lost: {sorted(self.lost)[:10]}"
        )
        assert not self.unexpected, f"{self.name}: unexpected ids {sorted(self.unexpected)[:10]}"
        assert self.duplicates <= max_duplicates, (
            f"{self.name}: {self.duplicates} duplicates > bound {max_duplicates}"
        )

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.name,
            "broker": version_under_test(),
            "attempted": len(self.attempted),
            "confirmed": len(self.confirmed),
            "unknown": len(self.unknown),
            "finished": len(self.finished),
            "dead_lettered": len(self.dead),
            "lost": len(self.lost),
            "unexpected": len(self.unexpected),
            "duplicates": self.duplicates,
            "faults": self.faults,
            "recovery_s": [round(r, 2) for r in self.recovery],
        }

    def write_row(self) -> None:
        """Append this scenario's row to the JSON-lines file named by the env var (if set)."""
        path = os.environ.get(RESULTS_ENV)
        if not path:
            return
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(self.row()) + "\n")

    # -- reading the broker ------------------------------------------------------------------

    def read_dlq(self, url: str, queue: str) -> list[dict[str, Any]]:
        """Record every id in ``<queue>.dlq`` (acked away) and return their headers."""
        found = drain(url, f"{queue}.dlq")
        with self._lock:
            self.dead.update(mid for mid, _ in found)
        return [headers for _, headers in found]


def drain(url: str, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message in ``queue`` as (message id, headers), acked."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        out: list[tuple[str, dict[str, Any]]] = []
        while True:
            method, props, _body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                return out
            out.append((props.message_id or "", dict(props.headers or {})))
            channel.basic_ack(method.delivery_tag)
    finally:
        connection.close()


def read_finished_file(path: Path) -> list[str]:
    """Ids written by a worker subprocess, one per line (a torn last line is ignored)."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]
    return [line for line in lines if line]
