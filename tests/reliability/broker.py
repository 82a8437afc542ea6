"""A private RabbitMQ node for fault injection: own node name, ports, data and config.

The shared broker (rabbit@localhost on 5672) must never be stopped or broken, so every fault in
the reliability suite is injected into a node started here. The node runs as the ``rabbitmq``
user (its data folders are chowned to it) and gets its own env file, because
/etc/rabbitmq/rabbitmq-env.conf pins ``NODENAME=rabbit@localhost``, and its own config file,
because /etc/rabbitmq/rabbitmq.conf pins the listener to 5672.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pika

BOOT_DEADLINE = 90.0


def free_port() -> int:
    """A loopback port nobody listens on right now, avoiding RabbitMQ's own port ranges."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        # 25672 and friends are the distribution ports of the shared node.
        if port not in (4369, 5672, 25672, 35672):
            return port


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str


class PrivateBroker:
    """One private node. ``url`` is ``amqp://guest:guest@127.0.0.1:<port>/``."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        token = uuid.uuid4().hex[:6]
        self.node = f"wkr{token}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.base = Path(tempfile.mkdtemp(prefix=f"wkr{token}-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._write_files()

    # -- setup -------------------------------------------------------------------------------

    def _write_files(self) -> None:
        (self.base / "mnesia").mkdir()
        (self.base / "log").mkdir()
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        lines = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            "loopback_users = none",
            # Fault scenarios count reconnects; a 2 s check makes alarms react quickly.
            "vm_memory_high_watermark.relative = 0.8",
            "disk_free_limit.absolute = 1MB",
        ]
        if self.tls is not None:
            lines += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {self.tls.ca}",
                f"ssl_options.certfile = {self.tls.cert}",
                f"ssl_options.keyfile = {self.tls.key}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (self.base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        shutil.chown(self.base, "rabbitmq", "rabbitmq")
        for path in self.base.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        self.base.chmod(0o755)

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": "/var/lib/rabbitmq",
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        return env

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Boot the node and wait (with a deadline) until it accepts AMQP connections."""
        subprocess.run(
            ["runuser", "-u", "rabbitmq", "--", "env", "-i"]
            + [f"{k}={v}" for k, v in self._env().items()]
            + ["rabbitmq-server", "-detached"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.wait_ready()

    def wait_ready(self, deadline_s: float = BOOT_DEADLINE) -> None:
        deadline = time.monotonic() + deadline_s
        last = ""
        # await_startup fails at once while the node is not yet registered with epmd: retry.
        while time.monotonic() < deadline:
            result = self.ctl("await_startup", "--timeout", "30", check=False, timeout=40)
            if result.returncode == 0:
                break
            last = result.stderr or result.stdout
            time.sleep(0.5)
        else:
            raise RuntimeError(
                f"{self.node} did not start in {deadline_s}s: {last[-500:]}\n{self.log_tail()}"
            )
        self.wait_amqp(max(5.0, deadline - time.monotonic()))

    def wait_amqp(self, deadline_s: float = 30.0) -> None:
        """A real AMQP handshake, not only an open port."""
        deadline = time.monotonic() + deadline_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                params = pika.URLParameters(self.url)
                params.socket_timeout = 2
                pika.BlockingConnection(params).close()
                return
            except Exception as exc:  # still booting
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"{self.node} accepts no AMQP connection: {last!r}")

    def stop(self) -> None:
        """Stop the node and delete its data (teardown)."""
        self.ctl("stop", check=False, timeout=60)
        pid_file = self.base / "pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), 9)
        shutil.rmtree(self.base, ignore_errors=True)

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app", timeout=120)
        self.wait_amqp()

    def restart(self) -> None:
        """A full node restart (the Erlang VM exits); durable data stays on disk."""
        self.ctl("stop", timeout=60)
        self.start()

    def close_all_connections(self, reason: str = "reliability test") -> None:
        self.ctl("close_all_connections", reason)

    def set_memory_alarm(self) -> None:
        self.ctl("set_vm_memory_high_watermark", "0.0000001")
        self.wait_alarm(True)

    def clear_memory_alarm(self) -> None:
        self.ctl("set_vm_memory_high_watermark", "0.8")
        self.wait_alarm(False)

    def wait_alarm(self, raised: bool, deadline_s: float = 30.0) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            result = self.ctl("eval", "rabbit_alarm:get_alarms().", check=False)
            if ("memory" in result.stdout) == raised:
                return
            time.sleep(0.2)
        raise RuntimeError(f"memory alarm {'not raised' if raised else 'not cleared'} in time")

    def connection_count(self) -> int:
        result = self.ctl("list_connections", "-q", "--no-table-headers", "name")
        return len([line for line in result.stdout.splitlines() if line.strip()])

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "HOME": "/var/lib/rabbitmq"},
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def log_tail(self, lines: int = 20) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        if not logs:
            return ""
        return "\n".join(logs[0].read_text(errors="replace").splitlines()[-lines:])
