"""benchmarks/scaling.py runs end to end with tiny counts (no figure is asserted)."""

from __future__ import annotations

import pytest

from benchmarks import scaling

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_processes_case_drains_the_queue_with_each_process_count(broker_url: str) -> None:
    results = scaling.processes_case(200, [1, 2], cpu_ms=0.1, url=broker_url)
    assert [r["processes"] for r in results] == [1, 2]
    assert all(r["count"] == 200 and r["msg_per_s"] > 0 for r in results)
