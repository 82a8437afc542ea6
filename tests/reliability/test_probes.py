"""/ready and /metrics while the broker is away (a private node: stop_app, then start_app)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import PrivateBroker

WORKERKIT = Path(sys.executable).parent / "workerkit"

APP = """
from workerkit import Worker


class Away(Worker):
    queue = {queue!r}

    async def handle(self, body: bytes) -> None:
        pass
"""


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return 0, ""


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def reconnects(port: int) -> float | None:
    code, text = get(port, "/metrics")
    found = re.search(r"^workerkit_reconnects_total (\S+)$", text, re.M)
    return float(found.group(1)) if code == 200 and found else None


def test_ready_is_503_while_the_broker_is_away(
    private_broker: PrivateBroker, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    module = f"awayapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(APP.format(queue=unique("away")))
    stderr = tmp_path / "stderr.log"
    env = {
        **os.environ,
        "WORKERKIT_URL": private_broker.url,
        "WORKERKIT_RECONNECT_MAX_DELAY": "1",
        "WORKERKIT_HEARTBEAT": "2",
    }
    with stderr.open("wb") as sink:
        proc = subprocess.Popen(
            [str(WORKERKIT), "run", module, "--health-port", "0", "--health-host", "127.0.0.1"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        found = until(
            lambda: re.search(r"health endpoint on http://127.0.0.1:(\d+)/", stderr.read_text()),
            30,
            "the health endpoint",
        )
        port = int(found.group(1))
        until(lambda: get(port, "/ready")[0] == 200, 30, "ready")
        assert reconnects(port) == 0
        private_broker.stop_app()
        try:
            until(lambda: get(port, "/ready")[0] == 503, 15, "/ready 503 with the broker away")
            assert get(port, "/health")[0] == 503
            time.sleep(1.5)  # several reconnect attempts fail meanwhile
            assert get(port, "/ready")[0] == 503
        finally:
            private_broker.start_app()
        until(lambda: get(port, "/ready")[0] == 200, 60, "ready again after the broker is back")
        assert reconnects(port) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, stderr.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
