"""Request/reply, same run: each stack at each caller count, interleaved, and same-round ratios.

``python -m benchmarks.request_rounds [--rounds 3] [--count 3000] [--callers 1,16]`` runs
``python -m benchmarks.request KIND CALLERS COUNT`` (see benchmarks/request.py: each case in its
own subprocess, its responder in another) for workerkit, raw pika and FastStream in turn, round
after round, so that the drift of a shared machine hits every stack alike. It prints the
"Request/reply" section of docs/performance.md: round trips per second (the median over the
rounds, and each round's value), p50/p99 latency, the ratios workerkit / raw pika and workerkit
/ FastStream taken within each round, and the machine's load average while it ran.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from .run import child

KINDS = ("wk", "pika", "faststream")
LABELS = {
    "wk": "workerkit `Publisher.request` (threads, one publisher)",
    "pika": "raw pika (a BlockingConnection per thread)",
    "faststream": "FastStream `broker.request` (tasks, one broker)",
}
SHORT = {"pika": "raw pika", "faststream": "FastStream"}


def goal(other: str, callers: int) -> float | None:
    """Issue 11's targets: >= 1.0x raw pika at 1 caller, >= 3x FastStream; None: no target."""
    if other == "faststream":
        return 3.0
    return 1.0 if callers == 1 else None


def measure(rounds: int, count: int, callers: Sequence[int]) -> dict[str, Any]:
    """Every case once per round; results[(kind, callers)] is the list of its RESULT dicts."""
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    loads: list[float] = []
    for rnd in range(rounds):
        print(f"round {rnd + 1}/{rounds}", flush=True)
        for n in callers:
            for kind in KINDS:
                loads.append(os.getloadavg()[0])
                try:
                    found = child(["benchmarks.request", kind, str(n), str(count)], 900)
                except RuntimeError as exc:
                    print(f"  {kind} x{n}: FAILED {exc}", flush=True)
                    found = {"error": str(exc)}
                results.setdefault((kind, n), []).append(found)
                if "rate" in found:
                    print(
                        f"  {kind} x{n}: {found['rate']:,.0f}/s p50 {found['p50']:.2f} ms"
                        f" p99 {found['p99']:.2f} ms",
                        flush=True,
                    )
    loads.append(os.getloadavg()[0])
    return {"results": results, "loads": loads}


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def _ratios(
    results: dict[tuple[str, int], list[dict[str, Any]]], n: int, other: str
) -> tuple[list[float], list[float]]:
    """Per round: workerkit's round trips/s over ``other``'s, and ``other``'s p50 over
    workerkit's (both above 1 when workerkit is faster), each pair from the same round."""
    pairs = zip(results.get(("wk", n), []), results.get((other, n), []), strict=False)
    both = [(wk, o) for wk, o in pairs if "rate" in wk and "rate" in o]
    return [wk["rate"] / o["rate"] for wk, o in both], [o["p50"] / wk["p50"] for wk, o in both]


def section(measured: dict[str, Any], rounds: int, count: int, callers: Sequence[int]) -> str:
    results = measured["results"]
    loads = measured["loads"]
    lines = [
        "## Request/reply",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `python -m"
        f" benchmarks.request_rounds --rounds {rounds} --count {count} --callers"
        f" {','.join(map(str, callers))}`: {count:,} round trips per case after 20 warm-up round",
        "trips per caller, the three stacks interleaved in each round, over direct reply-to on a",
        "quorum queue, each responder in its own process. Round trips/s is the count over the",
        "callers' mean busy time; the median over the rounds, then each round's value.",
        f"Load average (1 min) while it ran: {min(loads):.1f}-{max(loads):.1f} on"
        f" {os.cpu_count()} cores.",
        "",
        "| caller and responder | callers | round trips/s: median (each round) | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for n in callers:
        for kind in KINDS:
            runs = results.get((kind, n), [])
            rates = [f"{r['rate']:,.0f}" if "rate" in r else "failed" for r in runs]
            rate, p50, p99 = (_median(runs, k) for k in ("rate", "p50", "p99"))
            cells = (
                f"{rate:,.0f} ({', '.join(rates)}) | {p50:.2f} | {p99:.2f}"
                if rate is not None and p50 is not None and p99 is not None
                else "failed | | "
            )
            lines.append(f"| {LABELS[kind]} | {n} | {cells} |")
    lines += [
        "",
        "| same-round ratio | round trips/s: median (each round) | p50 latency | target | |",
        "|---|---|---|---|---|",
    ]
    for n in callers:
        for other in SHORT:
            lines.append(_target_row(results, n, other))
    return "\n".join(lines) + "\n"


def _target_row(results: dict[tuple[str, int], list[dict[str, Any]]], n: int, other: str) -> str:
    rates, p50s = _ratios(results, n, other)
    wanted = goal(other, n)
    aim = f">= {wanted:.1f}x" if wanted is not None else "none (for scale)"
    name = f"workerkit / {SHORT[other]}, {n} caller{'s' if n > 1 else ''}"
    if not rates:
        return f"| {name} | not measured | | {aim} | |"
    median = statistics.median(rates)
    each = ", ".join(f"{r:.2f}" for r in rates)
    verdict = "" if wanted is None else "met" if median >= wanted else "MISSED"
    latency = f"{statistics.median(p50s):.2f}x"
    return f"| {name} | {median:.2f}x ({each}) | {latency} | {aim} | {verdict} |"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.request_rounds", description=__doc__
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=3000, help="round trips per case")
    parser.add_argument("--callers", default="1,16", help="comma-separated caller counts")
    args = parser.parse_args(argv)
    callers = [int(c) for c in args.callers.split(",")]
    measured = measure(args.rounds, args.count, callers)
    text = section(measured, args.rounds, args.count, callers)
    print()
    print(text)
    return text


if __name__ == "__main__":
    main()
