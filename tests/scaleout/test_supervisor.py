"""``workerkit run --processes N`` with real child processes against the real broker."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator

import pika
import pytest

from .conftest import Group, delete_queues, publish_tasks, queue_depth, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def queue(broker_url: str, unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("scale")
    yield name
    delete_queues(broker_url, name, f"{name}.dlq")


def bodies(count: int, sleep: float, start: int = 0) -> list[bytes]:
    return [json.dumps({"n": n, "sleep": sleep}).encode() for n in range(start, start + count)]


def test_a_killed_child_is_restarted_alone_and_no_message_is_lost(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    g = group(broker_url, queue, 2)
    g.wait_healthy()
    first = set(g.children())
    assert len(first) == 2
    publish_tasks(broker_url, "wkt", queue, bodies(300, 0.05))
    wait_until(lambda: len({x.pid for x in g.lines()}) == 2, 30, "both children to handle")
    victim, survivor = sorted(first)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(set(g.children()) - first) == 1, 20, "a new child")
    assert survivor in g.children(), "the other child must not be touched"
    g.wait_healthy(30)
    wait_until(lambda: g.done() >= set(range(300)), 60, "every message to be handled")
    assert "was killed by SIGKILL; restarting" in g.log()
    assert g.proc.poll() is None


def test_sigterm_drains_every_child_and_exits_0(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    g = group(broker_url, queue, 2, "--concurrency", "2")
    g.wait_healthy()
    publish_tasks(broker_url, "wkt", queue, bodies(20, 1.5))
    wait_until(lambda: len([x for x in g.lines() if x.kind == "start"]) >= 4, 30, "4 handlers")
    started = {x.n for x in g.lines() if x.kind == "start"}
    g.signal(signal.SIGTERM)
    assert g.wait(30) == 0, g.log()
    done = g.done()
    assert started <= done, "in-flight handlers finished before the exit"
    assert not g.children()
    # Nothing lost: what was not handled is back in the queue (prefetched ones included).
    assert queue_depth(broker_url, queue) + len(done) >= 20
    assert len(done) < 20, "the drain stopped consuming instead of emptying the queue"


def test_ctrl_c_to_the_process_group_drains_every_child(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    """A terminal's Ctrl-C sends SIGINT to the parent and every child; the parent relays it as
    SIGTERM. Taken as two stop requests, the children would abandon their handlers."""
    g = group(broker_url, queue, 2, "--concurrency", "1")
    g.wait_healthy()
    publish_tasks(broker_url, "wkt", queue, bodies(2, 2.0))
    wait_until(lambda: len({x.pid for x in g.lines() if x.kind == "start"}) == 2, 30, "2 handlers")
    os.killpg(g.proc.pid, signal.SIGINT)
    assert g.wait(30) == 0, g.log()
    assert g.done() == {0, 1}, f"in-flight handlers were abandoned:\n{g.log()}"
    assert "not waiting for running handlers" not in g.log()


def test_a_second_signal_kills_the_children_at_once(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    g = group(broker_url, queue, 2, "--concurrency", "1")
    g.wait_healthy()
    publish_tasks(broker_url, "wkt", queue, bodies(4, 60))
    wait_until(lambda: len([x for x in g.lines() if x.kind == "start"]) >= 2, 30, "2 handlers")
    g.signal(signal.SIGTERM)
    time.sleep(0.5)  # the first signal is being handled (a drain that would take 60 s)
    began = time.monotonic()
    g.signal(signal.SIGTERM)
    assert g.wait(15) == 1, g.log()
    assert time.monotonic() - began < 10
    assert "killing every worker process now" in g.log()
    assert queue_depth(broker_url, queue) == 4, "killed handlers' messages went back"


def test_refused_credentials_in_the_children_stop_the_group_quickly(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    bad = broker_url.replace("guest:guest@", "guest:wrong@")
    assert bad != broker_url
    began = time.monotonic()
    g = group(bad, queue, 3)
    code = g.wait(30)
    assert code == 4, g.log()
    assert time.monotonic() - began < 20
    assert "refused credentials" in g.log() and "stopping the group" in g.log()
    assert "restarting" not in g.log()


def test_a_topology_clash_in_the_children_stops_the_group(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    conn.channel().queue_declare(queue, durable=True)  # classic: the worker wants quorum
    conn.close()
    g = group(broker_url, queue, 2)
    assert g.wait(30) == 3, g.log()
    assert "topology clash" in g.log()


def test_a_child_crashing_at_start_up_stops_the_group_instead_of_looping(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    g = group(broker_url, queue, 2, WORKERKIT_TEST_CRASH="start")
    assert g.wait(60) == 1, g.log()
    assert "5 times in a row before it ever consumed: stopping the group" in g.log()


def test_bad_targets_fail_in_the_parent_before_any_child(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    g = group(broker_url, queue, 3, "tests.scaleout.no_such_module")
    assert g.wait(30) == 2, g.log()
    assert "cannot import 'tests.scaleout.no_such_module'" in g.log()
    assert "started (pid" not in g.log()


def _sample(text: str, series: str) -> float | None:
    """The value of one exposition line ``series value``; None when the series is absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def test_the_group_serves_readiness_and_the_metrics_of_every_child(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    g = group(broker_url, queue, 2, "--concurrency", "2")
    g.wait_healthy()
    wait_until(lambda: g.get("/ready")[0] == 200, 15, "the group to be ready")
    _, text = g.get("/metrics")
    for outcome in ("acked", "retried", "dead_lettered", "rejected", "invalid"):
        series = f'workerkit_messages_total{{outcome="{outcome}",queue="{queue}"}}'
        assert _sample(text, series) == 0.0, f"{series} must exist from start-up:\n{text}"
    for outcome in ("requeued", "given_back"):
        series = f'workerkit_messages_total{{outcome="{outcome}",queue="{queue}"}}'
        assert _sample(text, series) == 0.0, f"{series} must exist from start-up:\n{text}"

    publish_tasks(broker_url, "wkt", queue, [*bodies(40, 0.0), b"not json"])
    acked = f'workerkit_messages_total{{outcome="acked",queue="{queue}"}}'
    wait_until(lambda: _sample(g.get("/metrics")[1], acked) == 40, 30, "40 acked in /metrics")
    _, text = g.get("/metrics")
    assert _sample(text, f'workerkit_messages_total{{outcome="invalid",queue="{queue}"}}') == 1
    assert _sample(text, f'workerkit_handler_seconds_count{{queue="{queue}"}}') == 41
    assert len({line.pid for line in g.lines()}) == 2, "both children handled some"
    # Each child's log lines say which child wrote them.
    consuming = [line for line in g.log().splitlines() if "consuming from" in line]
    assert sorted(line.split("[child=")[1][0] for line in consuming) == ["0", "1"], g.log()

    publish_tasks(broker_url, "wkt", queue, bodies(2, 3.0, start=100))
    wait_until(lambda: {100, 101} <= {x.n for x in g.lines() if x.kind == "start"}, 30, "2 slow")
    in_flight = f'workerkit_in_flight{{queue="{queue}"}}'
    assert _sample(g.get("/metrics")[1], in_flight) == 2
    g.signal(signal.SIGTERM)
    wait_until(lambda: g.get("/ready")[0] == 503, 5, "/ready to say 503 while draining")
    assert not {100, 101} <= g.done(), "the drain was still running when /ready said 503"
    assert g.wait(30) == 0, g.log()
    assert {100, 101} <= g.done()


def test_the_group_counts_deliveries_given_back_before_a_handler_took_them(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    """A delivery that waited too long for a slot is given back without a handler call, so no
    hook sees it: in multi-process mode it was missing from the group's given_back count."""
    # consumer_timeout 4 s, handler_timeout 3 s: a delivery may wait 0.8 s for a slot.
    env = {"WORKERKIT_BROKER_CONSUMER_TIMEOUT": "4", "WORKERKIT_HANDLER_TIMEOUT": "3"}
    g = group(broker_url, queue, 2, "--concurrency", "1", "--prefetch", "4", **env)
    g.wait_healthy()
    wait_until(lambda: g.get("/ready")[0] == 200, 15, "the group to be ready")
    publish_tasks(broker_url, "wkt", queue, bodies(12, 1.0))
    series = f'workerkit_messages_total{{outcome="given_back",queue="{queue}"}}'

    def logged() -> int:
        return sum(int(n) for n in re.findall(r"gave back (\d+) deliveries", g.log()))

    wait_until(lambda: logged() > 0, 30, "a child to give deliveries back")
    wait_until(lambda: set(range(12)) <= g.done(), 60, "every task handled in the end")
    wait_until(
        lambda: _sample(g.get("/metrics")[1], series) == logged(), 5, "/metrics to count them"
    )
    g.signal(signal.SIGTERM)
    assert g.wait(30) == 0, g.log()


def test_group_health_is_503_while_one_child_is_down(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    g = group(broker_url, queue, 2)
    g.wait_healthy()
    child = g.children()[0]
    os.kill(child, signal.SIGSTOP)  # a hung child: alive, but it stops reporting
    try:
        wait_until(lambda: g.health() == 503, 15, "the group to turn unhealthy")
    finally:
        os.kill(child, signal.SIGCONT)
    g.wait_healthy(15)


def test_children_of_a_killed_parent_drain_and_exit_on_their_own(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    g = group(broker_url, queue, 2)
    g.wait_healthy()
    children = g.children()
    assert len(children) == 2
    g.proc.kill()  # kill -9 the parent: the status pipes break
    g.proc.wait(10)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
        return stat.split(") ", 1)[1].startswith("Z")  # a zombie counts as gone

    wait_until(lambda: all(gone(pid) for pid in children), 20, "the orphans to exit")
    assert "the supervising process is gone; draining" in g.log()
