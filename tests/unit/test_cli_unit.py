"""CLI and DLQ helpers without a broker: target loading, parsing, formatting, health endpoint."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from workerkit import dlq
from workerkit.cli import (
    cli,
    describe_topology,
    format_table,
    load_targets,
    parse_body,
    parse_headers,
)
from workerkit.errors import ConfigurationError
from workerkit.health import serve_health
from workerkit.message import Header, Message, encode_body
from workerkit.settings import Settings

WORKERS_SOURCE = """
from workerkit import Worker

class Base(Worker):
    abstract = True

class First(Base):
    queue = "{q}.first"
    async def handle(self, body: dict) -> None: ...

class Second(Worker):
    queue = "{q}.second"
    def handle(self, body: bytes) -> None: ...

NOT_A_WORKER = 3
"""

IMPORTER_SOURCE = """
from {workers} import First  # imported, not defined here: not a target of this module
"""


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write modules into a fresh current directory; returns a writer giving unique names."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    written: list[str] = []

    def write(source: str) -> str:
        name = f"wk_cli_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(source)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def _workers_module(modules: Callable[[str], str]) -> str:
    return modules(WORKERS_SOURCE.format(q=f"t.cli.{uuid.uuid4().hex[:8]}"))


def test_module_target_loads_every_concrete_worker_defined_there(
    modules: Callable[[str], str],
) -> None:
    name = _workers_module(modules)
    workers = load_targets([name])
    assert [w.__name__ for w in workers] == ["First", "Second"]


def test_class_target_and_duplicates(modules: Callable[[str], str]) -> None:
    name = _workers_module(modules)
    workers = load_targets([f"{name}:Second", name])
    assert [w.__name__ for w in workers] == ["Second", "First"]


def test_imported_workers_are_not_targets_of_the_importing_module(
    modules: Callable[[str], str],
) -> None:
    workers = _workers_module(modules)
    importer = modules(IMPORTER_SOURCE.format(workers=workers))
    with pytest.raises(ConfigurationError, match="defines no Worker subclass"):
        load_targets([importer])


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("wk_cli_missing_module_x", "cannot import 'wk_cli_missing_module_x': ModuleNotFoundError"),
        ("{m}:Nope", "has no 'Nope'"),
        ("{m}:NOT_A_WORKER", "is a int, not a concrete Worker subclass"),
        ("{m}:Base", "is an abstract Worker"),
        ("{m}:", "bad target"),
    ],
)
def test_bad_targets_are_configuration_errors(
    modules: Callable[[str], str], target: str, message: str
) -> None:
    name = _workers_module(modules)
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(")):
        load_targets([target.format(m=name)])


def test_a_module_failing_at_import_is_one_line(modules: Callable[[str], str]) -> None:
    broken = modules("import json\nraise RuntimeError('boom\\nsecond line')\n")
    with pytest.raises(ConfigurationError) as info:
        load_targets([broken])
    assert str(info.value) == f"cannot import {broken!r}: RuntimeError: boom"


def test_run_with_a_bad_target_exits_2_with_one_line_and_no_traceback(
    modules: Callable[[str], str],
) -> None:
    result = CliRunner().invoke(cli, ["run", "wk_cli_nowhere.sub:Thing"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "workerkit: error: cannot import 'wk_cli_nowhere.sub': ModuleNotFoundError: "
        "No module named 'wk_cli_nowhere'"
    ]
    assert "Traceback" not in result.output


def test_bad_settings_exit_2(
    modules: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _workers_module(modules)
    monkeypatch.setenv("WORKERKIT_PREFETCH", "lots")
    result = CliRunner().invoke(cli, ["run", name])
    assert result.exit_code == 2
    assert result.stderr.startswith("workerkit: error: invalid settings: WORKERKIT_PREFETCH")


def test_publish_rejects_malformed_headers_before_connecting() -> None:
    result = CliRunner().invoke(cli, ["publish", "k", "{}", "--header", "novalue"])
    assert result.exit_code == 2
    assert "'novalue' is not key=value" in result.stderr


def test_replay_needs_exactly_one_selection() -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["dlq", "replay", "q"]).exit_code == 2
    assert runner.invoke(cli, ["dlq", "replay", "q", "--all", "--id", "x"]).exit_code == 2


def test_python_dash_m_is_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workerkit", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert done.stdout.startswith("workerkit, version ")


def test_parse_body_and_headers() -> None:
    assert parse_body('{"a": [1, 2]}') == {"a": [1, 2]}
    assert parse_body("42") == 42
    assert parse_body("hello world") == "hello world"
    # A JSON string is JSON, not text: sent as text it was no valid body for a JSON handler.
    assert encode_body(parse_body('"an order"')) == (b'"an order"', "application/json")
    assert encode_body(parse_body("hello world")) == (b"hello world", "text/plain")
    assert parse_headers(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}


def test_format_table_aligns_columns() -> None:
    lines = format_table(("ID", "REASON"), [("abc", "rejected"), ("a", "x")])
    assert lines == ["ID   REASON", "abc  rejected", "a    x"]


def test_describe_topology_lists_queues_arguments_and_bindings(
    modules: Callable[[str], str],
) -> None:
    name = _workers_module(modules)
    (first, _second) = load_targets([name])
    lines = describe_topology(Settings(exchange="wkt"), [first])
    assert lines[0] == "exchange wkt (topic, durable)"
    assert f"  queue {first.queue}.dlq" in lines
    assert f"  queue {first.queue}" in lines
    assert "    x-queue-type = quorum" in lines
    assert f"    bound to wkt with {first.queue!r}" in lines
    assert f"    bound to wkt.delay.out with 'r.<28 delay bits>.{first.queue}'" in lines


# -- dead letters --------------------------------------------------------------------------------


def _dead(
    headers: dict[str, Any], message_id: str | None = "m-1", body: bytes = b'{"a": 1}'
) -> Message:
    return Message(
        body,
        7,
        "q.dlq",
        "",
        headers=headers,
        content_type="application/json",
        message_id=message_id,
    )


def test_dead_letter_written_by_workerkit() -> None:
    dead = dlq.dead_letter_from(
        _dead(
            {
                Header.REASON: "exhausted",
                Header.ERROR_TYPE: "builtins.ValueError",
                Header.ERROR_MESSAGE: "bad",
                Header.ATTEMPT: 5,
                Header.FIRST_FAILURE: "2024-01-01T00:00:00.000Z",
                Header.LAST_FAILURE: "2024-01-01T00:01:00.000Z",
                Header.ORIGINAL_EXCHANGE: "workerkit",
                Header.ORIGINAL_ROUTING_KEY: "orders.placed",
            }
        )
    )
    assert (dead.id, dead.reason, dead.error_type, dead.attempts) == (
        "m-1",
        "exhausted",
        "builtins.ValueError",
        5,
    )
    assert dead.failed_at == "2024-01-01T00:01:00.000Z"
    assert dead.original_routing_key == "orders.placed"
    assert dead.body_preview() == '{\n  "a": 1\n}'


def test_dead_letter_from_the_brokers_delivery_limit() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    dead = dlq.dead_letter_from(
        _dead(
            {
                "x-death": [
                    {
                        "count": 1,
                        "reason": "delivery_limit",
                        "queue": "q",
                        "time": when,
                        "exchange": "workerkit",
                        "routing-keys": ["orders.placed"],
                    }
                ],
                "x-first-death-reason": "delivery_limit",
                "x-first-death-exchange": "workerkit",
                "x-first-death-queue": "q",
                "x-delivery-count": 0,
            }
        )
    )
    assert dead.reason == "delivery-limit"
    assert dead.attempts is None
    assert dead.failed_at == "2024-05-01T12:00:00Z"
    assert dead.original_routing_key == "orders.placed"


def test_id_without_message_id_is_a_hash_that_ignores_the_delivery_count() -> None:
    first = dlq.message_key(_dead({"a": 1, "x-delivery-count": 0}, message_id=None))
    again = dlq.message_key(_dead({"a": 1, "x-delivery-count": 3}, message_id=None))
    other = dlq.message_key(_dead({"a": 2, "x-delivery-count": 0}, message_id=None))
    assert first == again != other
    assert first.startswith("h-")


def test_replayed_copy_starts_over() -> None:
    message = _dead(
        {
            Header.REASON: "exhausted",
            Header.ATTEMPT: 5,
            Header.TRACEBACK: "...",
            "x-death": [],
            "x-first-death-reason": "rejected",
            "tenant": "acme",
        }
    )
    copy = dlq._fresh_copy(message, "q")
    assert (copy.exchange, copy.routing_key, copy.message_id) == ("", "q", "m-1")
    assert copy.headers == {"tenant": "acme"}
    assert copy.body == message.body


def test_dlq_names() -> None:
    assert dlq.dlq_of("receipts") == "receipts.dlq"
    assert dlq.dlq_of("receipts.dlq") == "receipts.dlq"
    assert dlq.work_queue_of("receipts.dlq") == "receipts"


# -- health endpoint -----------------------------------------------------------------------------


async def _http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_health_follows_the_callable() -> None:
    healthy = [True]
    server = await serve_health(lambda: healthy[0], "127.0.0.1", 0)
    try:
        ok = await _http(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nok\n")
        healthy[0] = False
        bad = await _http(server.port, b"GET /health HTTP/1.1\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 503 ") and bad.endswith(b"unhealthy\n")
        head = await _http(server.port, b"HEAD /health HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and head.endswith(b"\r\n\r\n")
        assert (await _http(server.port, b"GET /other HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 404 "
        )
        assert (await _http(server.port, b"POST /health HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 405 "
        )
    finally:
        await server.close()
