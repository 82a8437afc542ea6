"""``workerkit status`` through the management API of the broker under test: the shared node's
on 3.10 (scripts/test.sh enables the plugin), the session node's own on 4.x runs (given as
WORKERKIT_MANAGEMENT_URL, see tests/conftest.py). The AMQP fallback is tested on a private node
without plugins (tests/reliability/test_status_fallback.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from broker import management_serves
from click.testing import CliRunner

from workerkit import Settings
from workerkit.cli import _declare, cli

from .workers_fixture import delete_queues, publish_raw

pytestmark = pytest.mark.integration

WORKERKIT = Path(sys.executable).parent / "workerkit"

APP = """
from workerkit import Worker


class Watched(Worker):
    queue = {queue!r}

    async def handle(self, body: bytes) -> None:
        pass
"""


@pytest.fixture
def app(
    tmp_path: Path,
    settings: Settings,
    unique: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[str, str]]:
    url = settings.url.get_secret_value()
    given = settings.management_url.get_secret_value() if settings.management_url else None
    if not management_serves(url, given):
        message = (
            f"the management API of the broker under test does not answer at {given or '15672'}"
            " (scripts/test.sh enables it on the shared node)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    queue = unique("status")
    module = f"statusapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(APP.format(queue=queue))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WORKERKIT_URL", settings.url.get_secret_value())
    monkeypatch.setenv("WORKERKIT_EXCHANGE", settings.exchange)
    if given:
        monkeypatch.setenv("WORKERKIT_MANAGEMENT_URL", given)
    yield module, queue
    delete_queues(settings.url.get_secret_value(), queue, f"{queue}.dlq")


def status(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["status", *args])
    return result.exit_code, result.stdout, result.stderr


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.25)


def test_status_shows_depths_from_the_management_api(
    app: tuple[str, str], settings: Settings
) -> None:
    module, queue = app
    url = settings.url.get_secret_value()
    from workerkit.cli import load_targets

    asyncio.run(_declare(settings, load_targets([module])))
    for n in range(3):
        publish_raw(url, settings.exchange, queue, b"%d" % n)
    for n in range(2):
        publish_raw(url, "", f"{queue}.dlq", b"dead %d" % n)

    def mine() -> dict[str, Any] | None:
        code, out, _ = status(module, "--json")
        assert code == 0, out
        doc = orjson.loads(out)
        (row,) = doc["queues"]
        # The management API refreshes its counts every few seconds.
        return doc if row["ready"] == 3 and row["dlq"] == 2 else None

    doc = until(mine, 20, "the management API to show 3 ready and 2 dead")
    assert doc["source"] == "management" and doc["management_error"] is None
    assert doc["version"] == 1 and doc["dead_letters"] == 2
    (row,) = doc["queues"]
    assert row == {
        "queue": queue,
        "exists": True,
        "ready": 3,
        "unacked": 0,
        "consumers": 0,
        "dlq": 2,
        "publish_rate": row["publish_rate"],
        "deliver_rate": row["deliver_rate"],
    }
    assert isinstance(row["publish_rate"], float) and isinstance(row["deliver_rate"], float)
    assert isinstance(doc["delay_waiting"], int)  # the tests' exchange has a delay layout

    # Without modules: every workerkit queue on the vhost, ours among them.
    code, out, _ = status("--json")
    assert code == 0
    assert queue in {q["queue"] for q in orjson.loads(out)["queues"]}

    code, out, err = status(module)
    assert code == 0
    assert out.splitlines()[0].split() == [
        "QUEUE",
        "READY",
        "UNACKED",
        "CONSUMERS",
        "DLQ",
        "PUBLISH/S",
        "DELIVER/S",
    ]
    assert out.splitlines()[1].split()[:5] == [queue, "3", "0", "0", "2"]
    assert "source: management API at http://" in out

    code, out, err = status(module, "--check")
    assert code == 1
    assert f"2 dead letter(s): {queue}.dlq (2)" in err


@pytest.mark.parametrize("command", ["status", "topology"])
def test_a_vhost_the_api_does_not_have_is_refused_not_read_as_empty(
    app: tuple[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The API answers for the broker, the URL names a vhost it does not have: not an empty
    status or "missing queue" drift (exit 0 or 1), but what AMQP says, exit 4."""
    module, _queue = app
    url = settings.url.get_secret_value().rstrip("/") + "/no-such-vhost"
    if not os.environ.get("WORKERKIT_MANAGEMENT_URL"):  # given, as a monitoring host would
        monkeypatch.setenv("WORKERKIT_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672")
    args = [module, "--url", url] if command == "status" else [module, "--check", "--url", url]
    result = CliRunner().invoke(cli, [command, *args])
    assert result.exit_code == 4, result.output
    assert "access to the virtual host was refused" in result.stderr.splitlines()[-1]


def test_check_passes_when_every_dlq_is_empty(app: tuple[str, str], settings: Settings) -> None:
    module, _queue = app
    from workerkit.cli import load_targets

    asyncio.run(_declare(settings, load_targets([module])))
    code, _out, err = status(module, "--check")
    assert code == 0, err


def test_watch_json_prints_one_document_per_refresh(
    app: tuple[str, str], settings: Settings, tmp_path: Path
) -> None:
    module, queue = app
    with _watching(module, tmp_path, "--json") as proc:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert orjson.loads(first)["queues"][0]["queue"] == queue
        assert orjson.loads(second)["version"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_watch_into_a_pipe_prints_each_refresh_whole(
    app: tuple[str, str], settings: Settings, tmp_path: Path
) -> None:
    """Not a terminal (a log file, `| tee`): rich's in-place display printed nothing until
    Ctrl-C; each refresh is printed as it comes instead."""
    module, queue = app
    with _watching(module, tmp_path) as proc:
        assert proc.stdout is not None
        screens, rows = 0, 0
        while screens < 2:
            line = proc.stdout.readline()
            assert line, "the output ended before two refreshes"
            if line.startswith(b"workerkit status at "):
                screens += 1
            elif screens == 1:
                assert b"\x1b[" not in line, "no terminal control codes into a pipe"
                rows += queue.encode() in line
        assert rows >= 1, "the first refresh shows the worker's queue"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


@contextlib.contextmanager
def _watching(module: str, cwd: Path, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """``workerkit status MODULE --watch`` into a pipe (readline on it has the test's own
    per-test timeout as its deadline); killed if the test did not stop it."""
    command = [str(WORKERKIT), "status", module, "--watch", "--interval", "0.5", *options]
    with subprocess.Popen(
        command, cwd=cwd, env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
