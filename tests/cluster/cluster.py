"""A real 3-node RabbitMQ cluster of private nodes on this machine.

Each node is a :class:`PrivateBroker` (own name, ports, data, config and env files) with two
additions made through its hooks rather than by changing it: a few cluster settings in its
config file, and kill -9 / restart of its Erlang VM. The nodes share the Erlang cookie of the
``rabbitmq`` user (every private node runs with ``HOME=/var/lib/rabbitmq``), which is what lets
``rabbitmqctl join_cluster`` join them. Quorum queues declared after the join have a member on
every node (``x-quorum-initial-group-size`` defaults to the cluster size).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

from broker import PrivateBroker
from harness import WorkerProcess, worker_env

CLUSTER_CONF = [
    # The default, stated: a partitioned minority keeps running and its quorum queue members
    # simply cannot reach a majority; clients connected to it get no confirms (see the tests).
    "cluster_partition_handling = ignore",
]


class ClusterNode(PrivateBroker):
    def __init__(self, epmd_port: int | None = None) -> None:
        super().__init__()
        if self.root is not None and epmd_port is not None:
            # A 4.x node in a root runs an epmd of its own port; the nodes of one cluster must
            # find each other through one epmd, so they share the first node's.
            self.epmd_port = epmd_port

    def _write_files(self) -> None:
        super()._write_files()
        conf = self.base / "rabbitmq.conf"
        conf.write_text(conf.read_text() + "\n".join(CLUSTER_CONF) + "\n")
        shutil.chown(conf, "rabbitmq", "rabbitmq")

    @property
    def pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((self.base / "pid").read_text().strip())
        return None

    def kill9(self) -> None:
        """SIGKILL the node's Erlang VM: no goodbye to clients or peers."""
        pid = self.pid
        assert pid is not None, f"{self.node} has no pid file"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (self.base / "pid").unlink(missing_ok=True)

    def boot(self) -> None:
        """Start the VM again on its data (it rejoins the cluster it belongs to)."""
        self.start()

    def ctl_stop(self) -> None:
        """A clean node stop (the VM exits); ``boot()`` brings it back."""
        self.ctl("stop", timeout=90)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (the detached VM is not our child, so this is rare) counts as gone.
    with contextlib.suppress(FileNotFoundError):
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    return False


class Cluster:
    def __init__(self, size: int = 3) -> None:
        first = ClusterNode()
        self.nodes = [first, *(ClusterNode(first.epmd_port) for _ in range(size - 1))]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node, comma-separated: a WORKERKIT_URL for the whole cluster."""
        return ",".join(self.urls)

    def start(self) -> None:
        errors: list[BaseException] = []

        def boot(node: ClusterNode) -> None:
            try:
                node.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(n,)) for n in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node, timeout=120)
            node.ctl("start_app", timeout=120)
            node.wait_amqp()
        running = self.running_nodes(first)
        assert running == {n.node for n in self.nodes}, running

    def stop(self) -> None:
        threads = [threading.Thread(target=n.stop) for n in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def node_named(self, name: str) -> ClusterNode:
        (node,) = [n for n in self.nodes if n.node == name]
        return node

    def others(self, node: ClusterNode) -> list[ClusterNode]:
        return [n for n in self.nodes if n is not node]

    def running_nodes(self, via: ClusterNode) -> set[str]:
        out = via.ctl("eval", "rabbit_nodes:all_running().").stdout
        return {n for n in (s.strip(" []'\n") for s in out.split(",")) if n}

    def leader(self, queue: str, via: ClusterNode) -> str:
        """The node hosting the quorum leader of ``queue`` ('' while there is none)."""
        result = via.ctl(
            "list_queues", "-q", "--no-table-headers", "name", "leader", check=False, timeout=30
        )
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return parts[1]
        return ""

    def members(self, queue: str, via: ClusterNode) -> str:
        result = via.ctl("list_queues", "-q", "--no-table-headers", "name", "members", timeout=30)
        for line in result.stdout.splitlines():
            if line.split(None, 1)[0:1] == [queue]:
                return line.split(None, 1)[1]
        return ""

    def quorum_status(self, queue: str, via: ClusterNode) -> list[dict[str, Any]]:
        """``rabbitmq-queues quorum_status``: one dict per member (Raft state, commit index...)."""
        result = via.cli(
            "rabbitmq-queues", "quorum_status", queue, "--formatter", "json", check=False
        )
        try:
            return list(json.loads(result.stdout))
        except ValueError:
            return []

    def node_of(self, connection_name: str, via: ClusterNode) -> ClusterNode | None:
        """The node serving the client connection named ``connection_name`` (by its port)."""
        result = via.ctl(
            "list_connections", "-q", "--no-table-headers", "port", "client_properties", timeout=30
        )
        for line in result.stdout.splitlines():
            port, _, props = line.partition("\t")
            if f'"{connection_name}"' in props or f"{connection_name}" in props:
                return next((n for n in self.nodes if str(n.port) == port.strip()), None)
        return None

    def heal(self) -> None:
        """Boot every node that is down and wait until all run in the cluster again."""
        for node in self.nodes:
            if node.pid is None or not _alive(node.pid):
                node.boot()
        first = self.nodes[0]
        deadline = time.monotonic() + 120
        while self.running_nodes(first) != {n.node for n in self.nodes}:
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster did not heal: {self.running_nodes(first)}")
            time.sleep(0.5)


HERE = Path(__file__).resolve().parent


class SteeredWorker(WorkerProcess):
    """A WorkerProcess running cluster_worker.py (retries and rejects steered by the body)."""

    def __init__(self, queue: str, url: str, out_dir: Path, **settings: Any) -> None:
        self.queue = queue
        self.out_dir = out_dir
        self.stats_path = out_dir / f"stats-{queue[-6:]}-{len(list(out_dir.iterdir()))}"
        env = worker_env(url, **settings)
        self.log = open(out_dir / f"log-{self.stats_path.name}.txt", "wb")  # noqa: SIM115
        run_dir = self.stats_path.with_suffix(".d")
        run_dir.mkdir()
        (run_dir / "finished").symlink_to(out_dir / "finished")
        self.run_dir = run_dir
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "cluster_worker.py"), queue, str(run_dir)],
            env=env,
            cwd=run_dir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
