"""Broker-version plumbing: the roots script's interface and the per-version reliability table."""

from __future__ import annotations

import subprocess
from pathlib import Path

from scripts import reliability_table

ROOT = Path(__file__).resolve().parents[2]


def _brokers(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts/brokers.sh"), *args], capture_output=True, text=True
    )


def test_roots_are_per_debian_suite_outside_the_repo() -> None:
    assert _brokers("path", "4.0").stdout.strip().endswith("/trixie")
    assert _brokers("path", "4.3").stdout.strip().endswith("/forky")
    assert not _brokers("path", "4.3").stdout.startswith(str(ROOT))


def test_an_unknown_version_is_refused_loudly() -> None:
    result = _brokers("build", "3.13")
    assert result.returncode == 2 and "unknown broker version '3.13'" in result.stderr


def _row(scenario: str, broker: str, lost: int) -> dict[str, object]:
    return {
        "scenario": scenario,
        "broker": broker,
        "run": 1,
        "attempted": 10,
        "confirmed": 10,
        "unknown": 0,
        "finished": 10 - lost,
        "dead_lettered": 0,
        "lost": lost,
        "unexpected": 0,
        "duplicates": 0,
        "faults": 1,
        "recovery_s": [0.5],
    }


def test_the_table_has_a_column_per_version_and_says_what_did_not_run() -> None:
    versions = {"3.10": "RabbitMQ 3.10.8", "4.3": "RabbitMQ 4.3.6"}
    table = reliability_table.render(
        [_row("restart", "3.10", 0), _row("restart", "4.3", 2), _row("alarm", "3.10", 0)],
        versions,
    )
    lines = table.splitlines()
    assert "| scenario | run | RabbitMQ 3.10.8 | RabbitMQ 4.3.6 |" in lines
    (restart,) = [line for line in lines if line.startswith("| restart |")]
    assert restart.count("lost **0**") == 1 and "lost **2**" in restart
    (alarm,) = [line for line in lines if line.startswith("| alarm |")]
    assert alarm.endswith("| not run |")
