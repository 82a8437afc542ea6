"""Run every benchmark in one go and write docs/performance.md and docs/performance.png.

``python -m benchmarks.run [--quick]``. Each case runs in its own subprocess; repeats are
interleaved across cases so that drift on a noisy machine hits every case alike.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import consume, publish
from .report import Results, Series, chart, markdown

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("consume", "publish", "latency", "footprint")


def child(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m benchmarks.<...>`` and return its RESULT; RuntimeError says why not."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f}s") from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line.removeprefix("RESULT ")))
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(tail[:200])


def record(series: Series, run: Callable[[], float], name: str) -> None:
    try:
        value = run()
    except RuntimeError as exc:
        series.errors.append(str(exc))
        print(f"  {name}: FAILED {exc}", flush=True)
        return
    series.values.append(value)
    print(f"  {name}: {value:,.2f}", flush=True)


def throughput(module: str, cases: Sequence[str], count: int, repeat: int) -> dict[str, Series]:
    found = {case: Series() for case in cases}
    for rep in range(repeat):
        print(f"{module} round {rep + 1}/{repeat}", flush=True)
        for case in cases:
            record(
                found[case],
                lambda case=case: float(
                    child([f"benchmarks.{module}", case, str(count)], 300)["rate"]
                ),
                case,
            )
    return found


def latency(rate: float, seconds: float, repeat: int) -> dict[str, dict[str, Series]]:
    found = {kind: {q: Series() for q in ("p50", "p95", "p99")} for kind in ("aiopika", "wk")}
    for rep in range(repeat):
        print(f"latency round {rep + 1}/{repeat}", flush=True)
        for kind, series in found.items():
            try:
                result = child(["benchmarks.latency", kind, str(rate), str(seconds)], seconds + 120)
            except RuntimeError as exc:
                for s in series.values():
                    s.errors.append(str(exc))
                print(f"  {kind}: FAILED {exc}", flush=True)
                continue
            for q, s in series.items():
                s.values.append(float(result[q]))
            print(
                f"  {kind}: p50 {result['p50']:.2f} ms, p95 {result['p95']:.2f} ms,"
                f" p99 {result['p99']:.2f} ms (published at {result['achieved']:.0f} msg/s)",
                flush=True,
            )
    return found


def footprint(repeat: int) -> tuple[dict[str, Series], dict[str, Series]]:
    startup = {kind: Series() for kind in ("aiopika", "wk")}
    rss = {kind: Series() for kind in ("aiopika", "wk")}
    for rep in range(repeat):
        print(f"footprint round {rep + 1}/{repeat}", flush=True)
        for kind in startup:
            try:
                result = child(["benchmarks.footprint", kind, repr(time.time())], 60)
            except RuntimeError as exc:
                startup[kind].errors.append(str(exc))
                rss[kind].errors.append(str(exc))
                print(f"  {kind}: FAILED {exc}", flush=True)
                continue
            startup[kind].values.append(float(result["startup"]))
            rss[kind].values.append(float(result["rss_mb"]))
            print(
                f"  {kind}: start-up {result['startup']:.3f} s, idle RSS {result['rss_mb']:.1f} MB"
            )
    return startup, rss


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced counts, under ~2 minutes")
    parser.add_argument("--consume-count", type=int, help="messages per consume case (20000)")
    parser.add_argument("--publish-count", type=int, help="messages per publish case (5000)")
    parser.add_argument("--rate", type=float, default=500.0, help="latency publish rate, msg/s")
    parser.add_argument("--latency-seconds", type=float, help="seconds per latency run (10)")
    parser.add_argument("--repeat", type=int, help="runs of each case (3; 1 with --quick)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument("--consume-cases", default=",".join(consume.CASES))
    parser.add_argument("--publish-cases", default=",".join(publish.CASES))
    parser.add_argument("--label", default="", help="what code was measured (for the report)")
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--png", default=str(ROOT / "docs" / "performance.png"))
    args = parser.parse_args(argv)
    quick = args.quick
    args.consume_count = args.consume_count or (3000 if quick else 20000)
    args.publish_count = args.publish_count or (600 if quick else 5000)
    args.latency_seconds = args.latency_seconds or (3.0 if quick else 10.0)
    args.repeat = args.repeat or (1 if quick else 3)
    return args


def main(argv: Sequence[str] | None = None) -> Results:
    args = parse(argv)
    sections = set(args.sections.split(","))
    started = time.monotonic()
    results = Results(
        params={
            "consume_count": args.consume_count,
            "publish_count": args.publish_count,
            "rate": args.rate,
            "latency_seconds": args.latency_seconds,
            "repeat": args.repeat,
        }
    )
    if "consume" in sections:
        cases = args.consume_cases.split(",")
        results.consume = throughput("consume", cases, args.consume_count, args.repeat)
    if "publish" in sections:
        cases = args.publish_cases.split(",")
        results.publish = throughput("publish", cases, args.publish_count, args.repeat)
    if "latency" in sections:
        results.latency = latency(args.rate, args.latency_seconds, args.repeat)
    if "footprint" in sections:
        results.startup, results.rss = footprint(args.repeat)
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    text = markdown(results, command, args.label)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(text)
    chart(results, args.png)
    print()
    print(text)
    print(f"wrote {args.markdown} and {args.png} in {time.monotonic() - started:.0f}s")
    return results


if __name__ == "__main__":
    main()
