"""The ``workerkit`` command against the real broker: run, publish, topology, exit codes.

``run`` is tested as users run it, through the installed console script in a subprocess (signals,
exit codes, threads and ``sys.path`` are process-level behaviour); the other commands through
click's CliRunner in a worker thread (each invocation runs its own event loop, as in a shell).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from workerkit import Publisher, Settings
from workerkit.cli import cli

from .workers_fixture import declare_raw, delete_queues, get_all, ready_count

pytestmark = pytest.mark.integration

WORKERKIT = Path(sys.executable).parent / "workerkit"

APP_SOURCE = """
import asyncio
import os
import time

from workerkit import Message, Worker

LOG = {log!r}
SLEEP = {sleep!r}


def note(line: str) -> None:
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)


class Logs(Worker):
    queue = {queue!r}
    bindings = ({queue!r} + ".event",)

    async def handle(self, body: bytes, message: Message) -> None:
        note(f"start {{message.message_id}}")
        await asyncio.sleep(SLEEP)
        note(f"done {{message.message_id}} {{message.attempt}}")


class Stuck(Worker):
    queue = {queue!r} + "-stuck"

    def handle(self, body: bytes) -> None:
        note("start stuck")
        time.sleep(600)
        note("done stuck")
"""


@dataclass
class App:
    """A user's worker module in its own directory (the current directory of the command)."""

    directory: Path
    module: str
    queue: str
    log: Path
    url: str

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "WORKERKIT_URL": self.url, "WORKERKIT_EXCHANGE": "wkt", **extra}

    def lines(self, kind: str) -> list[str]:
        text = self.log.read_text() if self.log.exists() else ""
        return [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith(kind)]


def make_app(tmp_path: Path, settings: Settings, queue: str, sleep: float = 0.0) -> App:
    module = f"cliapp_{uuid.uuid4().hex[:8]}"
    log = tmp_path / "handled.log"
    source = APP_SOURCE.format(log=str(log), sleep=sleep, queue=queue)
    (tmp_path / f"{module}.py").write_text(source)
    return App(tmp_path, module, queue, log, settings.url.get_secret_value())


@pytest.fixture
def cleanup(settings: Settings) -> Iterator[list[str]]:
    queues: list[str] = []
    yield queues
    # The app module declares a second worker, "<queue>-stuck", when a test runs the module.
    names = [*queues, *(f"{q}-stuck" for q in queues)]
    delete_queues(settings.url.get_secret_value(), *names, *(f"{q}.dlq" for q in names))


def workerkit(
    app: App, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script in the app's directory."""
    return subprocess.run(
        [str(WORKERKIT), *args],
        cwd=app.directory,
        env=app.env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(app: App, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``workerkit`` in the background; its stderr goes to a file the test can read."""
    stderr = app.directory / f"stderr-{uuid.uuid4().hex[:6]}.log"
    with stderr.open("wb") as sink:
        proc = subprocess.Popen(
            [str(WORKERKIT), *args],
            cwd=app.directory,
            env=app.env(**env),
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    return proc, stderr


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def one_error_line(stderr: str) -> str:
    """The error line, after checking there is exactly one and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("workerkit: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


async def invoke(settings: Settings, *args: str) -> Any:
    env = {"WORKERKIT_URL": settings.url.get_secret_value(), "WORKERKIT_EXCHANGE": "wkt"}
    return await asyncio.to_thread(CliRunner(env=env).invoke, cli, list(args))


# -- topology ------------------------------------------------------------------------------------


def test_topology_declares_and_lists_what_it_declared(
    tmp_path: Path, settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("cli-topo")
    cleanup.append(q)
    app = make_app(tmp_path, settings, q)

    done = workerkit(app, "topology", f"{app.module}:Logs")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "exchange wkt (topic, durable)"
    assert f"  queue {q}" in lines and f"  queue {q}.dlq" in lines
    assert "    x-queue-type = quorum" in lines
    assert f"    bound to wkt with '{q}.event'" in lines
    url = settings.url.get_secret_value()
    assert ready_count(url, q) == 0 and ready_count(url, f"{q}.dlq") == 0  # they exist now

    again = workerkit(app, "topology", app.module + ":Logs")
    assert again.returncode == 0 and again.stdout == done.stdout  # idempotent


def test_topology_clash_is_one_line_and_exit_3(
    tmp_path: Path, settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("cli-clash")
    cleanup.append(q)
    app = make_app(tmp_path, settings, q)
    declare_raw(app.url, q)  # a classic queue where the worker wants a quorum one

    for command in ("topology", "run"):
        done = workerkit(app, command, f"{app.module}:Logs")
        assert done.returncode == 3, done.stderr
        line = one_error_line(done.stderr)
        assert "inequivalent arg" in line and q in line


# -- publish -------------------------------------------------------------------------------------


async def test_publish_json_text_headers_and_events(
    tmp_path: Path, settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("cli-pub")
    cleanup.append(q)
    app = make_app(tmp_path, settings, q)
    assert (await asyncio.to_thread(workerkit, app, "topology", app.module)).returncode == 0

    sent = await invoke(settings, "publish", q, '{"order_id": 7}', "-H", "tenant=acme")
    assert sent.exit_code == 0, sent.output
    text = await invoke(settings, "publish", f"{q}.event", "hello there", "--message-id", "m-2")
    assert text.exit_code == 0, text.output
    assert text.stdout.strip() == "m-2"
    # `-` reads stdin; stdin that is not UTF-8 text goes as bytes (it was a bare
    # "'utf-8' codec can't encode ... surrogates not allowed" error).
    env = {"WORKERKIT_URL": app.url, "WORKERKIT_EXCHANGE": "wkt"}
    binary = b"\xff\xfe\x00bin"
    piped = await asyncio.to_thread(
        CliRunner(env=env).invoke, cli, ["publish", q, "-", "--message-id", "m-3"], binary
    )
    assert piped.exit_code == 0, piped.output
    piped_json = await asyncio.to_thread(
        CliRunner(env=env).invoke, cli, ["publish", q, "-", "--message-id", "m-4"], b'{"a": 1}'
    )
    assert piped_json.exit_code == 0, piped_json.output

    got = await asyncio.to_thread(get_all, app.url, q)
    assert [g.properties.message_id for g in got] == [sent.stdout.strip(), "m-2", "m-3", "m-4"]
    assert (got[2].body, got[2].properties.content_type) == (binary, "application/octet-stream")
    assert (got[3].body, got[3].properties.content_type) == (b'{"a":1}', "application/json")
    assert orjson.loads(got[0].body) == {"order_id": 7}
    assert got[0].properties.content_type == "application/json"
    assert got[0].headers["tenant"] == "acme"
    assert (got[1].body, got[1].properties.content_type) == (b"hello there", "text/plain")
    assert got[1].properties.delivery_mode == 2


async def test_publish_unroutable_and_reserved_headers(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    key = unique("nobody-home")
    result = await invoke(settings, "publish", key, "{}")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"workerkit: error: no queue is bound to routing key '{key}' on exchange 'wkt'"
    )
    reserved = await invoke(settings, "publish", key, "{}", "-H", "workerkit-attempt=9")
    assert reserved.exit_code == 2
    assert "workerkit-* headers are written by workerkit only" in reserved.stderr


async def test_publish_with_delay_arrives_no_sooner(
    tmp_path: Path, settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("cli-delay")
    cleanup.append(q)
    app = make_app(tmp_path, settings, q)
    assert (await asyncio.to_thread(workerkit, app, "topology", app.module)).returncode == 0

    started = time.monotonic()
    result = await invoke(settings, "publish", q, '{"later": true}', "--delay", "1.5")
    assert result.exit_code == 0, result.output
    got = await asyncio.to_thread(
        until, lambda: get_all(app.url, q), 15, "the delayed message to arrive"
    )
    waited = time.monotonic() - started
    assert [g.properties.message_id for g in got] == [result.stdout.strip()]
    assert waited >= 1.5, waited


def test_connection_refused_exit_4(tmp_path: Path, settings: Settings) -> None:
    app = make_app(tmp_path, settings, "t.unused.refused")
    bad = settings.url.get_secret_value().replace("guest:guest", "guest:wrong")
    for args in (("run", app.module), ("topology", app.module), ("dlq", "list", "x")):
        done = workerkit(app, *args, "--url", bad)
        assert done.returncode == 4, (args, done.stderr)
        line = one_error_line(done.stderr)
        assert "refused the credentials" in line and "wrong" not in done.stderr


# -- run -----------------------------------------------------------------------------------------


def test_run_burst_handles_everything_and_exits_0(
    tmp_path: Path, settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("cli-burst")
    cleanup.append(q)
    app = make_app(tmp_path, settings, q)
    assert workerkit(app, "topology", app.module + ":Logs").returncode == 0
    with Publisher(settings=settings) as publisher:
        ids = [publisher.publish(q, {"n": n}) for n in range(30)]

    done = workerkit(
        app, "run", f"{app.module}:Logs", "--burst", "--concurrency", "4", "--log-format", "json"
    )
    assert done.returncode == 0, done.stderr
    handled = app.lines("done")
    assert sorted(line.split()[0] for line in handled) == sorted(ids)
    assert all(line.endswith(" 1") for line in handled)  # first attempts
    assert ready_count(app.url, q) == 0
    assert all(orjson.loads(line)["logger"] for line in done.stderr.splitlines())


def test_sigterm_drains_in_flight_handlers_and_health_follows(
    tmp_path: Path, settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("cli-drain")
    cleanup.append(q)
    app = make_app(tmp_path, settings, q, sleep=3.0)
    proc, stderr = start(app, "run", app.module, "--health-port", "0", "--health-host", "127.0.0.1")
    try:
        found = until(
            lambda: re.search(
                r"health endpoint on http://127.0.0.1:(\d+)/health", stderr.read_text()
            ),
            30,
            "the health endpoint",
        )
        port = int(found.group(1))
        until(lambda: health(port) == 200, 30, "healthy (consuming)")
        with Publisher(settings=settings) as publisher:
            message_id = publisher.publish(q, b"slow one")
        until(lambda: app.lines("start"), 15, "the handler to start")

        proc.send_signal(signal.SIGTERM)
        # Consumers are cancelled at once: unhealthy while the handler finishes.
        until(lambda: health(port) == 503, 2.5, "unhealthy while draining")
        assert proc.wait(timeout=30) == 0, stderr.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert app.lines("done") == [f"{message_id} 1"]
    assert ready_count(app.url, q) == 0  # acked, not returned
    assert "received SIGTERM; draining" in stderr.read_text()


def test_stuck_sync_handler_does_not_keep_the_process_alive(
    tmp_path: Path, settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("cli-stuck")
    cleanup.append(f"{q}-stuck")
    app = make_app(tmp_path, settings, q)
    proc, stderr = start(app, "run", f"{app.module}:Stuck", WORKERKIT_SHUTDOWN_GRACE="1")
    try:
        until(lambda: "consuming from" in stderr.read_text(), 30, "the worker to start")
        with Publisher(settings=settings) as publisher:
            publisher.publish(f"{q}-stuck", b"never finishes")
        until(lambda: app.lines("start"), 15, "the handler to start")
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, stderr.read_text()
        assert time.monotonic() - stopped < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "exiting without them" in stderr.read_text()
    # Not acked: the broker has it again for the next worker.
    until(lambda: ready_count(app.url, f"{q}-stuck") == 1, 15, "the message back in its queue")
