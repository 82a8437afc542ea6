"""Scenarios on a real 3-node cluster: nodes die, stop and get cut off; nothing confirmed is lost.

Each scenario publishes a paced stream of uniquely identified messages with workerkit.Publisher
(recording confirms) to a quorum queue with a member on every node, while a worker process
consumes it, and injects one fault. Every 25th message asks for a broker-side retry on its first
attempt (it sits in the quorum delay layout meanwhile) and every 40th is rejected to the DLQ.
The oracle's verdict: confirmed - finished - dead-lettered = empty.

Both clients get the whole cluster as their URL list (``amqp://n1,amqp://n2,amqp://n3``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from cluster import Cluster, ClusterNode, SteeredWorker
from harness import EXCHANGE, Load, collect, settle, wait_until
from oracle import Oracle

from workerkit.transport.pika_asyncio import HostOrder

PREFETCH = 20  # the default: 2 x concurrency 10; duplicates are bounded by prefetch x faults


def steer(n: int) -> dict[str, Any]:
    return {"n": n, "retry_first": 2.0 if n % 25 == 0 else 0.0, "reject": n % 40 == 7}


def new_queue(name: str) -> str:
    return f"cl.{name}.{uuid.uuid4().hex[:6]}"


def report(oracle: Oracle, **figures: float) -> None:
    """One line per scenario on stdout (pytest -s), for docs/reliability.md."""
    print(f"\nCLUSTER {oracle.name}: {json.dumps({**oracle.row(), **figures})}")


def confirm_times(oracle: Oracle) -> list[float]:
    """Wall-clock times of the oracle's confirms from now on (to time the publisher's failover)."""
    times: list[float] = []
    confirm = oracle.confirm

    def timed(message_id: str) -> None:
        times.append(time.time())
        confirm(message_id)

    oracle.confirm = timed  # type: ignore[method-assign]
    return times


def connected_node(cluster: Cluster, name: str, avoid: ClusterNode | None = None) -> ClusterNode:
    via = next(n for n in cluster.nodes if n is not avoid)
    found: list[ClusterNode] = []

    def seen() -> bool:
        node = cluster.node_of(name, via)
        if node is not None:
            found.append(node)
        return node is not None

    wait_until(seen, 30, f"the {name} connection to show up", poll=0.5)
    return found[-1]


def verdict(
    oracle: Oracle,
    load: Load,
    cluster: Cluster,
    queue: str,
    out_dir: Any,
    live: ClusterNode,
    **figures: float,
) -> None:
    settle(oracle, live.url, queue, out_dir, timeout=60)
    collect(oracle, out_dir)
    if oracle.lost:
        # Give retry copies held up by a failed-over delay queue a chance: every node back.
        print(f"\nSTUCK {oracle.name}: {len(oracle.lost)} not arrived; holding {_holding(live)}")
        cluster.heal()
        settle(oracle, live.url, queue, out_dir, timeout=60)
        collect(oracle, out_dir)
    assert not load.foreign_errors(), load.foreign_errors()[:3]
    rejected = {f"m{n}" for n in range(load.count) if steer(n)["reject"]} & oracle.confirmed
    assert rejected and rejected <= oracle.dead, "rejected messages reach the DLQ"
    retried = {f"m{n}" for n in range(load.count) if steer(n)["retry_first"]} & oracle.confirmed
    assert retried, "the scenario retried messages"
    missing = oracle.lost
    held = _held_in_delay_layout(live)
    report(oracle, held_in_delay_layout=held, **figures)
    if missing and missing <= retried and held >= len(missing):
        # Known broker limitation (RabbitMQ 3.10.8, see docs/reliability.md): a quorum delay
        # queue whose leader died stops expiring its messages on time. They are durable and
        # still in the layout, not lost, but they do not arrive. Everything else must hold.
        oracle.write_row()
        version = live.ctl("version", check=False).stdout.strip()
        pytest.xfail(
            f"RabbitMQ {version}: {len(missing)} retry copies held in the quorum delay layout"
            f" after a leader failover ({held} messages there); nothing else missing"
        )
    oracle.check(max_duplicates=PREFETCH * max(1, oracle.faults) * 2)


def _held_in_delay_layout(node: ClusterNode) -> int:
    return sum(
        int(line.split()[-1]) for line in _holding(node) if line.startswith(f"{EXCHANGE}.delay.")
    )


def _holding(node: ClusterNode) -> list[str]:
    out = node.ctl("list_queues", "-q", "--no-table-headers", "name", "messages", check=False)
    return [line for line in out.stdout.splitlines() if line.split()[-1:] != ["0"]]


def test_kill9_the_node_the_worker_and_the_publisher_are_connected_to(
    healthy_cluster: Cluster, workers: Any, oracle: Oracle, out_dir: Any
) -> None:
    c = healthy_cluster
    queue = new_queue("same")
    worker: SteeredWorker = workers(queue, c.url)
    worker.wait_healthy(60)
    node = connected_node(c, "workerkit-consume")
    # This process's publishers start with the worker's node (the order is per process).
    HostOrder.of(c.urls).connected(node.url)
    confirms = confirm_times(oracle)
    load = Load(oracle, c.url, queue, 1500, rate=60, body=steer, publish_timeout=5.0).start()
    wait_until(lambda: len(oracle.confirmed) >= 200, 60, "200 confirmed publishes")
    assert connected_node(c, "workerkit-publisher") is node
    fault_at = time.time()
    node.kill9()
    oracle.fault()
    back = worker.recovered_after(fault_at, 30)
    oracle.recovered(back)
    load.join(120)
    after = [t for t in confirms if t > fault_at + 0.5]  # confirms racing the kill aside
    assert after, f"no publish confirmed after the fault: {load.errors[-3:]}"
    publisher_back = after[0] - fault_at
    live = c.others(node)[0]
    assert connected_node(c, "workerkit-consume", avoid=node) is not node
    assert back < 10, f"consumers back after {back:.1f}s"
    verdict(
        oracle,
        load,
        c,
        queue,
        out_dir,
        live,
        consumer_back_s=round(back, 2),
        publisher_back_s=round(publisher_back, 2),
    )


def test_kill9_the_node_hosting_the_quorum_leader(
    healthy_cluster: Cluster, workers: Any, oracle: Oracle, out_dir: Any
) -> None:
    c = healthy_cluster
    queue = new_queue("leader")
    worker: SteeredWorker = workers(queue, c.url)
    worker.wait_healthy(60)
    leader_name = ""

    def has_leader() -> bool:
        nonlocal leader_name
        leader_name = c.leader(queue, c.nodes[0])
        return bool(leader_name)

    wait_until(has_leader, 30, "a quorum leader", poll=0.5)
    leader = c.node_named(leader_name)
    live = c.others(leader)[0]
    load = Load(oracle, c.url, queue, 900, rate=60, body=steer, publish_timeout=5.0).start()
    wait_until(lambda: len(oracle.confirmed) >= 200, 60, "200 confirmed publishes")
    fault_at = time.monotonic()
    leader.kill9()
    oracle.fault()
    wait_until(lambda: c.leader(queue, live) not in ("", leader.node), 60, "a new leader", poll=0.2)
    elected = time.monotonic() - fault_at
    load.join(120)
    verdict(oracle, load, c, queue, out_dir, live, new_leader_s=round(elected, 2))


def test_stop_a_node_for_30s_while_publishing_then_start_it(
    healthy_cluster: Cluster, workers: Any, oracle: Oracle, out_dir: Any
) -> None:
    c = healthy_cluster
    queue = new_queue("stop30")
    worker: SteeredWorker = workers(queue, c.url)
    worker.wait_healthy(60)
    node = connected_node(c, "workerkit-consume")
    live = c.others(node)[0]
    load = Load(oracle, c.url, queue, 2400, rate=40, body=steer, publish_timeout=5.0).start()
    wait_until(lambda: len(oracle.confirmed) >= 200, 60, "200 confirmed publishes")
    oracle.fault()
    fault_at = time.time()
    node.ctl_stop()
    back = worker.recovered_after(fault_at, 30)
    oracle.recovered(back)
    time.sleep(30)  # the scenario itself: the node stays down for 30 s while publishing goes on
    node.boot()
    rejoined_at = time.monotonic()
    c.heal()
    load.join(180)
    # Followers trail the leader by a few entries while publishing goes on: compare at rest.
    caught_up = wait_members_in_sync(c, queue, live)
    verdict(
        oracle,
        load,
        c,
        queue,
        out_dir,
        live,
        consumer_back_s=round(back, 2),
        member_in_sync_s=round(caught_up - rejoined_at, 2),
    )


def wait_members_in_sync(c: Cluster, queue: str, via: ClusterNode) -> float:
    """Wait until every member of the quorum queue has the same commit index; the time then."""

    def in_sync() -> bool:
        members = c.quorum_status(queue, via)
        indexes = {m.get("Commit Index") for m in members}
        return len(members) == len(c.nodes) and len(indexes) == 1

    wait_until(in_sync, 90, "the restarted member to catch up", poll=0.5)
    return time.monotonic()


# -- a minority partition ---------------------------------------------------------------------

# Cut one node off from its peers for MS milliseconds, on one machine: the node changes its own
# Erlang cookie (peers can no longer authenticate with it, nor it with them) and drops its
# distribution links; a process left behind restores the cookie and reconnects when time is up.
# Client connections to the node stay open: it is a minority that still accepts publishes.
_PARTITION = (
    "Peers = nodes(), Old = erlang:get_cookie(),"
    " spawn(fun() -> timer:sleep(MS), erlang:set_cookie(node(), Old),"
    " [net_kernel:connect_node(P) || P <- Peers] end),"
    " erlang:set_cookie(node(), wk_partitioned),"
    " [erlang:disconnect_node(P) || P <- Peers], ok."
)


def test_a_minority_partition_never_confirms_what_it_loses(
    healthy_cluster: Cluster, workers: Any, oracle: Oracle, out_dir: Any
) -> None:
    c = healthy_cluster
    queue = new_queue("minority")
    worker: SteeredWorker = workers(queue, c.url)
    worker.wait_healthy(60)
    consume_node = connected_node(c, "workerkit-consume")
    # The publisher of this process goes through another node: the one to cut off.
    cut = c.others(consume_node)[0]
    live = c.others(cut)[0] if c.others(cut)[0] is not consume_node else consume_node
    HostOrder.of(c.urls).connected(cut.url)
    load = Load(oracle, c.url, queue, 1200, rate=40, body=steer, publish_timeout=3.0).start()
    wait_until(lambda: len(oracle.confirmed) >= 150, 60, "150 confirmed publishes")
    assert connected_node(c, "workerkit-publisher") is cut
    before = len(oracle.confirmed)
    oracle.fault()
    cut.ctl("eval", _PARTITION.replace("MS", "20000"))
    wait_until(
        lambda: cut.node not in c.running_nodes(live), 30, "the majority to see the cut", 0.2
    )
    failed_at = len(load.errors)
    time.sleep(15)  # the partition lasts 20 s; publishing goes on through the cut-off node
    during_errors = len(load.errors) - failed_at
    during_confirmed = len(oracle.confirmed) - before
    # Heal: the cookie comes back by itself; restart the node so that it rejoins cleanly
    # (partition handling "ignore" leaves the partition flagged until a restart).
    wait_until(lambda: cut.ctl("status", check=False).returncode == 0, 30, "cookie back", 0.5)
    cut.ctl_stop()
    c.heal()
    load.join(180)
    # Through the minority, publishes failed with a typed error (verdict: no foreign errors)
    # and the publisher failed over to the majority; whatever was confirmed is accounted for.
    assert during_errors > 0, "publishes through the minority must fail, not hang or succeed"
    verdict(
        oracle,
        load,
        c,
        queue,
        out_dir,
        live,
        errors_during_cut=during_errors,
        confirmed_during_cut=during_confirmed,
    )
