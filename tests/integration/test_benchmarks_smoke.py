"""The benchmark harness still runs end to end (tiny counts; no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/ is a top-level package, not installed


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_quick_harness_writes_a_table_and_a_chart(
    broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKERKIT_BENCH_URL", broker_url)
    monkeypatch.delenv("BENCH_BROKER_URL", raising=False)
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import run

    markdown, png = tmp_path / "performance.md", tmp_path / "performance.png"
    results = run.main(
        [
            "--quick",
            "--sections=consume,publish,latency,footprint",  # the curves have their own test
            "--consume-count=200",
            "--publish-count=50",
            "--latency-seconds=0.5",
            "--rate=200",
            "--repeat=1",
            f"--markdown={markdown}",
            f"--png={png}",
        ]
    )

    text = markdown.read_text()
    assert "| consumer | msg/s, median (min-max) |" in text
    assert "| raw aio-pika, queue.consume(callback), ack each |" in text
    assert "| workerkit Runner, no-op async handler (body: dict) |" in text
    assert "failed:" not in text, [line for line in text.splitlines() if "failed:" in line]
    measured = {**results.consume, **results.publish}
    ran = [series for series in measured.values() if not series.unavailable]  # no librabbitmq
    assert ran and all(series.values and series.values[0] > 0 for series in ran)
    assert png.stat().st_size > 10_000


def _bench(monkeypatch: pytest.MonkeyPatch, broker_url: str | None = None) -> None:
    if broker_url:
        monkeypatch.setenv("WORKERKIT_BENCH_URL", broker_url)
        monkeypatch.delenv("BENCH_BROKER_URL", raising=False)
    monkeypatch.syspath_prepend(str(ROOT))


def test_limit_rows_say_why_when_librabbitmq_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the C library the limit case reports why, and its row says so: no failure."""
    _bench(monkeypatch)
    from benchmarks import limit
    from benchmarks.report import Series

    fake = tmp_path / "cc"  # a compiler that cannot find amqp.h, as gcc says it
    fake.write_text(
        "#!/bin/sh\necho 'fatal error: amqp.h: No such file or directory' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setattr(limit, "BUILD", tmp_path / "build")  # no cached binary

    result = limit.measure("c_consume_multi", 10)

    assert "librabbitmq-dev" in result["unavailable"]
    assert not (tmp_path / "build").exists() or not list((tmp_path / "build").iterdir())
    assert Series(unavailable=result["unavailable"]).cell().startswith("not available: ")

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert "no C compiler" in limit.measure("c_publish_100", 10)["unavailable"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_limit_rows_and_growth_curves_run_end_to_end(
    broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny counts through the orchestrator: C anchors, every curve, tables and the chart."""
    _bench(monkeypatch, broker_url)
    from benchmarks import limit, run

    try:
        limit.build("consume")
        limit.build("publish")
    except limit.Unavailable as exc:
        pytest.skip(f"C anchors not buildable here: {exc}")
    markdown, png = tmp_path / "performance.md", tmp_path / "curves.png"
    results = run.main(
        [
            "--sections=consume,publish,curves",
            "--consume-cases=",
            "--limit-cases=c_consume_multi,c_publish_100",  # one run of each C program
            "--publish-cases=",
            "--consume-count=200",
            "--publish-count=50",
            "--repeat=1",
            "--curve-count=100",
            "--worker-counts=1",
            "--body-sizes=1000",
            "--body-budget-mb=0.02",
            "--backlog-count=200",
            "--publish-many-counts=100",
            "--retry-count=30",
            "--retry-delay=0.2",
            f"--markdown={markdown}",
            f"--png={tmp_path / 'performance.png'}",
            f"--curves-png={png}",
        ]
    )

    text = markdown.read_text()
    assert "failed:" not in text, [line for line in text.splitlines() if "failed:" in line]
    assert "| not available" not in text, text
    assert {*results.consume, *results.publish} == {"c_consume_multi", "c_publish_100"}
    assert all(
        s.values and s.values[0] > 0 for s in [*results.consume.values(), *results.publish.values()]
    )
    assert "| limit: C librabbitmq, prefetch 100, multiple ack every 50 | " in text
    assert "## Targets (issue 16)" in text and "## Limit rows and curves" in text
    curves = results.curves
    assert curves["queues"][1]["rate"].values[0] > 0
    assert curves["queues"][1]["startup"].values[0] > 0
    assert all(curves["body"][1000][kind].values[0] > 0 for kind in ("wk", "pika"))
    assert curves["backlog"]["count"] == 200 and curves["backlog"]["rss_peak"] > 10
    assert curves["publish_many"][100]["rss_peak"] >= curves["publish_many"][100]["rss_before"]
    storm = curves["retry"]
    assert storm["count"] == 30 and storm["spread"] >= 0.2  # nothing arrives before its delay
    assert png.stat().st_size > 10_000


def test_report_shows_failed_and_unavailable_points_without_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A curve point that failed and a C row that cannot run still give a report and a chart."""
    _bench(monkeypatch)
    from benchmarks import curves_report
    from benchmarks.report import Results, Series, markdown

    params = {"consume_count": 100, "publish_count": 10, "rate": 1.0, "latency_seconds": 1.0}
    results = Results(params={**params, "repeat": 1, "retry_delay": 2.0, "curve_count": 100})
    results.consume = {
        "wk_async": Series([30_000.0]),
        "c_consume_multi": Series([60_000.0]),
        "c_consume_p1000": Series(unavailable="librabbitmq is not installed"),
    }
    results.curves = {
        "queues": {
            1: {"rate": Series([1000.0]), "startup": Series([0.5])},
            100: {"rate": Series(errors=["timed out"]), "startup": Series(errors=["x"])},
        },
        "body": {100: {"wk": Series([9.0]), "pika": Series([10.0])}},
        "backlog": {"error": "preload: queue holds 3 of 4 messages"},
        "publish_many": {
            1000: {"rate": 5.0, "rss_before": 40.0, "rss_peak": 42.0, "growth": 2.0, "samples": []}
        },
        "retry": {
            "count": 10,
            "delay": 2.0,
            "spread": 3.5,
            "failing": 0.5,
            "arriving": 0.2,
            "goal": 3.0,
        },
    }

    text = markdown(results, "python -m benchmarks.run")
    curves_report.curves_chart(results, str(tmp_path / "curves.png"))

    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert (
        "0.50x | >= 0.75x | MISSED"
        in rows["consume no-op async (dict) / C, prefetch 100, multiple ack every 50"]
    )
    assert "not available: librabbitmq is not installed" in text
    assert "failed: preload: queue holds 3 of 4 messages" in text
    assert "| 100 | failed: timed out |" in text
    assert (
        "0.90x | >= 0.9x | met"
        in rows["body size: lowest workerkit / raw pika MB/s over the sizes"]
    )
    assert (
        "3.50 s | <= 3 s | MISSED" in rows["retry storm: first failure to all retried, delay 2 s"]
    )
    assert (tmp_path / "curves.png").stat().st_size > 10_000


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_request_and_compression_sections_run_end_to_end(
    broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request/reply stack and codec runs with tiny counts; the report has their rows."""
    _bench(monkeypatch, broker_url)
    from benchmarks import run

    markdown, png = tmp_path / "performance.md", tmp_path / "performance.png"
    results = run.main(
        [
            "--sections=request",
            "--request-count=40",
            "--request-callers=1,4",
            "--compress-count=20",
            "--repeat=1",
            f"--markdown={markdown}",
            f"--png={png}",
        ]
    )
    text = markdown.read_text()
    assert "failed:" not in text, [line for line in text.splitlines() if "failed:" in line]
    assert "request/reply, 1 caller(s): workerkit / raw pika" in text
    assert "request/reply, 4 caller(s): workerkit / FastStream" in text
    assert set(results.request) == {
        f"{k}-{n}" for k in ("wk", "pika", "faststream") for n in (1, 4)
    }
    for series in results.request.values():
        assert series["rate"].values[0] > 0 and series["p99"].values[0] > 0
    sizes = {codec: s["wire_bytes"].values[0] for codec, s in results.compression.items()}
    assert sizes["gzip"] < sizes["none"] / 3 and sizes["zstd"] < sizes["none"] / 3
    assert 18_000 < results.compression["none"]["body_bytes"].values[0] < 24_000


def test_request_rounds_take_each_ratio_within_one_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Request/reply section's ratios pair each round's workerkit figure with the other
    stack's figure from the same round (drift between rounds cancels), and say whether the
    issue's targets are met."""
    _bench(monkeypatch)
    from benchmarks import request_rounds

    def case(rate: float) -> dict[str, float]:
        return {"rate": rate, "p50": 1000 / rate, "p99": 3000 / rate}

    results = {
        ("wk", 1): [case(500), case(250)],
        ("pika", 1): [case(400), case(300)],  # 1.25x, then 0.83x: median 1.04x
        ("faststream", 1): [case(250), case(100)],  # 2x, then 2.5x: median 2.25x
        ("wk", 16): [case(3000), {"error": "responder did not start"}],
        ("pika", 16): [case(2000), case(2000)],
        ("faststream", 16): [case(300), case(300)],
    }
    text = request_rounds.section({"results": results, "loads": [1.5, 2.5]}, 2, 100, [1, 16])
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "1.04x (1.25, 0.83) | 1.04x | >= 1.0x | met" in rows["| workerkit / raw pika, 1 caller"]
    assert (
        "2.25x (2.00, 2.50) | 2.25x | >= 3.0x | MISSED"
        in rows["| workerkit / FastStream, 1 caller"]
    )
    # A failed round has no ratio; raw pika has no target at 16 callers.
    assert "1.50x (1.50) | 1.50x | none" in rows["| workerkit / raw pika, 16 callers"]
    assert "10.00x (10.00) | 10.00x | >= 3.0x | met" in rows["| workerkit / FastStream, 16 callers"]
    assert "| 1 | 375 (500, 250) | 3.00 | 9.00 |" in text
    assert "| 16 | 3,000 (3,000, failed) |" in text
    assert "Load average (1 min) while it ran: 1.5-2.5" in text


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_request_rounds_run_every_stack_end_to_end(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _bench(monkeypatch, broker_url)
    from benchmarks import request_rounds

    text = request_rounds.main(["--rounds=1", "--count=30", "--callers=1,2"])
    assert "failed" not in text and "not measured" not in text, text
    for name in ("raw pika, 1 caller", "FastStream, 1 caller", "FastStream, 2 callers"):
        assert f"| workerkit / {name} |" in text


def test_request_segments_split_a_capture_into_the_parts_of_each_round_trip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Packets of two round trips (times in ms) with a stray packet and another client's
    traffic around them: each part is the median over the round trips found."""
    _bench(monkeypatch)
    from benchmarks import request_segments

    caller, responder, replier, other = 40001, 40002, 40003, 40009
    ack = b"\x01\x00\x01\x00\x00\x00\x0d\x00<\x00P" + b"\x00" * 10

    def trip(start: float, n: int) -> list[tuple[float, int, str, bytes]]:
        body = b'{"n":%d,"sku":"A1"}' % n
        return [
            (start, caller, "out", body),  # the request
            (start + 0.0009, caller, "in", ack),  # its confirm
            (start + 0.001, responder, "in", body),  # delivered
            (start + 0.0013, replier, "out", body),  # the reply leaves the responder
            (start + 0.0015, caller, "in", body),  # and reaches the caller
        ]

    packets = [
        *trip(0.0, 1),
        (0.0017, other, "out", b'{"n": 5}'),  # not one of the benchmark's connections
        *trip(0.002, 2),
        (0.0035, responder, "in", b'{"n": 9}'),  # a stray delivery: ignored
        *trip(0.004, 3),
    ]
    found = request_segments.split(packets, {caller, responder, replier})
    assert found["round trips"] == 3
    expected = {"broker, request": 1000, "responder": 300, "broker, reply": 200}
    for part, micros in {**expected, "caller": 500, "total": 2000, "confirm": 900}.items():
        assert found[part] == pytest.approx(micros), part


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_request_segments_run_end_to_end(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)).close()
    except (PermissionError, AttributeError) as exc:
        pytest.skip(f"packet capture needs root or CAP_NET_RAW on Linux: {exc}")
    if "127.0.0.1" not in broker_url and "localhost" not in broker_url:
        pytest.skip("the capture reads the loopback interface: the broker must be local")
    _bench(monkeypatch, broker_url)
    from benchmarks import request_segments

    found = request_segments.main(["--rounds=1", "--count=200", "--pairs=wk/wk,pika/pika_confirm"])
    for runs in found.values():
        assert runs[0]["round trips"] >= 150
        assert all(runs[0][part] > 0 for part in request_segments.PARTS)


@pytest.mark.parametrize(
    "case", ["wk_async", "wk_async_hooks", "wk_async_metrics", "wk_async_metrics_stamped"]
)
def test_runtime_path_handles_every_message_with_its_middleware(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker-free per-message path: every delivery acked, and the metrics cases really
    count them (the delivery-lag histogram only where the publish time is stamped)."""
    import asyncio

    monkeypatch.syspath_prepend(str(ROOT))
    from prometheus_client import REGISTRY

    from benchmarks import runtime_path

    queue = f"bench.runtime.{case}"

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"queue": queue}) or 0.0

    acked_before = REGISTRY.get_sample_value(
        "workerkit_messages_total", {"queue": queue, "outcome": "acked"}
    )
    lag_before = sample("workerkit_delivery_lag_seconds_count")
    result = asyncio.run(runtime_path.measure(case, 300))
    assert result["count"] == 300 and result["cpu_us_per_message"] > 0
    acked = REGISTRY.get_sample_value(
        "workerkit_messages_total", {"queue": queue, "outcome": "acked"}
    )
    lag = sample("workerkit_delivery_lag_seconds_count") - lag_before
    if "metrics" in case:
        assert acked is not None and acked - (acked_before or 0.0) == 300
        assert sample("workerkit_in_flight") == 0
        assert lag == (300 if case.endswith("_stamped") else 0)
    else:
        assert acked == acked_before  # no metrics middleware: nothing counted for this queue


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_instruction_counts_run_without_and_with_the_broker(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks.instructions (the metrics cost in benchmarks/METRICS.md) runs both ways."""
    import shutil

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (benchmarks/setup.sh installs it)")
    _bench(monkeypatch, broker_url)
    monkeypatch.chdir(ROOT)  # the counted processes import benchmarks from there
    from benchmarks import instructions

    monkeypatch.setattr(instructions, "BIG", 400)
    monkeypatch.setattr(instructions, "SMALL", 200)
    # Tens of thousands of instructions per delivery: the difference of two whole runs, so a
    # count of the wrong process or a run that handled nothing would not come out so.
    assert 20_000 < instructions.per_delivery("wk_async_metrics", e2e=False) < 1_000_000
    assert 20_000 < instructions.per_delivery("wk_async_metrics_stamped", e2e=True) < 1_000_000
