"""The pytest plugin for testing your own workers (registered with pytest's ``pytest11`` entry
point: installing workerkit is enough, no conftest needed).

Fixtures:

* ``workerkit_broker`` - the test's broker (:class:`workerkit.testing.BrokerHarness`): the
  in-memory one by default, RabbitMQ when asked (``--workerkit-broker``, the
  ``workerkit_broker`` ini option or ``@pytest.mark.workerkit(broker=...)``; ``both`` runs the
  test once on each);
* ``publisher`` / ``async_publisher`` - publishers bound to that broker;
* ``memory_broker`` - the test's in-memory broker; ``workerkit_url`` - the real broker's URL;
* ``workerkit_settings`` - the settings the others start from (override it in a conftest).

The real broker is ``WORKERKIT_TEST_URL``, else one listening on localhost:5672, else a throwaway
RabbitMQ from testcontainers where Docker runs, else the test fails saying so (it is skipped
instead with ``--workerkit-skip-without-broker`` or the ini option of that name).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from .errors import AccessRefused
from .publisher import AsyncPublisher, Publisher
from .settings import Settings, redact_url
from .testing import BrokerHarness, LoopThread, delete_layout
from .transport.memory import MemoryBroker

__all__ = ["BROKERS", "LOCAL_URL"]

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
BROKERS = ("memory", "rabbitmq", "both")
RABBITMQ_IMAGE = "rabbitmq:4.3-management"  # a supported release (docs/brokers.md)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("workerkit")
    group.addoption(
        "--workerkit-broker",
        choices=BROKERS,
        default=None,
        help="broker for the workerkit_broker fixture: memory (default), rabbitmq or both",
    )
    group.addoption(
        "--workerkit-skip-without-broker",
        action="store_true",
        default=None,
        help="skip (instead of fail) tests that need RabbitMQ when none can be found",
    )
    parser.addini("workerkit_broker", "memory (default), rabbitmq or both", default="memory")
    parser.addini(
        "workerkit_broker_wait",
        "seconds to wait for WORKERKIT_TEST_URL's broker to accept a connection (default 10)",
        default="10",
    )
    parser.addini(
        "workerkit_skip_without_broker",
        "skip (instead of fail) tests that need RabbitMQ when none is found",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "workerkit(broker): run this test's workerkit_broker on 'memory', 'rabbitmq' or 'both'",
    )


def _chosen_broker(config: pytest.Config, node: Any) -> str:
    marker = node.get_closest_marker("workerkit") if node is not None else None
    if marker is not None:
        choice = marker.kwargs.get("broker", marker.args[0] if marker.args else None)
        if choice is not None:
            return _valid(str(choice), "the workerkit marker")
    option = config.getoption("--workerkit-broker")
    if option:
        return str(option)
    return _valid(str(config.getini("workerkit_broker")), "the workerkit_broker ini option")


def _valid(choice: str, where: str) -> str:
    if choice not in BROKERS:
        raise pytest.UsageError(
            f"{where}: broker must be one of {', '.join(BROKERS)}, not {choice!r}"
        )
    return choice


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "workerkit_broker" not in metafunc.fixturenames:
        return
    choice = _chosen_broker(metafunc.config, metafunc.definition)
    kinds = ["memory", "rabbitmq"] if choice == "both" else [choice]
    metafunc.parametrize("workerkit_broker", kinds, indirect=True, ids=kinds)


# -- the real broker ---------------------------------------------------------------------------


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _wait_amqp(url: str, deadline_s: float = 60.0) -> None:
    """A real AMQP handshake within the deadline, not only an open port."""
    settings = Settings(url=url, connect_timeout=min(5.0, max(deadline_s, 0.5)))
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            asyncio.run(_handshake(settings))
            return
        except AccessRefused as exc:  # waiting cannot fix credentials or permissions
            raise RuntimeError(f"{redact_url(url)} refused the connection: {exc}") from None
        except Exception as exc:  # still booting: say why at the end
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no AMQP handshake with {redact_url(url)} within {deadline_s}s: {exc}"
                ) from None
            time.sleep(0.5)


async def _handshake(settings: Settings) -> None:
    from .transport import default_transport

    connection = await default_transport().connect(
        settings, name="workerkit-pytest", on_lost=lambda _e: None
    )
    await connection.close()


def _no_broker(config: pytest.Config, why: str) -> None:
    skip = config.getoption("--workerkit-skip-without-broker") or config.getini(
        "workerkit_skip_without_broker"
    )
    if why.startswith("WORKERKIT_TEST_URL"):
        advice = "Check WORKERKIT_TEST_URL (its broker, credentials and vhost)"
    else:
        advice = (
            "Set WORKERKIT_TEST_URL=amqp://..., run a broker on localhost:5672, or install"
            " Docker and testcontainers (pip install 'workerkit[testing]')"
        )
    message = f"workerkit: no RabbitMQ for this test ({why}). {advice}"
    if skip:
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def workerkit_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """The URL of a real RabbitMQ for this session (see the module docstring for the order)."""
    # A test-harness variable, like the suite's own WORKERKIT_TEST_*: not a workerkit setting.
    url = os.environ.get("WORKERKIT_TEST_URL")
    if url:
        try:
            _wait_amqp(url, float(pytestconfig.getini("workerkit_broker_wait")))
        except RuntimeError as exc:
            _no_broker(pytestconfig, f"WORKERKIT_TEST_URL: {exc}")
        yield url
        return
    if _listening("127.0.0.1", 5672):
        _wait_amqp(LOCAL_URL, 30)
        yield LOCAL_URL
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer(RABBITMQ_IMAGE)
        container.start()
    except Exception as exc:  # no testcontainers, no Docker, no image: all mean "no broker"
        _no_broker(
            pytestconfig,
            f"no WORKERKIT_TEST_URL, nothing on localhost:5672, testcontainers: {exc}",
        )
    try:
        host = container.get_container_host_ip()
        url = f"amqp://guest:guest@{host}:{container.get_exposed_port(5672)}/"
        _wait_amqp(url)
        yield url
    finally:
        container.stop()


class _Session:
    """This session's exchange on the real broker (one per pytest process, so parallel runs
    keep apart); its delay layout is deleted when the session ends."""

    def __init__(self) -> None:
        self.exchange = f"wkt.{uuid.uuid4().hex[:8]}"
        self.used: dict[str, Settings] = {}  # url -> settings that declared on it


@pytest.fixture(scope="session")
def _workerkit_session() -> Iterator[_Session]:
    session = _Session()
    yield session
    for settings in session.used.values():
        try:
            asyncio.run(delete_layout(settings))
        except Exception as exc:  # the broker may be gone already; say so, do not fail
            warnings.warn(f"workerkit: could not delete {session.exchange!r}: {exc}", stacklevel=1)


# -- per test ----------------------------------------------------------------------------------


@pytest.fixture
def workerkit_settings() -> Settings:
    """Settings the test's broker starts from; the URL and exchange are set per test.

    Short timeouts so that a broken test fails in seconds; override in your conftest.
    """
    return Settings(
        shutdown_grace=5.0,
        publish_timeout=5.0,
        connect_timeout=5.0,
        reconnect_max_delay=1.0,
    )


@pytest.fixture
def _workerkit_loop() -> Iterator[Any]:
    """A background event loop, started on first use (the memory broker's home, and where a
    sync test's workers run)."""
    threads: list[LoopThread] = []

    def get() -> LoopThread:
        if not threads:
            threads.append(LoopThread())
        return threads[0]

    yield get
    for thread in threads:
        thread.stop()


@pytest.fixture
def memory_broker(_workerkit_loop: Any) -> MemoryBroker:
    """A fresh in-memory broker, living on a background event loop of its own."""
    broker = MemoryBroker()
    broker.bind_loop(_workerkit_loop().loop)
    return broker


@pytest.fixture
def workerkit_broker(
    request: pytest.FixtureRequest,
    workerkit_settings: Settings,
    _workerkit_loop: Any,
) -> Iterator[BrokerHarness]:
    """The broker this test runs its workers on (memory unless asked otherwise)."""
    kind = getattr(request, "param", None) or _chosen_broker(request.config, request.node)
    if kind == "both":
        kind = "memory"  # parametrized by pytest_generate_tests; here only when used indirectly
    token = uuid.uuid4().hex[:8]
    if kind == "memory":
        settings = _with(workerkit_settings, exchange=f"wkt.{token}")
        harness = BrokerHarness(
            "memory",
            settings,
            memory=request.getfixturevalue("memory_broker"),
            loop_thread=_workerkit_loop,
        )
    else:
        url = request.getfixturevalue("workerkit_url")
        session: _Session = request.getfixturevalue("_workerkit_session")
        settings = _with(workerkit_settings, url=url, exchange=session.exchange)
        session.used.setdefault(url, settings)
        harness = BrokerHarness(
            "rabbitmq", settings, prefix=f"t{token}.", loop_thread=_workerkit_loop
        )
    yield harness
    harness.close()


def _with(settings: Settings, **changes: Any) -> Settings:
    values = settings.model_dump()
    values.update(changes)
    return type(settings)(**values)


@pytest.fixture
def publisher(workerkit_broker: BrokerHarness) -> Publisher:
    """A sync Publisher bound to ``workerkit_broker`` (closed after the test)."""
    return workerkit_broker.publisher()


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the test extra installs it
    pass
else:

    @pytest_asyncio.fixture
    async def async_publisher(workerkit_broker: BrokerHarness) -> AsyncIterator[AsyncPublisher]:
        """An AsyncPublisher bound to ``workerkit_broker``, connected (needs pytest-asyncio)."""
        async with workerkit_broker.async_publisher() as pub:
            yield pub
