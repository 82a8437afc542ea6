"""Turn measurements into markdown tables, ratios against the issue's targets, and a chart."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from .latency import WARMUP

LOAD_AT_START = os.getloadavg()  # noisy neighbours show up here; read when the run starts

CONSUME_LABELS = {
    "aiopika_callback": "raw aio-pika, queue.consume(callback), ack each",
    "aiopika_iterator": "raw aio-pika, queue.iterator(), ack each",
    "pika_blocking": "raw pika BlockingConnection, ack each",
    "pika_asyncio": "raw pika asyncio adapter, ack each",
    "pika_asyncio_batched": "raw pika asyncio adapter, multiple=True ack every 50",
    "faststream": "FastStream (faststream.rabbit), no-op async handler",
    "wk_async": "workerkit Runner, no-op async handler (body: dict)",
    "wk_async_metrics": "workerkit Runner, no-op async handler (body: dict), Prometheus metrics on",
    "wk_async_stamped": "workerkit Runner, no-op async handler, publish-time header, metrics off",
    "wk_async_metrics_stamped": "workerkit Runner, no-op async handler, publish-time header,"
    " metrics on (delivery lag observed)",
    "wk_async_bytes": "workerkit Runner, no-op async handler (body: bytes)",
    "wk_sync": "workerkit Runner, no-op sync handler (body: dict, thread pool)",
    "wk_model": "workerkit Runner, pydantic-model handler",
    "wk_async_p1000": "workerkit Runner, no-op async handler, prefetch 1000, concurrency 100",
    "c_consume_each": "limit: C librabbitmq, prefetch 100, ack each",
    "c_consume_multi": "limit: C librabbitmq, prefetch 100, multiple ack every 50",
    "c_consume_p1000": "limit: C librabbitmq, prefetch 1000, multiple ack every 100",
}
PUBLISH_LABELS = {
    "pika_blocking": "raw pika BlockingConnection, one at a time",
    "aiopika_one": "raw aio-pika, one at a time",
    "aiopika_many": "raw aio-pika, 100 in flight",
    "wk_publisher_1": "workerkit Publisher, 1 thread",
    "wk_publisher_8": "workerkit Publisher, 8 threads",
    "wk_publish_many": "workerkit Publisher.publish_many",
    "wk_async_one": "workerkit AsyncPublisher, one at a time",
    "wk_async_many": "workerkit AsyncPublisher, 100 in flight",
    "c_publish_100": "limit: C librabbitmq, 100 confirms in flight",
}
LATENCY_LABELS = {"aiopika": "raw aio-pika callback consumer", "wk": "workerkit Runner"}
FOOTPRINT_LABELS = {"aiopika": "raw aio-pika consumer", "wk": "workerkit Runner (one worker)"}


@dataclass
class Series:
    """Repeated measurements of one case; ``errors`` holds why runs failed."""

    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unavailable: str = ""  # why the case cannot run on this machine (no gcc, no librabbitmq)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def cell(self, fmt: str = "{:,.0f}") -> str:
        if not self.values:
            if self.unavailable and not self.errors:
                return "not available: " + self.unavailable
            return "failed: " + (self.errors[-1] if self.errors else "not run")
        median = fmt.format(self.median)
        if len(self.values) == 1:
            return median
        return f"{median} ({fmt.format(min(self.values))}-{fmt.format(max(self.values))})"


@dataclass
class Results:
    consume: dict[str, Series] = field(default_factory=dict)
    consume_cpu: dict[str, Series] = field(default_factory=dict)  # CPU us per message
    publish: dict[str, Series] = field(default_factory=dict)
    latency: dict[str, dict[str, Series]] = field(default_factory=dict)
    startup: dict[str, Series] = field(default_factory=dict)
    rss: dict[str, Series] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)  # see run.curves() for the layout
    # See request_report.py for the layout of these two.
    request: dict[str, dict[str, Series]] = field(default_factory=dict)
    compression: dict[str, dict[str, Series]] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    what: str
    value: float | None
    baseline: float | None
    goal: float
    lower_is_better: bool = False
    absolute: bool = False  # compare value itself with goal, not a ratio
    unit: str = "x"

    def ratio(self) -> float | None:
        if self.value is None:
            return None
        if self.absolute:
            return self.value
        if not self.baseline:
            return None
        return self.value / self.baseline

    def verdict(self) -> str:
        ratio = self.ratio()
        if ratio is None:
            return "n/a"
        met = ratio <= self.goal if self.lower_is_better else ratio >= self.goal
        return "met" if met else "MISSED"

    def row(self) -> str:
        ratio = self.ratio()
        shown = "n/a" if ratio is None else f"{ratio:.2f}{self.unit}"
        sign = "<=" if self.lower_is_better else ">="
        return f"| {self.what} | {shown} | {sign} {self.goal:g}{self.unit} | {self.verdict()} |"


def _m(series: dict[str, Series], key: str) -> float | None:
    found = series.get(key)
    return found.median if found else None


def targets(r: Results) -> list[Target]:
    c, p = r.consume, r.publish
    p99 = {k: v["p99"].median for k, v in r.latency.items() if "p99" in v}
    return [
        Target(
            "consume no-op async / raw aio-pika callback",
            _m(c, "wk_async"),
            _m(c, "aiopika_callback"),
            2.5,
        ),
        Target("consume no-op async / FastStream", _m(c, "wk_async"), _m(c, "faststream"), 3.0),
        Target(
            "consume no-op async / raw pika asyncio ack each",
            _m(c, "wk_async"),
            _m(c, "pika_asyncio"),
            0.75,
        ),
        Target(
            "Publisher 1 thread / raw pika blocking",
            _m(p, "wk_publisher_1"),
            _m(p, "pika_blocking"),
            0.9,
        ),
        Target(
            "Publisher 8 threads / Publisher 1 thread",
            _m(p, "wk_publisher_8"),
            _m(p, "wk_publisher_1"),
            3.0,
        ),
        Target(
            "AsyncPublisher 100 in flight / raw aio-pika 100 in flight",
            _m(p, "wk_async_many"),
            _m(p, "aiopika_many"),
            0.9,
        ),
        Target(
            "p99 latency at fixed rate / raw aio-pika",
            p99.get("wk"),
            p99.get("aiopika"),
            1.5,
            lower_is_better=True,
        ),
        Target(
            "idle RSS of a worker process",
            _m(r.rss, "wk"),
            None,
            60,
            lower_is_better=True,
            absolute=True,
            unit=" MB",
        ),
        Target(
            "start-up, process start to consuming",
            _m(r.startup, "wk"),
            None,
            1.0,
            lower_is_better=True,
            absolute=True,
            unit=" s",
        ),
    ]


# The metrics overhead (issue 10): each pair consumes the same messages, metrics off and on.
METRICS_PAIRS = (
    ("consume no-op async, metrics on / metrics off", "wk_async_metrics", "wk_async"),
    (
        "the same with the publish-time header (delivery lag observed)",
        "wk_async_metrics_stamped",
        "wk_async_stamped",
    ),
)


def metrics_overhead(r: Results) -> list[str]:
    """The metrics targets: on / off >= 0.95x in msg/s (ratio of the medians) and in CPU per
    message (off / on), which varies far less on a shared machine; then each round's pair (the
    cases of a round run back to back), and the CPU figures themselves."""
    lines = ["| target | measured | goal | |", "|---|---|---|---|"]
    notes = []
    for what, on, off in METRICS_PAIRS:
        if on not in r.consume and off not in r.consume:
            continue
        lines.append(Target(f"{what}, msg/s", _m(r.consume, on), _m(r.consume, off), 0.95).row())
        cpu_on, cpu_off = _m(r.consume_cpu, on), _m(r.consume_cpu, off)
        lines.append(Target(f"{what}, CPU per message (off / on)", cpu_off, cpu_on, 0.95).row())
        notes += _per_round(f"{on} / {off}, msg/s", r.consume, on, off)
        notes += _per_round(f"{off} / {on}, CPU per message", r.consume_cpu, off, on)
        if cpu_on and cpu_off:
            notes.append(
                f"- CPU per message (median, every thread of the consuming process): {off}"
                f" {cpu_off:.2f} us, {on} {cpu_on:.2f} us"
            )
    return [*lines, "", *notes, *([""] if notes else [])]


def _per_round(what: str, series: dict[str, Series], top: str, bottom: str) -> list[str]:
    tops, bottoms = series.get(top, Series()).values, series.get(bottom, Series()).values
    if not tops or len(tops) != len(bottoms):
        return []  # a failed run shifts the rounds: no pairs
    rounds = [a / b for a, b in zip(tops, bottoms, strict=True)]
    shown = ", ".join(f"{x:.2f}" for x in rounds)
    return [f"- {what} per round: {shown} (median {statistics.median(rounds):.2f})"]


def _table(title: str, header: str, rows: Sequence[str]) -> list[str]:
    return [f"### {title}", "", header, "|" + "---|" * header.count(" | ") + "---|", *rows, ""]


def _ratio_to(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "n/a"


def tables(r: Results) -> list[str]:
    lines: list[str] = []
    base_cb, base_pa = _m(r.consume, "aiopika_callback"), _m(r.consume, "pika_asyncio")
    base_c = _m(r.consume, "c_consume_multi")
    rows = [
        f"| {CONSUME_LABELS[k]} | {s.cell()} | {_ratio_to(s.median, base_cb)}"
        f" | {_ratio_to(s.median, base_pa)} | {_ratio_to(s.median, base_c)} |"
        for k, s in r.consume.items()
    ]
    lines += _table(
        f"Consume: {r.params.get('consume_count', '?'):,} persistent ~100-byte JSON messages,"
        " quorum queue, prefetch 100 unless stated, one process (msg/s)",
        "| consumer | msg/s, median (min-max) | vs aio-pika callback | vs pika asyncio ack each"
        " | vs C limit, multiple ack |",
        rows,
    )
    base_pb, base_am = _m(r.publish, "pika_blocking"), _m(r.publish, "aiopika_many")
    base_cp = _m(r.publish, "c_publish_100")
    rows = [
        f"| {PUBLISH_LABELS[k]} | {s.cell()} | {_ratio_to(s.median, base_pb)}"
        f" | {_ratio_to(s.median, base_am)} | {_ratio_to(s.median, base_cp)} |"
        for k, s in r.publish.items()
    ]
    lines += _table(
        f"Publish with confirms: {r.params.get('publish_count', '?'):,} persistent mandatory"
        " messages (msg/s)",
        "| publisher | msg/s, median (min-max) | vs pika blocking | vs aio-pika 100 in flight"
        " | vs C limit, 100 in flight |",
        rows,
    )
    rows = [
        f"| {LATENCY_LABELS[k]} | {v['p50'].cell('{:.2f}')} | {v['p95'].cell('{:.2f}')}"
        f" | {v['p99'].cell('{:.2f}')} |"
        for k, v in r.latency.items()
    ]
    lines += _table(
        f"End-to-end latency at {r.params.get('rate', '?'):g} msg/s for"
        f" {r.params.get('latency_seconds', '?'):g} s (ms, publish to handler)",
        "| consumer | p50 | p95 | p99 |",
        rows,
    )
    rows = [
        f"| {FOOTPRINT_LABELS[k]} | {s.cell('{:.2f}')}"
        f" | {r.rss[k].cell('{:.1f}') if k in r.rss else 'n/a'} |"
        for k, s in r.startup.items()
    ]
    lines += _table(
        "Start-up and idle memory",
        "| process | start to consuming (s) | idle RSS (MB) |",
        rows,
    )
    return lines


def machine() -> list[str]:
    """CPU, OS, broker and library versions, for whoever compares runs later."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    start = ", ".join(f"{x:.2f}" for x in LOAD_AT_START)
    versions = []
    for dist in ("pika", "aio-pika", "faststream", "pydantic", "orjson"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        commit = ""
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; load average {start} at the start"
        f" and {load} at the end of the run",
        f"- {platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- Broker: RabbitMQ {broker_version()} on the same machine",
        f"- {', '.join(versions)}; workerkit at commit {commit or 'unknown'}",
    ]


def broker_version() -> str:
    import pika

    from .common import URL

    try:
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        version = conn._impl.server_properties.get("version", b"?")
        conn.close()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as exc:  # the report is still worth writing without the version
        return f"unknown ({type(exc).__name__})"


def markdown(r: Results, command: str, label: str = "") -> str:
    from . import curves_report, request_report

    p = r.params
    lines = [
        "# Performance",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in one run of `{command}`:",
        "every figure below comes from the same run on the same broker, so compare ratios, not",
        "absolute numbers (these shared machines drift 10-20% between runs). Each consumer,",
        "publisher and worker ran in its own subprocess; each throughput case ran",
        f"{p.get('repeat', '?')} time(s), interleaved with the other cases, and the tables show",
        "the median (min-max).",
        "",
        *([f"Code under test: {label}.", ""] if label else []),
        "## Targets (issue 5)",
        "",
        "| target | measured | goal | |",
        "|---|---|---|---|",
        *(t.row() for t in targets(r)),
        "",
        "## Targets (issue 16): against the C limit rows, and as the work grows",
        "",
        "| target | measured | goal | |",
        "|---|---|---|---|",
        *(t.row() for t in curves_report.targets(r)),
        "",
        *(
            [
                "## Targets (issue 11): request/reply",
                "",
                "| target | measured | goal | |",
                "|---|---|---|---|",
                *(t.row() for t in request_report.targets(r)),
                "",
            ]
            if r.request
            else []
        ),
        "## Targets (issue 10): metrics overhead",
        "",
        *metrics_overhead(r),
        *_notes("METRICS.md"),
        "## Results",
        "",
        *tables(r),
        *(request_report.tables(r) if r.request or r.compression else []),
        "![throughput, latency and footprint chart](performance.png)",
        "",
        *(
            [
                "## Growth curves",
                "",
                *curves_report.tables(r),
                "![growth curves chart](performance-curves.png)",
                "",
            ]
            if r.curves
            else []
        ),
        *_notes("REQUEST_REPLY.md"),
        "## Machine",
        "",
        *machine(),
        "",
        "## How the numbers are taken",
        "",
        "- Consume: a fresh quorum queue is pre-loaded (and its depth checked) before the",
        "  consumer starts; the clock runs from the first delivery to the ack covering the last",
        "  delivery (workerkit: its transport's `ack` is wrapped to see that moment; FastStream:",
        "  the last handler's return, its ack follows on the same loop turn). workerkit workers",
        "  are declared by `Topology.declare` exactly as the runner declares them and pre-loaded",
        "  through the workerkit exchange; they run with default settings (concurrency 10, ack",
        "  batching on) but prefetch 100, as the raw clients (the default is 2 x concurrency).",
        "  FastStream runs with its per-message log switched",
        "  off (that favours it).",
        "- Publish: persistent, mandatory, confirmed, through the benchmark exchange into a",
        "  bound quorum queue; one warm-up message first so connecting is not timed; afterwards",
        "  the queue must hold every message. workerkit publishers get dicts (they encode JSON),",
        "  raw clients get the same bodies as bytes.",
        "- Latency: one pika publisher paces messages at the fixed rate with `time.time()` in",
        f"  the body; the consumer records receive time minus that stamp (first {WARMUP} samples",
        "  dropped).",
        "- Start-up: from just before the orchestrator spawns the process (so interpreter start",
        "  and imports count) to `Runner.wait_ready()` / the aio-pika `basic.consume` returning.",
        "  Idle RSS: psutil, 2 s after it started consuming.",
        "",
        *curves_report.notes(),
        *request_report.notes(),
        *_notes("PROFILE.md"),
        "## Rerun",
        "",
        "```",
        ".venv/bin/python -m benchmarks.run            # full run, several minutes",
        ".venv/bin/python -m benchmarks.run --quick    # reduced counts, a few minutes",
        ".venv/bin/python -m benchmarks.run --million  # backlog and publish_many of 1,000,000",
        "sh benchmarks/setup.sh   # gcc + librabbitmq-dev for the limit rows (make bench runs it)",
        "WORKERKIT_BENCH_URL=amqp://user:pass@host:5672/ .venv/bin/python -m benchmarks.run",
        "```",
        "",
        "`--help` lists the knobs (message counts, repeats, rate, output paths, sections).",
        "",
    ]
    return "\n".join(lines)


def _notes(name: str) -> list[str]:
    """A hand-written section kept across regenerations: benchmarks/PROFILE.md (profiling
    findings), METRICS.md (what the metrics hooks cost, measured apart from the broker),
    REQUEST_REPLY.md (the request/reply rounds and where a round trip goes)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [f.read().rstrip(), ""]


def chart(r: Results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))

    def bars(
        ax: Any, series: dict[str, Series], labels: dict[str, str], title: str, unit: str
    ) -> None:
        keys = [k for k, s in series.items() if s.values]
        values = [series[k].median or 0 for k in keys]
        colours = [
            "tab:green" if k.startswith("wk") else "tab:blue" if k.startswith("c_") else "tab:gray"
            for k in keys
        ]
        ax.barh([labels[k] for k in keys], values, color=colours)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.tick_params(axis="y", labelsize=8)

    bars(axes[0][0], r.consume, CONSUME_LABELS, "Consume throughput", "msg/s (median)")
    bars(
        axes[0][1], r.publish, PUBLISH_LABELS, "Publish throughput with confirms", "msg/s (median)"
    )

    ax = axes[1][0]
    kinds = [k for k in r.latency if r.latency[k]["p99"].values]
    width = 0.35
    for i, kind in enumerate(kinds):
        values = [r.latency[kind][q].median or 0 for q in ("p50", "p95", "p99")]
        ax.bar(
            [x + i * width for x in range(3)],
            values,
            width,
            label=LATENCY_LABELS[kind],
            color="tab:green" if kind == "wk" else "tab:gray",
        )
    ax.set_xticks([x + width / 2 for x in range(3)], ["p50", "p95", "p99"])
    ax.set_ylabel("ms")
    ax.set_title(f"End-to-end latency at {r.params.get('rate', 0):g} msg/s")
    if kinds:  # a run without the latency section has nothing to label
        ax.legend(fontsize=8)

    ax = axes[1][1]
    kinds = [k for k in r.startup if r.startup[k].values]
    names = ["workerkit" if k == "wk" else "raw aio-pika" for k in kinds]
    colours = ["tab:green" if k == "wk" else "tab:gray" for k in kinds]
    ax.bar(names, [r.rss[k].median or 0 if k in r.rss else 0 for k in kinds], color=colours)
    ax.set_ylabel("idle RSS, MB")
    ax.axhline(60, linestyle="--", color="tab:red", linewidth=1)
    twin = ax.twinx()
    twin.plot(names, [r.startup[k].median or 0 for k in kinds], "o", color="black")
    twin.set_ylabel("start to consuming, s (dots)")
    twin.set_ylim(bottom=0)
    ax.set_title("Idle memory (bars, 60 MB target) and start-up (dots)")

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
