"""Run the reliability suite and rewrite the results table in docs/reliability.md.

    .venv/bin/python scripts/reliability_table.py            # run the suite, update the doc
    .venv/bin/python scripts/reliability_table.py --runs 2   # run it twice, one row per run
    .venv/bin/python scripts/reliability_table.py --brokers 3.10,4.0,4.3   # a column per version

Each broker version (``WORKERKIT_TEST_BROKER``, see tests/reliability/broker.py) gets a column;
the table's heading names the exact RabbitMQ release of each.

Each scenario appends its oracle row (JSON lines) to the file named by
``WORKERKIT_TEST_RELIABILITY_RESULTS``; this script renders those rows between the
``<!-- table -->`` markers of the doc. The exit code is pytest's, so a failing scenario
fails the command even though the table is still written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- table -->", "<!-- /table -->"
RESULTS_ENV = "WORKERKIT_TEST_RELIABILITY_RESULTS"
VERSION_ENV = "WORKERKIT_TEST_BROKER"


def run_suite(results: Path, version: str, extra: list[str]) -> int:
    env = {**os.environ, RESULTS_ENV: str(results), VERSION_ENV: version}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/reliability",
        "-m",
        "reliability",
        "-q",
        *extra,
    ]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def recovery(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} s"
    return f"{max(values):.2f} s max ({min(values):.2f} to {max(values):.2f}, n={len(values)})"


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    return (
        f"lost **{row['lost']}** · {row['attempted']} ({row['confirmed']} / {row['unknown']})"
        f" → {row['finished']} done, {row['dead_lettered']} DLQ · unexpected {row['unexpected']}"
        f" · dup {row['duplicates']} · faults {row['faults']} · {recovery(row['recovery_s'])}"
    )


def render(rows: list[dict[str, Any]], versions: dict[str, str]) -> str:
    """One line per scenario and run, one column per broker version."""
    lines = [
        "Each cell: lost · published (confirmed / unknown) → finished, dead-lettered · unexpected"
        " · duplicated · faults · recovery (fault → consumer back).",
        "",
        "| scenario | run | " + " | ".join(versions.values()) + " |",
        "|---|---|" + "---|" * len(versions),
    ]
    cells = {(r["scenario"], r["run"], r.get("broker", "3.10")): r for r in rows}
    for scenario, run in sorted({(r["scenario"], r["run"]) for r in rows}):
        line = [cell(cells.get((scenario, run, version))) for version in versions]
        lines.append(f"| {scenario} | {run} | " + " | ".join(line) + " |")
    return "\n".join(lines)


def update_doc(table: str) -> None:
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def describe(version: str) -> str:
    sys.path.insert(0, str(ROOT / "tests" / "reliability"))
    from broker import describe as describe_broker

    return describe_broker(version).split(" (")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="how many times to run the suite")
    parser.add_argument(
        "--brokers",
        default=os.environ.get(VERSION_ENV) or "3.10",
        help="comma-separated RabbitMQ versions, one column each (3.10, 4.0, 4.3)",
    )
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    args = parser.parse_args()
    versions = {v: describe(v) for v in args.brokers.split(",")}
    rows: list[dict[str, Any]] = []
    code = 0
    for version in versions:
        for run in range(1, args.runs + 1):
            with tempfile.TemporaryDirectory() as tmp:
                results = Path(tmp) / "rows.jsonl"
                code = run_suite(results, version, args.pytest_args) or code
                if results.exists():
                    for line in results.read_text().splitlines():
                        rows.append({**json.loads(line), "run": run})
    update_doc(render(rows, versions))
    print(f"wrote {len(rows)} rows ({', '.join(versions.values())}) to {DOC.relative_to(ROOT)}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
