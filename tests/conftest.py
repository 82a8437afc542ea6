"""Shared fixtures: where the broker is, unique names per test, and a runner in the background.

The broker comes from ``WORKERKIT_TEST_URL``; else, when ``WORKERKIT_TEST_BROKER`` is 4.0 or 4.3,
a private node of that version for the session (tests/reliability/broker.py, started from a
Debian root built when missing); else (3.10, the default) a broker listening on localhost:5672,
else a testcontainers RabbitMQ where Docker exists. In CI (``CI`` set) a missing broker fails
the run; never a silent skip. The broker under test is named in pytest's header.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workerkit.settings import Settings

sys.path.insert(0, str(Path(__file__).parent / "reliability"))

from broker import (
    PrivateBroker,
    describe,
    session_management_url,
    set_session_node,
    version_under_test,
)

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _wait_amqp(url: str, deadline_s: float = 60.0) -> None:
    """Readiness check with a deadline: a real AMQP handshake, not only an open port."""
    import time

    import pika

    deadline = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            pika.BlockingConnection(pika.URLParameters(url)).close()
            return
        except Exception as exc:  # the broker may still be booting
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"broker at {url} not ready within {deadline_s}s: {last}")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("workerkit chaos soak (tests/reliability/test_chaos.py)")
    group.addoption("--chaos-seconds", type=float, default=90.0, help="fault phase length (s)")
    group.addoption("--chaos-seed", type=int, default=None, help="replay a seed (default random)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: the seeded chaos soak (timeout: --chaos-seconds)")


def pytest_report_header(config: pytest.Config) -> str:
    if os.environ.get("WORKERKIT_TEST_URL"):
        return f"broker: WORKERKIT_TEST_URL (private nodes: {describe(version_under_test())})"
    return (
        f"broker: {describe(version_under_test())} (WORKERKIT_TEST_BROKER={version_under_test()})"
    )


@pytest.fixture(scope="session")
def broker_version() -> str:
    """The RabbitMQ version under test ("3.10", "4.0" or "4.3")."""
    return version_under_test()


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    url = os.environ.get("WORKERKIT_TEST_URL")
    if url:
        _wait_amqp(url)
        yield url
        return
    if version_under_test() != "3.10":
        # With the management plugin on a port of its own (+0-1.5 s of boot), so that the
        # management-API paths (workerkit status, topology --check) run on 4.x too.
        node = PrivateBroker(management=True)
        node.start()
        set_session_node(node)  # rabbitmqctl-based helpers look at this node
        try:
            yield node.url
        finally:
            set_session_node(None)
            node.stop()
        return
    if _listening("127.0.0.1", 5672):
        _wait_amqp(LOCAL_URL)
        yield LOCAL_URL
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.10-management")
        container.start()
    except Exception as exc:
        message = (
            "no RabbitMQ for the integration tests (no WORKERKIT_TEST_URL, nothing on"
            f" localhost:5672, testcontainers failed: {exc})"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5672)
        url = f"amqp://guest:guest@{host}:{port}/"
        _wait_amqp(url)
        yield url
    finally:
        container.stop()


@pytest.fixture
def settings(broker_url: str) -> Settings:
    """Settings for tests. Tests share one exchange (and so one delay layout); each test keeps
    to itself by using ``unique`` queue names and routing keys. ``management_url`` is the
    session node's API on 4.x runs; on 3.10 it stays unset: the API derived from the URL (the
    host node's port 15672) is the broker's own."""
    management = session_management_url()
    return Settings(
        url=broker_url,
        **({"management_url": management} if management else {}),
        exchange="wkt",
        shutdown_grace=5.0,
        publish_timeout=5.0,
        connect_timeout=5.0,
        reconnect_max_delay=1.0,
    )


@pytest.fixture
def unique() -> Callable[[str], str]:
    """unique("orders") -> "t.orders.1a2b3c4d": queue names no other test uses."""
    token = uuid.uuid4().hex[:8]
    return lambda name: f"t.{name}.{token}"
