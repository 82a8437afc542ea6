"""The supervisor's pure parts: child command lines, exit descriptions, group health."""

from __future__ import annotations

import signal
import sys
import time
from types import SimpleNamespace
from typing import Any

from workerkit.supervisor import STATUS_STALE, Child, Supervisor, _describe_exit, child_command


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


def _alive(healthy: bool, seen_ago: float) -> Child:
    proc: Any = SimpleNamespace(returncode=None)
    return Child(0, proc=proc, healthy=healthy, seen_at=time.monotonic() - seen_ago)


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
