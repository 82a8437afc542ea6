"""Run every benchmark in one go and write docs/performance.md and docs/performance.png.

``python -m benchmarks.run [--quick] [--million]``. Each case runs in its own subprocess;
repeats are interleaved across cases so that drift on a noisy machine hits every case alike.
The C limit rows (benchmarks/limit.py) run inside the consume and publish rounds; the growth
curves (benchmarks/curves.py) are their own section and also write docs/performance-curves.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import consume, limit, publish, request
from .curves_report import curves_chart
from .report import Results, Series, chart, markdown

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("consume", "publish", "latency", "footprint", "request", "curves")
MILLION = 1_000_000


class Unavailable(RuntimeError):
    """A case that cannot run on this machine (the C anchors without gcc or librabbitmq)."""


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
    except Unavailable as exc:
        series.unavailable = str(exc)
        print(f"  {name}: not available: {exc}", flush=True)
        return
    except RuntimeError as exc:
        series.errors.append(str(exc))
        print(f"  {name}: FAILED {exc}", flush=True)
        return
    series.values.append(value)
    print(f"  {name}: {value:,.2f}", flush=True)


def throughput(
    module: str,
    cases: Sequence[str],
    count: int,
    repeat: int,
    modules: dict[str, str] | None = None,
    cpu: dict[str, Series] | None = None,
) -> dict[str, Series]:
    """Each case ``repeat`` times, interleaved; ``modules`` names another module for a case.
    ``cpu`` collects the CPU microseconds per message of the cases that report them."""
    found = {case: Series() for case in cases}
    where = modules or {}

    def measured(case: str, mod: str) -> float:
        result = child([f"benchmarks.{mod}", case, str(count)], 300)
        if "unavailable" in result:
            raise Unavailable(result["unavailable"])
        if cpu is not None and "cpu_us" in result:
            cpu.setdefault(case, Series()).values.append(float(result["cpu_us"]))
        return float(result["rate"])

    for rep in range(repeat):
        print(f"{module} round {rep + 1}/{repeat}", flush=True)
        for case in cases:
            mod = where.get(case, module)
            record(found[case], functools.partial(measured, case, mod), case)
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


def requests(
    args: argparse.Namespace,
) -> tuple[dict[str, dict[str, Series]], dict[str, dict[str, Series]]]:
    """Request/reply round trips per kind and caller count, and compression on and off."""
    trips = {
        f"{kind}-{callers}": {q: Series() for q in ("rate", "p50", "p99")}
        for callers in (int(c) for c in args.request_callers.split(","))
        for kind in request.KINDS
    }
    codecs = {
        c: {q: Series() for q in ("rate", "wire_bytes", "body_bytes")} for c in request.CODECS
    }
    for rep in range(args.repeat):
        print(f"request round {rep + 1}/{args.repeat}", flush=True)
        for key, series in trips.items():
            kind, callers = key.rsplit("-", 1)
            _fill(series, ["benchmarks.request", kind, callers, str(args.request_count)], key)
        for codec, series in codecs.items():
            _fill(
                series, ["benchmarks.request", "compress", codec, str(args.compress_count)], codec
            )
    return trips, codecs


def _fill(series: dict[str, Series], args: Sequence[str], name: str) -> None:
    try:
        result = child(args, 600)
    except RuntimeError as exc:
        for s in series.values():
            s.errors.append(str(exc))
        print(f"  {name}: FAILED {exc}", flush=True)
        return
    for key, s in series.items():
        s.values.append(float(result[key]))
    print(f"  {name}: {', '.join(f'{k} {result[k]:,.2f}' for k in series)}", flush=True)


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


def curve_point(args: Sequence[str], key: str, timeout: float = 900) -> Callable[[], float]:
    return lambda: float(child(["benchmarks.curves", *args], timeout)[key])


def curves(args: argparse.Namespace) -> dict[str, Any]:
    """The growth curves (issue 16): points of the two cheap ones repeated, interleaved."""
    workers = [int(n) for n in args.worker_counts.split(",")]
    sizes = [int(n) for n in args.body_sizes.split(",")]
    found: dict[str, Any] = {
        "queues": {n: {"rate": Series(), "startup": Series()} for n in workers},
        "body": {size: {"wk": Series(), "pika": Series()} for size in sizes},
    }
    for rep in range(args.repeat):
        print(f"curves round {rep + 1}/{args.repeat}", flush=True)
        for n in workers:
            point = found["queues"][n]
            try:
                result = child(["benchmarks.curves", "queues", str(n), str(args.curve_count)], 900)
            except RuntimeError as exc:
                point["rate"].errors.append(str(exc))
                point["startup"].errors.append(str(exc))
                print(f"  queues {n}: FAILED {exc}", flush=True)
                continue
            point["rate"].values.append(float(result["rate"]))
            point["startup"].values.append(float(result["startup"]))
            print(f"  queues {n}: {result['rate']:,.0f} msg/s, ready in {result['startup']:.2f} s")
        for size in sizes:
            count = body_count(size, args.body_budget_mb, args.curve_count)
            for kind in ("wk", "pika"):
                run = curve_point(["body", str(size), str(count), kind], "mb_s")
                record(found["body"][size][kind], run, f"body {size} B {kind} (MB/s)")
    found["backlog"] = once(["backlog", str(args.backlog_count)], "backlog")
    found["publish_many"] = {
        n: once(["publish_many", str(n)], f"publish_many {n}")
        for n in (int(x) for x in args.publish_many_counts.split(","))
    }
    found["retry"] = once(["retry", str(args.retry_count), str(args.retry_delay)], "retry")
    return found


def body_count(size: int, budget_mb: float, cap: int) -> int:
    """Messages for one body-size point: about ``budget_mb`` MB, at most ``cap``, at least 8."""
    return max(8, min(cap, int(budget_mb * 1e6 // size)))


def once(args: Sequence[str], name: str) -> dict[str, Any]:
    """One point of a long curve, run once; {"error": ...} when it failed."""
    try:
        result = child(["benchmarks.curves", *args], 3600)
    except RuntimeError as exc:
        print(f"  {name}: FAILED {exc}", flush=True)
        return {"error": str(exc)}
    shown = {k: v for k, v in result.items() if k != "samples"}
    print(f"  {name}: {shown}", flush=True)
    return result


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced counts (a few minutes)")
    parser.add_argument("--consume-count", type=int, help="messages per consume case (20000)")
    parser.add_argument("--publish-count", type=int, help="messages per publish case (5000)")
    parser.add_argument("--rate", type=float, default=500.0, help="latency publish rate, msg/s")
    parser.add_argument("--latency-seconds", type=float, help="seconds per latency run (10)")
    parser.add_argument("--repeat", type=int, help="runs of each case (3; 1 with --quick)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument("--consume-cases", default=",".join(consume.CASES))
    parser.add_argument("--publish-cases", default=",".join(publish.CASES))
    parser.add_argument(
        "--limit-cases",
        default=",".join(limit.CASES),
        help="C anchors run beside the consume/publish cases ('' for none)",
    )
    parser.add_argument("--request-count", type=int, help="round trips per request case (3000)")
    parser.add_argument("--request-callers", default="1,16", help="concurrent callers per case")
    parser.add_argument("--compress-count", type=int, help="publishes per compression case (3000)")
    parser.add_argument("--curve-count", type=int, help="messages per queues/body point (20000)")
    parser.add_argument("--worker-counts", default="1,10,100", help="queues curve: workers")
    parser.add_argument(
        "--body-sizes", default="100,1000,10000,100000,1000000", help="body curve: bytes"
    )
    parser.add_argument("--body-budget-mb", type=float, help="MB per body-size point (64)")
    parser.add_argument("--backlog-count", type=int, help="backlog curve: messages (100000)")
    parser.add_argument("--publish-many-counts", help="publish_many curve (1000,10000,100000)")
    parser.add_argument("--retry-count", type=int, help="retry storm: messages (10000)")
    parser.add_argument("--retry-delay", type=float, default=2.0, help="retry storm: delay, s")
    parser.add_argument(
        "--million",
        action="store_true",
        help="backlog of 1,000,000 and publish_many up to 1,000,000 (long)",
    )
    parser.add_argument("--curves-png", default=str(ROOT / "docs" / "performance-curves.png"))
    parser.add_argument("--label", default="", help="what code was measured (for the report)")
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--png", default=str(ROOT / "docs" / "performance.png"))
    args = parser.parse_args(argv)
    quick = args.quick
    args.consume_count = args.consume_count or (3000 if quick else 20000)
    args.publish_count = args.publish_count or (600 if quick else 5000)
    args.latency_seconds = args.latency_seconds or (3.0 if quick else 10.0)
    args.repeat = args.repeat or (1 if quick else 3)
    args.request_count = args.request_count or (400 if quick else 3000)
    args.compress_count = args.compress_count or (400 if quick else 3000)
    args.curve_count = args.curve_count or (3000 if quick else 20000)
    args.body_budget_mb = args.body_budget_mb or (4.0 if quick else 64.0)
    args.backlog_count = args.backlog_count or (
        MILLION if args.million else 3000 if quick else 100_000
    )
    args.publish_many_counts = args.publish_many_counts or (
        "1000,10000,100000,1000000"
        if args.million
        else "300,3000"
        if quick
        else "1000,10000,100000"
    )
    args.retry_count = args.retry_count or (300 if quick else 10_000)
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
            "retry_delay": args.retry_delay,
            "curve_count": args.curve_count,
            "request_count": args.request_count,
            "compress_count": args.compress_count,
        }
    )
    anchors = [case for case in args.limit_cases.split(",") if case]
    c_consume = [case for case in anchors if case in limit.CONSUME]
    c_publish = [case for case in anchors if case in limit.PUBLISH]
    if "consume" in sections:
        cases = [*(c for c in args.consume_cases.split(",") if c), *c_consume]
        results.consume = throughput(
            "consume",
            cases,
            args.consume_count,
            args.repeat,
            dict.fromkeys(c_consume, "limit"),
            cpu=results.consume_cpu,
        )
    if "publish" in sections:
        cases = [*(c for c in args.publish_cases.split(",") if c), *c_publish]
        results.publish = throughput(
            "publish", cases, args.publish_count, args.repeat, dict.fromkeys(c_publish, "limit")
        )
    if "latency" in sections:
        results.latency = latency(args.rate, args.latency_seconds, args.repeat)
    if "footprint" in sections:
        results.startup, results.rss = footprint(args.repeat)
    if "request" in sections:
        results.request, results.compression = requests(args)
    if "curves" in sections:
        results.curves = curves(args)
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    command += " --million" if args.million else ""
    text = markdown(results, command, args.label)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(text)
    chart(results, args.png)
    if results.curves:
        curves_chart(results, args.curves_png)
    print()
    print(text)
    print(f"wrote {args.markdown} and {args.png} in {time.monotonic() - started:.0f}s")
    return results


if __name__ == "__main__":
    main()
