"""Request/reply, caller side, against the real broker: Publisher.request and
AsyncPublisher.request over direct reply-to, with the worker side answering."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import session_ctl
from pydantic import BaseModel

from workerkit import (
    AsyncPublisher,
    ConnectionFailed,
    Message,
    Publisher,
    PublishNacked,
    Reject,
    RemoteError,
    RequestTimeout,
    RetryPolicy,
    Runner,
    Settings,
    Unroutable,
    Worker,
)
from workerkit.errors import DecodeError
from workerkit.middleware import Middleware
from workerkit.testing import running, wait_for

from .workers_fixture import STARTED, consumer_count, delete_queues

pytestmark = pytest.mark.integration


class Quote(BaseModel):
    sku: str
    price: int


@pytest.fixture
def cleanup(settings: Settings) -> Iterator[list[str]]:
    queues: list[str] = []
    yield queues
    delete_queues(settings.url.get_secret_value(), *queues, *(f"{q}.dlq" for q in queues))


def _runner(settings: Settings, *workers: type[Worker]) -> Runner:
    return Runner(list(workers), settings=settings, handle_signals=False)


def _pricing(q: str) -> type[Worker]:
    class Pricing(Worker):
        queue = q
        retry = RetryPolicy(max_attempts=2, delay=0.05)

        async def handle(self, body: dict[str, Any]) -> Any:
            kind = body.get("kind", "quote")
            if kind == "reject":
                raise Reject(f"unknown sku {body['sku']}")
            if kind == "boom":
                raise RuntimeError("pricing backend down")
            if kind == "slow":
                await asyncio.sleep(body["seconds"])
            if kind == "text":
                return "plain"
            if kind == "none":
                return None
            return {"sku": body["sku"], "price": len(body["sku"]) * 10}

    return Pricing


async def test_async_request_reply_typed_and_untyped(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("quote")
    cleanup.append(q)
    async with running(_runner(settings, _pricing(q))), AsyncPublisher(settings=settings) as pub:
        assert await pub.request(q, {"sku": "A1"}, timeout=5) == {"sku": "A1", "price": 20}
        quote = await pub.request(q, {"sku": "ABC"}, timeout=5, reply_type=Quote)
        assert quote == Quote(sku="ABC", price=30)
        assert await pub.request(q, {"kind": "text", "sku": "x"}, timeout=5) == "plain"
        # An empty reply: None where the type admits it, a DecodeError where it does not.
        none = {"kind": "none", "sku": "n"}
        assert await pub.request(q, none, timeout=5) is None
        assert await pub.request(q, none, timeout=5, reply_type=Quote | None) is None
        with pytest.raises(DecodeError, match="empty reply"):
            await pub.request(q, none, timeout=5, reply_type=Quote)
        with pytest.raises(DecodeError):
            await pub.request(q, {"kind": "text", "sku": "x"}, timeout=5, reply_type=Quote)
        # many tasks at once share the one reply consumer, each gets its own answer
        skus = [f"S{'x' * i}" for i in range(40)]
        answers = await asyncio.gather(*(pub.request(q, {"sku": s}, timeout=10) for s in skus))
        assert answers == [{"sku": s, "price": len(s) * 10} for s in skus]


async def test_remote_errors_arrive_well_before_the_timeout(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("failing")
    cleanup.append(q)
    async with running(_runner(settings, _pricing(q))), AsyncPublisher(settings=settings) as pub:
        started = time.monotonic()
        with pytest.raises(RemoteError) as rejected:
            await pub.request(q, {"kind": "reject", "sku": "Z9"}, timeout=20)
        assert rejected.value.type == "workerkit.errors.Reject"
        assert rejected.value.reason == "rejected"
        assert "Z9" in rejected.value.message
        assert rejected.value.request_id
        with pytest.raises(RemoteError) as exhausted:
            await pub.request(q, {"kind": "boom", "sku": "Z9"}, timeout=20)
        assert exhausted.value.reason == "exhausted"
        assert exhausted.value.type == "builtins.RuntimeError"
        with pytest.raises(RemoteError) as invalid:
            await pub.request(q, "not json", timeout=20)
        assert invalid.value.reason == "invalid"
        assert time.monotonic() - started < 10, "error replies must not wait for the timeout"


async def test_sync_requests_from_16_threads_share_one_publisher(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("threads")
    cleanup.append(q)
    with Publisher(settings=settings) as pub:

        def ask(i: int) -> list[Any]:
            return [pub.request(q, {"sku": f"{i}-{n}"}, timeout=15) for n in range(25)]

        def ask_all() -> list[list[Any]]:
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                return list(pool.map(ask, range(16)))

        async with running(_runner(settings, _pricing(q))):
            results = await asyncio.to_thread(ask_all)
        for i, answers in enumerate(results):
            expected = [{"sku": f"{i}-{n}", "price": len(f"{i}-{n}") * 10} for n in range(25)]
            assert answers == expected
        core = pub._core
        assert core is not None and not core._requests  # nothing left pending
        assert pub.replies_dropped == 0


def test_unroutable_request_fails_at_once(settings: Settings, unique: Callable[[str], str]) -> None:
    with Publisher(settings=settings) as pub:
        started = time.monotonic()
        with pytest.raises(Unroutable):
            pub.request(unique("nobody"), {"sku": "A"}, timeout=10)
        assert time.monotonic() - started < 3
        assert pub._core is not None and not pub._core._requests


async def test_timeout_then_the_late_reply_is_dropped_and_counted(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("late")
    cleanup.append(q)
    async with running(_runner(settings, _pricing(q))):
        with Publisher(settings=settings) as pub:
            started = time.monotonic()
            with pytest.raises(RequestTimeout):
                await asyncio.to_thread(
                    pub.request, q, {"kind": "slow", "seconds": 1.5, "sku": "L"}, timeout=0.5
                )
            assert time.monotonic() - started < 1.4
            # The next request is answered with its own reply, never the late one.
            late = await asyncio.to_thread(pub.request, q, {"sku": "NEXT"}, timeout=10)
            assert late == {"sku": "NEXT", "price": 40}
            await wait_for(lambda: pub.replies_dropped == 1, 10, "the late reply dropped")
            assert pub._core is not None and not pub._core._requests


def _close_connections(name: str) -> int:
    """Close, from the broker's side, the connections named ``name`` (this test's own), on the
    broker under test (the session's private node on 4.x)."""
    out = session_ctl("-q", "list_connections", "pid", "client_properties")
    closed = 0
    for line in out.stdout.splitlines():
        if f'"{name}"' in line:
            pid = line.split("\t", 1)[0]
            session_ctl("close_connection", pid, "test: caller connection killed")
            closed += 1
    return closed


async def test_killed_caller_connection_fails_pending_requests_then_new_ones_work(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("killed")
    cleanup.append(q)
    name = unique("caller")
    async with running(_runner(settings, _pricing(q))):
        with Publisher(settings=settings) as pub:
            core, _ = pub._ensure()
            core.connection_name = name  # so that the test closes its own connection only
            warm = await asyncio.to_thread(pub.request, q, {"sku": "warm"}, timeout=10)
            assert warm == {"sku": "warm", "price": 40}
            pending = asyncio.ensure_future(
                asyncio.to_thread(
                    pub.request, q, {"kind": "slow", "seconds": 3, "sku": "P"}, timeout=20
                )
            )
            await wait_for(lambda: bool(core._requests), 5, "the request pending")
            started = time.monotonic()
            assert await asyncio.to_thread(_close_connections, name) == 1
            with pytest.raises(ConnectionFailed, match="lost while waiting for the reply"):
                await pending
            assert time.monotonic() - started < 10
            # A new request reconnects and is answered.
            after = await asyncio.to_thread(pub.request, q, {"sku": "after"}, timeout=15)
            assert after == {"sku": "after", "price": 50}


class Recording(Middleware):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def before_publish(self, outgoing: Any) -> None:
        outgoing.headers["x-traced"] = "yes"
        self.seen.append(("before", outgoing.routing_key))

    def after_publish(self, outgoing: Any, outcome: str, duration: float) -> None:
        self.seen.append((outcome, outgoing.routing_key))


async def test_publish_hooks_apply_to_requests(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("hooks")
    cleanup.append(q)
    headers: list[Any] = []

    class Echo(Worker):
        queue = q

        async def handle(self, body: dict[str, Any], message: Message) -> dict[str, Any]:
            headers.append(message.headers.get("x-traced"))
            return body

    hooks = Recording()
    publisher = AsyncPublisher(settings=settings, middleware=[hooks])
    async with running(_runner(settings, Echo)), publisher as pub:
        assert await pub.request(q, {"a": 1}, timeout=5) == {"a": 1}
    assert headers == ["yes"]
    assert hooks.seen[0] == ("before", q) and hooks.seen[1][1] == q and len(hooks.seen) == 2


async def _invoke(settings: Settings, *args: str) -> Any:
    from click.testing import CliRunner

    from workerkit.cli import cli

    env = {"WORKERKIT_URL": settings.url.get_secret_value(), "WORKERKIT_EXCHANGE": "wkt"}
    return await asyncio.to_thread(CliRunner(env=env).invoke, cli, list(args))


async def test_cli_request_prints_the_reply_with_documented_exit_codes(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("clireq")
    cleanup.append(q)
    async with running(_runner(settings, _pricing(q))):
        done = await _invoke(settings, "request", q, '{"sku": "A1"}', "--timeout", "5")
        assert done.exit_code == 0, done.output
        assert done.stdout == '{\n  "sku": "A1",\n  "price": 20\n}\n'
        done = await _invoke(settings, "request", q, '{"sku": "A1"}', "--raw")
        assert done.exit_code == 0 and done.stdout == '{"sku":"A1","price":20}'
        for raw in ((), ("--raw",)):  # an empty reply (the handler returned None): nothing
            done = await _invoke(settings, "request", q, '{"kind": "none", "sku": "N"}', *raw)
            assert done.exit_code == 0 and done.stdout == "", done.output
        done = await _invoke(settings, "request", q, '{"kind": "reject", "sku": "Q"}')
        assert done.exit_code == 1
        assert "workerkit: error: the worker gave up on the request" in done.stderr
        assert "workerkit.errors.Reject" in done.stderr and "rejected" in done.stderr
        slow = '{"kind": "slow", "seconds": 2, "sku": "S"}'
        done = await _invoke(settings, "request", q, slow, "--timeout", "0.3")
        assert done.exit_code == 5 and "no reply within 0.3s" in done.stderr
    done = await _invoke(settings, "request", unique("nobody"), "{}", "--timeout", "5")
    assert done.exit_code == 1 and "no queue is bound" in done.stderr
    # Never sent is not "no reply": an unreachable broker fails like `publish` does.
    down = "amqp://guest:guest@127.0.0.1:1/"
    done = await _invoke(settings, "request", q, "{}", "--timeout", "1", "--url", down)
    assert done.exit_code == 1, done.output
    assert "could not publish the request within 1.0s" in done.stderr
    assert "connection refused" in done.stderr and "guest" not in done.stderr


def _consumers(url: str, queue: str) -> int:
    try:
        return consumer_count(url, queue)
    except Exception:  # not declared yet
        return 0


def _start_echo(q: str, settings: Settings, sleep: float) -> subprocess.Popen[str]:
    script = Path(__file__).with_name("caller_worker.py")
    url = settings.url.get_secret_value()
    proc = subprocess.Popen(
        [sys.executable, str(script), q, url, settings.exchange, str(sleep)],
        stdout=subprocess.PIPE,
        text=True,
    )
    STARTED.append(proc)
    return proc


async def test_worker_killed_mid_request_the_retry_answers_each_caller_its_own(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("killmid")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    first = _start_echo(q, settings, sleep=30)  # would answer far too late
    assert first.stdout is not None
    second: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(_consumers, url, q) < 1:
            assert first.poll() is None and time.monotonic() < deadline, "no worker"
            await asyncio.sleep(0.1)
        with Publisher(settings=settings) as pub:
            asks = [
                asyncio.ensure_future(asyncio.to_thread(pub.request, q, f"r{i}", timeout=40))
                for i in range(3)
            ]
            started: list[str] = []
            while len(started) < 3:  # every request is inside a handler of the first process
                line = await asyncio.wait_for(asyncio.to_thread(first.stdout.readline), 20)
                assert line, "the first worker exited early"
                started.append(line.split()[1])
            first.kill()  # kill -9: no ack, no reply; the broker redelivers the requests
            await asyncio.to_thread(first.wait, 10)
            second = _start_echo(q, settings, sleep=0)
            replies = await asyncio.gather(*asks)
    finally:
        for proc in (first, second):  # also unblocks a readline still waiting
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert sorted(started) == ["r0", "r1", "r2"]
    assert [r["echo"] for r in replies] == ["r0", "r1", "r2"]
    assert second is not None and {r["pid"] for r in replies} == {second.pid}


async def test_a_nack_on_the_request_channel_fails_waiting_requests_at_once(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    """A nacked publish retires the publisher's channel, and with it the reply consumer its
    waiting requests were sent through: they fail at once (ConnectionFailed), not at their
    timeout, and the next request opens a new channel and is answered."""
    q, full = unique("nackq"), unique("full")
    cleanup.extend([q, full])
    release = asyncio.Event()

    class Bounded(Worker):
        queue = full
        max_length = 1
        overflow = "reject-publish"
        prefetch = 1
        concurrency = 1

        async def handle(self, body: dict[str, Any]) -> None:
            await release.wait()

    publisher = AsyncPublisher(settings=settings)
    async with running(_runner(settings, _pricing(q), Bounded)), publisher as pub:
        core = pub._core
        pending = asyncio.ensure_future(
            pub.request(q, {"kind": "slow", "seconds": 3, "sku": "P"}, timeout=60)
        )
        await wait_for(lambda: any(r.confirmed for r in core._requests.values()), 10, "sent")
        started = time.monotonic()
        refused: PublishNacked | None = None
        try:
            for n in range(10):  # 1 delivered, 1 ready, then the queue is full
                try:
                    await pub.publish(full, {"n": n}, timeout=10)
                except PublishNacked as exc:
                    refused = exc
                    break
            assert refused is not None, "a full queue accepted 10 publishes"
            with pytest.raises(ConnectionFailed, match="may or may not have been handled"):
                await pending
            assert time.monotonic() - started < 2.5  # before the worker would even reply
            answer = await pub.request(q, {"sku": "after"}, timeout=15)
            assert answer == {"sku": "after", "price": 50}
        finally:
            release.set()
