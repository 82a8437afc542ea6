"""A private RabbitMQ node of any supported version: own node name, ports, data and config.

The shared broker (rabbit@localhost on 5672) must never be stopped or broken, so every fault in
the reliability suite is injected into a node started here. The node runs as the ``rabbitmq``
user (its data folders are chowned to it) and gets its own env file, because
/etc/rabbitmq/rabbitmq-env.conf pins ``NODENAME=rabbit@localhost``, and its own config file,
because /etc/rabbitmq/rabbitmq.conf pins the listener to 5672.

Versions (``WORKERKIT_TEST_BROKER`` picks one for a whole pytest run, see
:func:`version_under_test`):

* ``3.10``: the host's own ``rabbitmq-server``.
* ``4.0`` and ``4.3``: a Debian root (trixie: 4.0.5, forky: 4.3.6) built by
  ``scripts/brokers.sh`` under /var/cache/workerkit-brokers. The node runs chrooted into it,
  with its data folders inside the root (owned by the root's ``rabbitmq`` user), /proc mounted
  while any node of that root runs, and an epmd of its own on its own port (so that it never
  touches the shared node's epmd on 4369). ``scripts/brokers.sh clean`` stops what a killed
  test run left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pika

BOOT_DEADLINE = 90.0
VERSIONS = ("3.10", "4.0", "4.3")
VERSION_ENV = "WORKERKIT_TEST_BROKER"
REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "brokers.sh"
# Inside a root: where private nodes keep their folders (one per node, so /proc stays mounted
# while any is left).
NODES_DIR = "var/lib/workerkit-nodes"
ROOT_MARK = ".workerkit-root"


def version_under_test() -> str:
    """The broker version a pytest run is about: ``WORKERKIT_TEST_BROKER``, default 3.10."""
    version = os.environ.get(VERSION_ENV, "3.10").strip() or "3.10"
    if version not in VERSIONS:
        raise ValueError(f"{VERSION_ENV}={version!r}: supported are {', '.join(VERSIONS)}")
    return version


def root_of(version: str) -> Path | None:
    """The chroot of ``version`` (None for the host's 3.10), built if missing.

    Building needs debootstrap and the Debian mirror; a failure raises with the script's output
    (a test session must fail loudly, never skip).
    """
    if version == "3.10":
        return None
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "path", version], capture_output=True, text=True, check=True
    )
    root = Path(result.stdout.strip())
    if not (root / ROOT_MARK).exists():
        build = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "build", version],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=1800,
        )
        if build.returncode != 0 or not (root / ROOT_MARK).exists():
            raise RuntimeError(
                f"could not build the RabbitMQ {version} root {root}:"
                f" {(build.stderr or build.stdout)[-2000:]}"
            )
    return root


def describe(version: str) -> str:
    """'RabbitMQ 4.3.6 (chroot /var/cache/...)' or 'RabbitMQ 3.10.8 (host)' for report headers."""
    root = root_of(version)
    if root is None:
        found = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"], capture_output=True, text=True
        )
        return f"RabbitMQ {found.stdout.split('-')[0] or '(not installed)'} (host)"
    return f"RabbitMQ {(root / ROOT_MARK).read_text().split('-')[0]} (chroot {root})"


def _ids(root: Path | None, name: str) -> tuple[int, int]:
    """uid and gid of ``name`` in the root's /etc/passwd (the host's for no root)."""
    passwd = (root or Path("/")) / "etc" / "passwd"
    for line in passwd.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise RuntimeError(f"no user {name!r} in {passwd}")


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    with open(root / ".workerkit-nodes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _proc_mounted(root: Path) -> bool:
    target = str((root / "proc").resolve())
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


# The node a whole pytest run uses as its broker (tests/conftest.py's broker_url), if private.
_session_node: PrivateBroker | None = None


def set_session_node(node: PrivateBroker | None) -> None:
    global _session_node
    _session_node = node


def session_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    """rabbitmqctl against the broker the tests run on: the session's private node (4.x, from
    inside its root), else the host's own node."""
    if _session_node is not None:
        return _session_node.ctl(*args, timeout=30)
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, check=True, timeout=30
    )


def session_management_url() -> str | None:
    """The management API of the session's private node (4.x runs), else None: the 3.10 run's
    broker is the host node, whose API is the one derived from its AMQP URL (port 15672)."""
    return _session_node.management_url if _session_node is not None else None


def management_serves(amqp_url: str, management_url: str | None = None) -> bool:
    """Whether the management API at ``management_url`` (default: derived from ``amqp_url``,
    same host, port 15672) answers and is the broker under test's own: it lists the AMQP port
    among its listeners. On this machine 15672 is the host node's API, which knows nothing of a
    private node's queues."""
    import json
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(amqp_url)
    api = urlsplit(management_url or f"http://{parts.hostname}:15672")
    request = urllib.request.Request(f"http://{api.hostname}:{api.port}/api/overview")
    password = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    password.add_password(
        None,
        request.full_url,
        api.username or parts.username or "guest",
        api.password or parts.password or "guest",
    )
    opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(password))
    try:
        with opener.open(request, timeout=2) as response:
            listeners = json.loads(response.read()).get("listeners", [])
    except (OSError, ValueError):
        return False
    port = parts.port or 5672
    return any(entry.get("port") == port for entry in listeners)


def _with_management(plugins: str) -> str:
    """The enabled_plugins term ``plugins`` (``[a,b].``) with rabbitmq_management added."""
    names = [name.strip() for name in plugins.strip().removesuffix(".").strip("[]").split(",")]
    names = [name for name in names if name]
    if "rabbitmq_management" not in names:
        names.append("rabbitmq_management")
    return f"[{','.join(names)}]."


def free_port() -> int:
    """A loopback port nobody listens on right now, avoiding RabbitMQ's own port ranges."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        # 25672 and friends are the distribution ports of the shared node, 15672 its HTTP API.
        if port not in (4369, 5672, 15672, 25672, 35672):
            return port


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str


class PrivateBroker:
    """One private node. ``url`` is ``amqp://guest:guest@127.0.0.1:<port>/``.

    ``version`` is "3.10" (the host's server), "4.0" or "4.3" (a chroot); None means the
    version of the test run (:func:`version_under_test`).
    """

    def __init__(
        self,
        tls: TlsFiles | None = None,
        version: str | None = None,
        config: Callable[[PrivateBroker], list[str]] | None = None,
        plugins: str = "[].",
        files: Sequence[Path] = (),
        management: bool = False,
    ) -> None:
        """``config`` replaces the default rabbitmq.conf lines (it may read ``self.port`` and
        ``self.inner(self.base / name)`` for each of ``files``, copied into the node's folder);
        ``plugins`` is the enabled_plugins term. ``management`` adds rabbitmq_management on a
        loopback port of its own (``http_port``, never the shared node's 15672); it costs a few
        seconds of boot, so only nodes that serve the API to tests ask for it."""
        token = uuid.uuid4().hex[:6]
        self.version = version or version_under_test()
        self.root = root_of(self.version)
        self.node = f"wkr{token}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port() if self.root else 4369
        self.tls = tls
        self.tls_port = free_port() if tls else None
        if self.root is None:
            self.base = Path(tempfile.mkdtemp(prefix=f"wkr{token}-"))
        else:
            with _root_lock(self.root):
                self.base = self.root / NODES_DIR / f"wkr{token}"
                self.base.mkdir(parents=True)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.management = management
        self.http_port: int | None = free_port() if management else None
        if management:
            plugins = _with_management(plugins)
        self._config, self._plugins, self._files = config, plugins, files
        self._write_files()

    @property
    def management_url(self) -> str | None:
        """``http://guest:guest@127.0.0.1:<http_port>`` when the node has the plugin."""
        if not self.management:
            return None
        return f"http://guest:guest@127.0.0.1:{self.http_port}"

    def inner(self, path: Path) -> str:
        """``path`` as the node sees it (inside its root, if it has one)."""
        if self.root is None:
            return str(path)
        return "/" + str(path.relative_to(self.root))

    # -- setup -------------------------------------------------------------------------------

    def _write_files(self) -> None:
        (self.base / "mnesia").mkdir()
        (self.base / "log").mkdir()
        (self.base / "enabled_plugins").write_text(self._plugins + "\n")
        for source in self._files:
            shutil.copy(source, self.base / source.name)
        (self.base / "env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        lines = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            "loopback_users = none",
            # Fault scenarios count reconnects; a 2 s check makes alarms react quickly.
            "vm_memory_high_watermark.relative = 0.8",
            "disk_free_limit.absolute = 1MB",
        ]
        if self.tls is not None:
            if self.root is not None:
                self._copy_tls_in()
            lines += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {self._tls_files().ca}",
                f"ssl_options.certfile = {self._tls_files().cert}",
                f"ssl_options.keyfile = {self._tls_files().key}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        if self._config is not None:
            lines = self._config(self)
        if self.management:
            lines += ["management.tcp.ip = 127.0.0.1", f"management.tcp.port = {self.http_port}"]
        (self.base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        uid, gid = _ids(self.root, "rabbitmq")
        os.chown(self.base, uid, gid)
        for path in self.base.rglob("*"):
            os.chown(path, uid, gid)
        self.base.chmod(0o755)

    def _copy_tls_in(self) -> None:
        """A chrooted node cannot read host paths: its certificates are copied into its folder."""
        assert self.tls is not None
        tls_dir = self.base / "tls"
        tls_dir.mkdir()
        files = {}
        for name in ("ca", "cert", "key"):
            source = Path(getattr(self.tls, name))
            shutil.copy(source, tls_dir / source.name)
            files[name] = self.inner(tls_dir / source.name)
        self._node_tls = TlsFiles(**files)

    def _tls_files(self) -> TlsFiles:
        assert self.tls is not None
        return self._node_tls if self.root is not None else self.tls

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin" if self.root else os.environ["PATH"],
            "HOME": "/var/lib/rabbitmq",
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": self.inner(self.base / "env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": self.inner(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": self.inner(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": self.inner(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": self.inner(self.base / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": self.inner(self.base / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        return env

    def _command(self, *args: str, env: dict[str, str]) -> list[str]:
        """``args`` run with exactly ``env``: in the root (as root; the Debian wrapper switches to
        the rabbitmq user itself), or on the host as the rabbitmq user."""
        assignments = [f"{k}={v}" for k, v in env.items()]
        if self.root is None:
            return ["runuser", "-u", "rabbitmq", "--", "env", "-i", *assignments, *args]
        return ["chroot", str(self.root), "env", "-i", *assignments, *args]

    def _mount_proc(self) -> None:
        assert self.root is not None
        with _root_lock(self.root):
            if not _proc_mounted(self.root):
                subprocess.run(
                    ["mount", "-t", "proc", "proc", str(self.root / "proc")],
                    check=True,
                    capture_output=True,
                )

    def _release_root(self) -> None:
        """Delete this node's folder; unmount /proc when no node of the root is left."""
        assert self.root is not None
        with _root_lock(self.root):
            shutil.rmtree(self.base, ignore_errors=True)
            nodes = self.root / NODES_DIR
            if not any(nodes.iterdir()) and _proc_mounted(self.root):
                subprocess.run(["umount", str(self.root / "proc")], check=False)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Boot the node and wait (with a deadline) until it accepts AMQP connections."""
        if self.root is not None:
            self._mount_proc()
            shutil.copy("/etc/hosts", self.root / "etc" / "hosts")  # else nxdomain for localhost
        server = "/usr/sbin/rabbitmq-server" if self.root else "rabbitmq-server"
        result = subprocess.run(
            self._command(server, "-detached", env=self._env()),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{self.node} ({self.version}) did not start: {result.stderr}")
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
        if self.management:
            self.wait_management(max(5.0, deadline - time.monotonic()))

    def wait_management(self, deadline_s: float = 30.0) -> None:
        """The management API answers /api/overview and lists this node's AMQP port."""
        assert self.management_url is not None
        deadline = time.monotonic() + deadline_s
        while not management_serves(self.url, self.management_url):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.node}: no management API on port {self.http_port} within"
                    f" {deadline_s}s\n{self.log_tail()}"
                )
            time.sleep(0.2)

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
        if self.root is None:
            shutil.rmtree(self.base, ignore_errors=True)
            return
        # The node's own epmd outlives it (and `epmd -kill` refuses while a name is still
        # registered): every process left in the root with this node's epmd port goes.
        for pid in self._own_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self._release_root()

    def _own_processes(self) -> list[int]:
        """Processes chrooted into this root whose environment names this node's epmd port:
        the node, its epmd and their helpers, never anything another node or anyone started."""
        assert self.root is not None
        root, mark = str(self.root.resolve()), f"ERL_EPMD_PORT={self.epmd_port}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == root and mark in (
                    (entry / "environ").read_bytes().split(b"\0")
                ):
                    found.append(int(entry.name))
        return found

    def _ctl_env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/var/lib/rabbitmq",
            "LANG": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port),
        }

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
        return self.cli("rabbitmqctl", *args, check=check, timeout=timeout)

    def cli(
        self, tool: str, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``tool`` (rabbitmqctl, rabbitmq-queues, ...) against this node: the host's for 3.10,
        the root's for 4.x (its own version, epmd port and cookie)."""
        if self.root is None:
            command = [tool, "-n", self.node, *args]
            env: dict[str, str] | None = {**os.environ, "HOME": "/var/lib/rabbitmq"}
        else:
            command = self._command(
                f"/usr/sbin/{tool}", "-n", self.node, *args, env=self._ctl_env()
            )
            env = None
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def log_tail(self, lines: int = 20) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        if not logs:
            return ""
        return "\n".join(logs[0].read_text(errors="replace").splitlines()[-lines:])
