"""Run the reliability suite and rewrite the results table in docs/reliability.md.

    .venv/bin/python scripts/reliability_table.py            # run the suite, update the doc
    .venv/bin/python scripts/reliability_table.py --runs 2   # run it twice, one row per run

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


def run_suite(results: Path, extra: list[str]) -> int:
    env = {**os.environ, RESULTS_ENV: str(results)}
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


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | run | published (confirmed / unknown) | finished | dead-lettered | lost"
        " | unexpected | duplicated | faults | recovery (fault → consumer back) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scenario']} | {row['run']} | {row['attempted']} ({row['confirmed']} /"
            f" {row['unknown']}) | {row['finished']} | {row['dead_lettered']} | **{row['lost']}**"
            f" | {row['unexpected']} | {row['duplicates']} | {row['faults']}"
            f" | {recovery(row['recovery_s'])} |"
        )
    return "\n".join(lines)


def update_doc(table: str) -> None:
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="how many times to run the suite")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    code = 0
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory() as tmp:
            results = Path(tmp) / "rows.jsonl"
            code = run_suite(results, args.pytest_args) or code
            if results.exists():
                for line in results.read_text().splitlines():
                    rows.append({**json.loads(line), "run": run})
    rows.sort(key=lambda r: (r["scenario"], r["run"]))
    update_doc(render(rows))
    print(f"wrote {len(rows)} rows to {DOC.relative_to(ROOT)}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
