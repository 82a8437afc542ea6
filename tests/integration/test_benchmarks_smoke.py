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
    assert "failed:" not in text, text
    measured = {**results.consume, **results.publish}
    assert measured and all(series.values and series.values[0] > 0 for series in measured.values())
    assert png.stat().st_size > 10_000
