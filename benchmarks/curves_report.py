"""The issue-16 part of the report: targets against the C limit rows, the growth curves, a chart."""

from __future__ import annotations

from typing import Any

from .curves import body_prefetch
from .report import Results, Series, Target, _m, _ratio_to, _table

LIMIT_GOAL_RSS_MB = 60.0  # the backlog target: RSS flat, <= 60 MB with defaults
STARTUP_GOAL_S = 2.0  # start-up with 100 workers
FLAT = 0.9  # "throughput flat" read as: the most workers keep >= 0.9x the one-worker rate


def _size(n: int) -> str:
    for unit, scale in (("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def _queue_points(r: Results) -> dict[int, dict[str, Series]]:
    return dict(r.curves.get("queues", {}))


def _body_ratios(r: Results) -> dict[int, float]:
    found = {}
    for size, kinds in r.curves.get("body", {}).items():
        wk, pika = kinds["wk"].median, kinds["pika"].median
        if wk and pika:
            found[size] = wk / pika
    return found


def targets(r: Results) -> list[Target]:
    c, p = r.consume, r.publish
    found = [
        Target(
            "consume no-op async (dict) / C, prefetch 100, multiple ack every 50",
            _m(c, "wk_async"),
            _m(c, "c_consume_multi"),
            0.75,
        ),
        Target(
            "consume prefetch 1000 profile / C, prefetch 1000, multiple ack every 100",
            _m(c, "wk_async_p1000"),
            _m(c, "c_consume_p1000"),
            0.5,
        ),
        Target("pydantic-model handler / dict handler", _m(c, "wk_model"), _m(c, "wk_async"), 0.8),
        Target("sync handler / async handler", _m(c, "wk_sync"), _m(c, "wk_async"), 0.8),
        Target(
            "publish_many / C publisher, 100 in flight",
            _m(p, "wk_publish_many"),
            _m(p, "c_publish_100"),
            0.75,
        ),
        Target(
            "AsyncPublisher 100 in flight / C publisher, 100 in flight",
            _m(p, "wk_async_many"),
            _m(p, "c_publish_100"),
            0.75,
        ),
        Target(
            "Publisher 1 thread / raw pika blocking",
            _m(p, "wk_publisher_1"),
            _m(p, "pika_blocking"),
            1.0,
        ),
    ]
    points = _queue_points(r)
    if points:
        most = max(points)
        found.append(
            Target(
                f"queues per process: {most} workers / 1 worker, msg/s",
                points[most]["rate"].median,
                points[1]["rate"].median if 1 in points else None,
                FLAT,
            )
        )
        found.append(
            Target(
                f"start-up with {most} workers, Runner.run() to consuming",
                points[most]["startup"].median,
                None,
                STARTUP_GOAL_S,
                lower_is_better=True,
                absolute=True,
                unit=" s",
            )
        )
    ratios = _body_ratios(r)
    if "body" in r.curves:
        found.append(
            Target(
                "body size: lowest workerkit / raw pika MB/s over the sizes",
                min(ratios.values()) if ratios else None,
                None,
                0.9,
                absolute=True,
            )
        )
    backlog = r.curves.get("backlog")
    if backlog is not None:
        found.append(
            Target(
                f"backlog of {backlog.get('count', 0):,}: peak RSS while draining",
                backlog.get("rss_peak"),
                None,
                LIMIT_GOAL_RSS_MB,
                lower_is_better=True,
                absolute=True,
                unit=" MB",
            )
        )
    storm = r.curves.get("retry")
    if storm is not None:
        delay = float(r.params.get("retry_delay", 0))
        found.append(
            Target(
                f"retry storm: first failure to all retried, delay {delay:g} s",
                storm.get("spread"),
                None,
                delay + 1.0,
                lower_is_better=True,
                absolute=True,
                unit=" s",
            )
        )
    return found


def _failed(point: dict[str, Any]) -> str:
    return "failed: " + str(point.get("error", "not run"))


def tables(r: Results) -> list[str]:
    lines: list[str] = []
    points = _queue_points(r)
    if points:
        one = points[1]["rate"].median if 1 in points else None
        rows = [
            f"| {n} | {p['rate'].cell()} | {_ratio_to(p['rate'].median, one)}"
            f" | {p['startup'].cell('{:.2f}')} |"
            for n, p in sorted(points.items())
        ]
        lines += _table(
            f"Queues per process: N no-op workers in one Runner, at least"
            f" {r.params.get('curve_count', '?'):,} messages spread over their queues",
            "| workers | msg/s, median (min-max) | vs 1 worker | Runner.run() to consuming (s) |",
            rows,
        )
    if "body" in r.curves:
        ratios = _body_ratios(r)
        rows = [
            f"| {_size(size)} | {body_prefetch(size)} | {k['wk'].cell('{:,.1f}')}"
            f" | {k['pika'].cell('{:,.1f}')}"
            f" | {f'{ratios[size]:.2f}x' if size in ratios else 'n/a'} |"
            for size, k in sorted(r.curves["body"].items())
        ]
        lines += _table(
            "Body size: drain a queue of one body size (MB/s of bodies)",
            "| body | prefetch (both) | workerkit, bytes handler | raw pika asyncio"
            " | workerkit / raw pika |",
            rows,
        )
    backlog = r.curves.get("backlog")
    if backlog is not None:
        lines += _backlog(backlog)
    many = r.curves.get("publish_many")
    if many is not None:
        rows = [
            f"| {n:,} | {_failed(p)} | | | |"
            if "error" in p
            else f"| {n:,} | {p['rate']:,.0f} | {p['rss_before']:.1f} | {p['rss_peak']:.1f}"
            f" | {p['growth']:+.1f} |"
            for n, p in sorted(many.items())
        ]
        lines += _table(
            "Publisher.publish_many of N items from a generator: memory (MB)",
            "| items | msg/s | RSS before | peak RSS | growth |",
            rows,
        )
    storm = r.curves.get("retry")
    if storm is not None:
        if "error" in storm:
            row = f"| {_failed(storm)} | | | | |"
        else:
            row = (
                f"| {storm['count']:,} | {storm['delay']:g} | {storm['failing']:.2f}"
                f" ({storm.get('failures_per_s', 0):,.0f}/s) | {storm['spread']:.2f}"
                f" | {storm.get('max_late', float('nan')):.2f} | {storm['goal']:.2f} |"
            )
        lines += _table(
            "Retry storm: N messages fail once together, all with the same delay (s)",
            "| messages | delay | first to last failure | first failure to all retried"
            " | latest retry after its own failure + delay | goal (delay + 1) |",
            [row],
        )
    return lines


def _backlog(b: dict[str, Any]) -> list[str]:
    if "error" in b:
        return ["### Backlog", "", _failed(b), ""]
    samples = b["samples"]
    step = max(1, len(samples) // 10)
    shown = samples[::step] + ([] if (len(samples) - 1) % step == 0 else samples[-1:])
    return [
        f"### Backlog: one default worker drains {b['count']:,} messages",
        "",
        f"{b['rate']:,.0f} msg/s; RSS {b['rss_first']:.1f} MB at the first sample,"
        f" {b['rss_peak']:.1f} MB at its peak, {b['rss_last']:.1f} MB at the end.",
        "",
        "| seconds | consumed | RSS (MB) |",
        "|---|---|---|",
        *(f"| {t:.1f} | {n:,} | {mb:.1f} |" for t, n, mb in shown),
        "",
    ]


def notes() -> list[str]:
    """How the limit rows and the curves are taken; part of docs/performance.md."""
    return [
        "## Limit rows and curves",
        "",
        "- **Limit rows** (`limit:` in the tables) are two small C programs in",
        "  `benchmarks/c/`, built with gcc against librabbitmq (Debian `librabbitmq-dev`,",
        "  installed by `benchmarks/setup.sh`, which `make bench` runs first) into",
        "  `benchmarks/.build/` the first time they are needed. They are what the broker",
        "  delivers to a client that costs almost nothing. The consumer drains the same",
        "  pre-loaded quorum queue of ~100-byte persistent JSON messages as the Python",
        "  consumers, at prefetch 100 (ack each, or one multiple ack every 50) and at prefetch",
        "  1000 (multiple ack every 100); its clock runs from the first delivery to the ack",
        "  covering the last one. It then pauses 0.5 s, outside the clock, before closing:",
        "  RabbitMQ 3.10 was seen to put back some messages whose single acks left just",
        "  before `channel.close` (3 to 68 of 300 in eight runs; none in eight runs with a",
        "  0.3 s pause).",
        "  Afterwards the queue must be empty. The publisher sends the same bodies,",
        "  persistent and mandatory, with at most 100 unconfirmed, after one confirmed",
        "  warm-up message; afterwards the queue must hold every message. Both run",
        "  interleaved with the Python cases of the same table, so their ratios come from one",
        "  run. Without gcc or librabbitmq the row says `not available` and why.",
        "- **Prefetch 1000 row**: the workerkit consumer with `prefetch = 1000` and",
        "  `concurrency = 100` (acks still after the handler, batched) stands in for a",
        "  high-throughput profile until one is documented; it is compared with the C",
        "  consumer at prefetch 1000.",
        "- **Queues per process**: N no-op `dict` workers (default settings) in one `Runner`,",
        "  each on its own pre-loaded queue (at least 500 messages each, so that what the",
        "  workers prefetch before the last one consumes stays under a quarter of the run).",
        "  msg/s is taken between the moments a quarter and three quarters of all messages",
        "  were handled; start-up is `Runner.run()` to `wait_ready()`, which includes",
        "  connecting and declaring (imports excluded: the start-up row above covers a whole",
        "  process).",
        "- **Body size**: one queue of one body size, drained by a workerkit `body: bytes`",
        "  worker and by raw pika's asyncio adapter with multiple acks; both use the same",
        "  prefetch, lowered for large bodies to keep about 4 MB in flight (with 100 the whole",
        "  run would sit in the client's buffers before the first handler). MB/s of bodies,",
        "  taken between the quarter and three-quarter marks; about 64 MB per size.",
        "- **Backlog**: one default no-op worker drains a pre-loaded backlog (100,000;",
        "  `--million` makes it 1,000,000) while a thread samples the process's RSS (psutil)",
        "  every 0.2 s; the peak is the kernel's (`VmHWM`, reset just before the runner starts).",
        "- **publish_many**: one `Publisher.publish_many` of N items (1,000, 10,000, 100,000;",
        "  `--million` adds 1,000,000) handed over as a generator; RSS just before it and the",
        '  kernel\'s peak during it. No number is set for this one, only "bounded": the call',
        "  returns one id per item, so some growth with N is in its contract.",
        "- **Retry storm**: N messages (10,000) whose first delivery raises, with",
        "  `RetryPolicy(max_attempts=2, delay=D, backoff=1, jitter=0)` (D = 2 s); the time",
        "  from the first failure to the last retried arrival, against D + 1 s. Each failure",
        "  publishes its retry copy; its slot takes the next delivery while the copy waits for",
        "  the broker's confirm, and the original is acked once it is confirmed, so the default",
        "  prefetch (20) bounds the failures waiting at once and the failures' rate (in the",
        "  table) is what the broker confirms; a retry lands at the tail of the work queue,",
        "  behind the first deliveries not yet taken, so the latest retry after its own",
        "  failure + D shows that wait, not the delay layout's (which adds no waiting of its",
        "  own: every message in one level expires in order).",
        "",
    ]


def curves_chart(r: Results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax = axes[0][0]
    points = sorted(_queue_points(r).items())
    xs = [n for n, p in points if p["rate"].values]
    ax.plot(xs, [_queue_points(r)[n]["rate"].median for n in xs], "o-", color="tab:green")
    ax.set_xscale("log")
    ax.set_xlabel("workers in one Runner")
    ax.set_ylabel("msg/s (line)")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    ys = [n for n, p in points if p["startup"].values]
    twin.plot(ys, [_queue_points(r)[n]["startup"].median for n in ys], "s--", color="black")
    twin.axhline(STARTUP_GOAL_S, linestyle=":", color="tab:red", linewidth=1)
    twin.set_ylabel("run() to consuming, s (dashed)")
    twin.set_ylim(bottom=0)
    ax.set_title("Queues per process")

    ax = axes[0][1]
    body = sorted(r.curves.get("body", {}).items())
    for kind, colour, name in (("wk", "tab:green", "workerkit"), ("pika", "tab:gray", "raw pika")):
        pts = [(size, k[kind].median) for size, k in body if k[kind].values]
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", color=colour, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("body, bytes")
    ax.set_ylabel("MB/s")
    ax.legend(fontsize=8)
    ax.set_title("Body size")

    ax = axes[0][2]
    backlog = r.curves.get("backlog") or {}
    samples = backlog.get("samples", [])
    ax.plot([s[0] for s in samples], [s[2] for s in samples], color="tab:green")
    ax.axhline(LIMIT_GOAL_RSS_MB, linestyle="--", color="tab:red", linewidth=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Backlog of {backlog.get('count', 0):,}: RSS while draining")

    ax = axes[1][0]
    many = sorted(
        (n, p) for n, p in (r.curves.get("publish_many") or {}).items() if "error" not in p
    )
    ax.plot([n for n, _ in many], [p["rss_peak"] for _, p in many], "o-", color="tab:green")
    ax.plot([n for n, _ in many], [p["rss_before"] for _, p in many], "o:", color="tab:gray")
    ax.set_xscale("log")
    ax.set_xlabel("items")
    ax.set_ylabel("RSS, MB (peak solid, before dotted)")
    ax.set_ylim(bottom=0)
    ax.set_title("publish_many memory")

    ax = axes[1][1]
    storm = r.curves.get("retry") or {}
    if "spread" in storm:
        ax.bar(
            ["first failure to\nall retried", "goal\n(delay + 1 s)"],
            [storm["spread"], storm["goal"]],
            color=["tab:green", "tab:red"],
        )
    ax.set_ylabel("seconds")
    ax.set_title(f"Retry storm of {storm.get('count', 0):,}")
    axes[1][2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
