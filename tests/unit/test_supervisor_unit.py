"""The supervisor's pure parts: child command lines, exit descriptions, group health."""

from __future__ import annotations

import signal
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest

from workerkit.supervisor import (
    STATUS_STALE,
    Child,
    Supervisor,
    _describe_exit,
    child_command,
    read_status_digit,
    status_digit,
)


def test_child_command_runs_the_same_targets_as_one_process_with_the_given_options() -> None:
    command = child_command(
        ["workers.receipts"],
        {"--concurrency": 4, "--prefetch": None, "--burst": True, "--log-level": "DEBUG"},
    )
    assert command[:6] == [
        sys.executable,
        "-m",
        "workerkit",
        "run",
        "workers.receipts",
        "--processes",
    ]
    assert command[6] == "1"
    assert command[7:] == ["--concurrency", "4", "--burst", "--log-level", "DEBUG"]


def test_exits_are_described_by_code_or_signal() -> None:
    assert _describe_exit(1) == "exited with code 1"
    assert _describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert _describe_exit(-200) == "was killed by signal 200"


def _alive(healthy: bool, seen_ago: float, ready: bool = False) -> Child:
    proc: Any = SimpleNamespace(returncode=None)
    return Child(0, proc=proc, healthy=healthy, ready=ready, seen_at=time.monotonic() - seen_ago)


def test_group_is_healthy_only_while_every_child_reports_healthy_recently() -> None:
    sup = Supervisor(["true"], 2, grace=1.0, env={})
    sup.children = [_alive(True, 0.1), _alive(True, 0.1)]
    assert sup.healthy
    sup.children[1] = _alive(False, 0.1)
    assert not sup.healthy
    sup.children[1] = _alive(True, STATUS_STALE + 1)  # a hung child stops reporting
    assert not sup.healthy
    gone: Any = SimpleNamespace(returncode=-9)
    sup.children[1] = Child(1, proc=gone, healthy=True, seen_at=time.monotonic())
    assert not sup.healthy
    sup.children[1] = Child(1, done=True)  # finished its burst
    assert sup.healthy


def test_a_status_digit_carries_health_and_readiness_and_nothing_else_reads_as_either() -> None:
    for healthy in (False, True):
        for ready in (False, True):
            assert read_status_digit(status_digit(healthy, ready)) == (healthy, ready)
    assert status_digit(True, False) == b"1"  # what a child wrote before readiness existed
    for junk in (b"", b"4", b"/", b"x", b"11"):
        assert read_status_digit(junk) == (False, False)


def test_group_is_ready_only_while_every_child_is_ready_and_it_is_not_draining() -> None:
    sup = Supervisor(["true"], 2, grace=1.0, env={})
    sup.children = [_alive(True, 0.1, ready=True), _alive(True, 0.1, ready=True)]
    assert sup.ready
    sup.children[1] = _alive(True, 0.1, ready=False)  # consuming, but e.g. publish path closed
    assert sup.healthy and not sup.ready
    sup.children[1] = _alive(True, STATUS_STALE + 1, ready=True)  # hung
    assert not sup.ready
    sup.children[1] = Child(1, done=True)
    assert sup.ready
    sup._on_signal(signal.SIGTERM)  # draining: not ready at once, before any child notices
    assert not sup.ready


def test_a_child_that_stops_reporting_is_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hung child turned the group's probes 503 with no line saying which child, or why."""
    sup = Supervisor(["true"], 2, grace=1.0, env={})
    sup.children = [_alive(True, 0.1), _alive(True, STATUS_STALE + 1)]
    sup.children[1].index = 1
    sup.children[1].proc.pid = 4242  # type: ignore[union-attr]
    now = time.monotonic()
    sup.notice_silence(now)
    sup.notice_silence(now + 1)  # once, not every second
    lines = [r.getMessage() for r in caplog.records if "has not reported" in r.getMessage()]
    assert lines == [
        f"worker process 1 (pid 4242) has not reported its status for {STATUS_STALE + 1:.0f}s:"
        " counted unhealthy (hung, or stopped?)"
    ]
    assert not sup.healthy


def test_a_childs_log_lines_carry_its_index() -> None:
    import io
    import logging

    from workerkit.log import JsonFormatter, PlainFormatter, _ChildIndex

    for formatter, expected in (
        (PlainFormatter(), "[child=3 queue=q]"),
        (JsonFormatter(), '"child":3'),
    ):
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        handler.addFilter(_ChildIndex(3))
        logger = logging.getLogger(f"workerkit.test.child.{id(formatter)}")
        logger.addHandler(handler)
        logger.propagate = False
        logger.warning("connection lost", extra={"queue": "q"})
        assert expected in out.getvalue(), out.getvalue()
