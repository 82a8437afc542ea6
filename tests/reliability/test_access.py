"""Refused credentials and permissions: one clear fatal error, no reconnect storm.

A proxy in front of the private broker counts the TCP connections each client opens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker import PrivateBroker
from harness import EXCHANGE, WorkerProcess, wait_until
from proxy import Proxy

import workerkit

pytestmark = pytest.mark.reliability

# The runner opens a consume and a publish connection: at most these, never a retry loop.
MAX_ATTEMPTS = 2


@pytest.fixture
def user(private_broker: PrivateBroker) -> Iterator[Callable[[str | None], str]]:
    """user(permissions) -> name: a user with password "pw"; permissions None means no vhost."""
    made: list[str] = []

    def make(permissions: str | None) -> str:
        name = f"wkr-{uuid.uuid4().hex[:6]}"
        private_broker.ctl("add_user", name, "pw")
        if permissions is not None:
            private_broker.ctl("set_permissions", "-p", "/", name, *[permissions] * 3)
        made.append(name)
        return name

    yield make
    for name in made:
        private_broker.ctl("delete_user", name, check=False)


def assert_fatal(worker: WorkerProcess, proxy: Proxy, expect: str) -> None:
    wait_until(lambda: worker.proc.poll() is not None, 30, "the worker to give up")
    output = worker.output()
    assert worker.proc.returncode not in (0, None), output
    assert expect in output, output
    assert "Traceback" not in output or "AccessRefused" in output, output
    assert proxy.accepted <= MAX_ATTEMPTS, f"{proxy.accepted} connection attempts"


def test_worker_with_wrong_password_stops_with_one_error(
    proxy: Proxy, workers: Callable[..., WorkerProcess], unique: Callable[[str], str]
) -> None:
    worker = workers(unique("badpw"), proxy.url("guest", "wrong"))
    assert_fatal(worker, proxy, "refused")


def test_worker_without_vhost_access_stops_with_one_error(
    proxy: Proxy,
    workers: Callable[..., WorkerProcess],
    user: Callable[[str | None], str],
    unique: Callable[[str], str],
) -> None:
    worker = workers(unique("novhost"), proxy.url(user(None), "pw"))
    assert_fatal(worker, proxy, "refused")


def test_worker_without_permissions_stops_with_one_error(
    proxy: Proxy,
    workers: Callable[..., WorkerProcess],
    user: Callable[[str | None], str],
    unique: Callable[[str], str],
) -> None:
    worker = workers(unique("noperm"), proxy.url(user("^$"), "pw"))
    assert_fatal(worker, proxy, "refused")


def test_publisher_with_wrong_password_raises_access_refused_at_once(proxy: Proxy) -> None:
    settings = workerkit.Settings(
        url=proxy.url("guest", "wrong"),
        exchange=EXCHANGE,
        publish_timeout=5.0,
    )
    publisher = workerkit.Publisher(settings=settings)
    try:
        with pytest.raises(workerkit.AccessRefused):
            publisher.publish("anything", {"n": 1})
    finally:
        publisher.close()
    assert proxy.accepted == 1, f"{proxy.accepted} connection attempts for one publish"


def test_a_publisher_without_permissions_fails_cleanly_without_naming_the_user(
    proxy: Proxy, user: Callable[[str | None], str], tmp_path: Path
) -> None:
    """A script's module-level Publisher, never closed, refused the configure permission: one
    AccessRefused without the user's name (the broker quotes it), and nothing left pending for
    the interpreter to report at exit ("Task was destroyed but it is pending")."""
    name = user("^$")
    script = tmp_path / "publish.py"
    script.write_text(
        "import workerkit\n"
        f"settings = workerkit.Settings(url={proxy.url(name, 'pw')!r}, exchange={EXCHANGE!r})\n"
        "publisher = workerkit.Publisher(settings=settings)\n"
        "try:\n"
        "    publisher.publish('anything', {'n': 1})\n"
        "except workerkit.AccessRefused as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "refused: " in done.stdout, output
    assert "permission refused" in output and name not in output, output
    assert "Task was destroyed" not in output and "Traceback" not in output, output
