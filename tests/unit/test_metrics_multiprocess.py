"""prometheus_client's multiprocess mode: what docs/observability.md tells a supervisor to do
gives one /metrics for several worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    from types import SimpleNamespace

    from workerkit.decision import Outcome
    from workerkit.message import Message
    from workerkit.metrics import Metrics, multiprocess_mode

    assert multiprocess_mode()
    metrics = Metrics()
    # The runtime's own counts (WorkerStats): outcomes are copied from them into the files.
    outcomes = {outcome: 0 for outcome in Outcome}
    stats = SimpleNamespace(queue="mp", in_flight=0, outcomes=outcomes, timings=None)
    metrics.on_worker_stats(None, stats)
    message = Message(b"x", queue="mp", timestamp=1)
    metrics.before_handle(message)
    outcomes[Outcome.ACKED] += 1
    metrics.after_handle(message, "acked", 0.01)
    # Given back before a handler took it: no hook call, counted all the same.
    outcomes[Outcome.GIVEN_BACK] += 1
    held = Message(b"y", queue="mp", timestamp=1)
    metrics.before_handle(held)  # still in flight when the process ends
    metrics.on_worker_stop(None)  # the worker stops: its last counts are written
    print("ok")
    """
)

SERVER = textwrap.dedent(
    """
    import os, sys
    from prometheus_client import multiprocess
    from workerkit.metrics import render

    for pid in sys.argv[1:]:
        multiprocess.mark_process_dead(int(pid))  # the supervisor saw these children exit
    body, content_type = render()
    print(content_type)
    print(body.decode())
    """
)


def test_render_aggregates_every_child_and_drops_dead_gauges(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    pids = []
    for _ in range(2):
        child = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE)
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0 and out.strip() == b"ok"
        pids.append(str(child.pid))
    alive = subprocess.run(
        [sys.executable, "-c", SERVER], env=env, capture_output=True, text=True, timeout=60
    )
    assert alive.returncode == 0, alive.stderr
    assert 'workerkit_messages_total{outcome="acked",queue="mp"} 2.0' in alive.stdout
    assert 'workerkit_messages_total{outcome="given_back",queue="mp"} 2.0' in alive.stdout
    assert 'workerkit_handler_seconds_count{queue="mp"} 2.0' in alive.stdout
    # Without mark_process_dead the in-flight gauges of exited children still count...
    assert 'workerkit_in_flight{queue="mp"} 2.0' in alive.stdout
    marked = subprocess.run(
        [sys.executable, "-c", SERVER, *pids], env=env, capture_output=True, text=True, timeout=60
    )
    assert marked.returncode == 0, marked.stderr
    # ...with it, the counters stay and the livesum gauge of the dead is gone.
    assert 'workerkit_messages_total{outcome="acked",queue="mp"} 2.0' in marked.stdout
    assert 'workerkit_in_flight{queue="mp"}' not in marked.stdout
