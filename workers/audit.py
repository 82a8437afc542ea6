"""An audit log fed by events: every ``orders.*`` and ``images.*`` event becomes a JSON line.

Run it with ``workerkit run workers.audit:AuditLog``.

Lines go to the file named by ``AUDIT_LOG`` (default ``/tmp/workerkit-demo/audit.jsonl``). Delivery
is at-least-once, so a line may (rarely) repeat after a crash: readers dedupe on ``message_id``.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from workerkit import Message, Worker

__all__ = ["AuditLog"]

DEFAULT_LOG = "/tmp/workerkit-demo/audit.jsonl"
MAX_FIELD = 200  # long values (image pixels) are summarised, not copied into the log


class AuditLog(Worker):
    queue = "audit"
    bindings = ("orders.*", "images.*")
    queue_type = "classic"  # an append-only log does not need replication in this demo
    concurrency = 4

    async def setup(self) -> None:
        self.path = Path(os.environ.get("AUDIT_LOG", DEFAULT_LOG))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Plain ``def`` handlers run on several pool threads: one writer at a time per file.
        self.lock = threading.Lock()

    def handle(self, event: dict[str, Any], message: Message) -> None:
        record = {
            "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "event": message.routing_key,
            "message_id": message.message_id,
            "attempt": message.attempt,
            "redelivered": message.redelivered,
            "data": _summarise(event),
        }
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with self.lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)


def _summarise(event: dict[str, Any]) -> dict[str, Any]:
    return {
        key: f"<{len(value)} chars>" if isinstance(value, str) and len(value) > MAX_FIELD else value
        for key, value in event.items()
    }
