"""The supervisor's pure parts: child command lines, exit descriptions, group health."""

from __future__ import annotations

import signal
import sys
import time
from types import SimpleNamespace
from typing import Any

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
