"""DLQ tooling against the real broker: list, show, replay and purge, from Python and the CLI."""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import orjson
import pika
import pytest
from click.testing import CliRunner

from workerkit import Message, Reject, RetryPolicy, Runner, Settings, Worker, dlq
from workerkit.cli import cli
from workerkit.errors import PublishError, TopologyError
from workerkit.message import Header
from workerkit.testing import running, wait_for

from .workers_fixture import (
    declare_raw,
    get_all,
    publish_many_raw,
    publish_raw,
    ready_count,
)

pytestmark = pytest.mark.integration


def _env(settings: Settings) -> dict[str, str]:
    return {"WORKERKIT_URL": settings.url.get_secret_value(), "WORKERKIT_EXCHANGE": "wkt"}


async def _cli(settings: Settings, *args: str, input: str | None = None) -> Any:
    """Invoke the CLI in a thread: it runs its own event loop, as it does in a shell."""
    runner = CliRunner(env=_env(settings))
    return await asyncio.to_thread(runner.invoke, cli, list(args), input=input)


class Switch:
    """Decides, per test, whether the worker rejects; records what it handled."""

    def __init__(self) -> None:
        self.reject = True
        self.handled: list[tuple[str | None, int, dict[str, Any]]] = []


def _worker(queue_name: str, switch: Switch) -> type[Worker]:
    class Flaky(Worker):
        queue = queue_name
        retry = RetryPolicy.none()

        async def handle(self, body: dict, message: Message) -> None:  # type: ignore[type-arg]
            if switch.reject:
                raise Reject(f"order {body['n']} is not valid")
            switch.handled.append((message.message_id, message.attempt, dict(message.headers)))

    return Flaky


async def _fill_dlq(settings: Settings, worker: type[Worker], count: int) -> list[str]:
    """Publish ``count`` messages and let a burst runner reject them all into the DLQ."""
    url = settings.url.get_secret_value()
    runner = Runner([worker], settings=settings, burst=True, handle_signals=False)
    # Run once first so that the queues exist before publishing.
    await asyncio.wait_for(runner.run(), 60)
    ids = [f"msg-{n:03d}" for n in range(count)]
    for n, message_id in enumerate(ids):
        await asyncio.to_thread(
            publish_raw,
            url,
            "wkt",
            worker.queue,
            orjson.dumps({"n": n}),
            message_id=message_id,
            headers={"tenant": "acme"},
        )
    runner = Runner([worker], settings=settings, burst=True, handle_signals=False)
    await asyncio.wait_for(runner.run(), 60)
    await _wait_ready(url, dlq.dlq_of(worker.queue), count)
    return ids


async def _wait_ready(url: str, queue: str, count: int, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (now := await asyncio.to_thread(ready_count, url, queue)) != count:
        assert loop.time() < deadline, f"{queue} has {now} messages, expected {count}"
        await asyncio.sleep(0.05)


async def test_list_shows_every_dead_message_in_order_and_removes_nothing(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("dlq-list")
    cleanup.append(q)
    ids = await _fill_dlq(settings, _worker(q, Switch()), 12)

    # Listing three times: a quorum DLQ that got its messages back in the wrong order (closing
    # the channel returns them reversed) would fail the second comparison.
    for _ in range(3):
        dead = await dlq.list_dead(q, settings=settings)
        assert [d.id for d in dead] == ids
    first = dead[0]
    assert first.reason == "rejected"
    assert first.error_type == "workerkit.errors.Reject"
    assert first.error_message == "order 0 is not valid"
    assert first.attempts == 1
    assert first.failed_at is not None and first.failed_at.endswith("Z")
    assert first.original_routing_key == q
    assert first.headers["tenant"] == "acme"
    assert "Traceback" in (first.traceback or "")
    assert await dlq.count(q, settings=settings) == 12

    limited = await dlq.list_dead(q, settings=settings, limit=5)
    assert [d.id for d in limited] == ids[:5]
    assert [d.id for d in await dlq.list_dead(q, settings=settings)] == ids

    result = await _cli(settings, "dlq", "list", q, "--limit", "10")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "REASON", "ERROR", "ATTEMPTS", "FAILED", "AT"]
    assert [line.split()[0] for line in lines[1:11]] == ids[:10]
    assert "Reject: order 0 is not valid" in lines[1]
    assert lines[-1] == f"12 message(s) in {q}.dlq (showing the first 10)"
    await _wait_ready(settings.url.get_secret_value(), f"{q}.dlq", 12)


async def test_show_prints_headers_traceback_and_body(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("dlq-show")
    cleanup.append(q)
    ids = await _fill_dlq(settings, _worker(q, Switch()), 2)

    result = await _cli(settings, "dlq", "show", q, ids[1])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"id:           {ids[1]}" in out
    assert "reason:       rejected" in out
    assert "error:        workerkit.errors.Reject: order 1 is not valid" in out
    assert "  tenant: 'acme'" in out
    assert f"  workerkit-queue: '{q}'" in out
    assert "  workerkit-attempt: 1\n" in out  # a plain int, not pika's AMQP long "1L"
    assert "L\n" not in out.split("traceback:")[0]
    assert "traceback:" in out and "raise Reject(" in out
    assert '"n": 1' in out

    missing = await _cli(settings, "dlq", "show", q, "no-such-id")
    assert missing.exit_code == 1
    assert missing.stderr.strip() == f"workerkit: error: no message with id 'no-such-id' in {q}.dlq"
    await _wait_ready(settings.url.get_secret_value(), f"{q}.dlq", 2)


async def test_replay_by_id_sends_a_fresh_first_attempt_back_and_conserves_the_count(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("dlq-replay")
    cleanup.append(q)
    switch = Switch()
    worker = _worker(q, switch)
    ids = await _fill_dlq(settings, worker, 5)
    url = settings.url.get_secret_value()

    result = await _cli(settings, "dlq", "replay", q, "--id", ids[1], "--id", ids[3])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"replayed 2 message(s) to {q}"
    await _wait_ready(url, q, 2)
    await _wait_ready(url, f"{q}.dlq", 3)

    switch.reject = False
    await asyncio.wait_for(Runner([worker], settings=settings, burst=True).run(), 60)
    assert sorted((m[0] for m in switch.handled), key=str) == [ids[1], ids[3]]
    for _message_id, attempt, headers in switch.handled:
        assert attempt == 1
        assert headers == {"tenant": "acme"}  # no workerkit-* failure or x-death headers
    remaining = [d.id for d in await dlq.list_dead(q, settings=settings)]
    assert remaining == [ids[0], ids[2], ids[4]]
    assert len(remaining) + len(switch.handled) == 5

    unknown = await _cli(settings, "dlq", "replay", q, "--id", "nope")
    assert unknown.exit_code == 1
    assert unknown.stdout.strip() == f"replayed 0 message(s) to {q}"
    assert unknown.stderr.strip() == f"workerkit: error: not in {q}.dlq: nope"


async def test_replay_all_moves_everything_once_even_if_it_fails_again(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("dlq-replay-all")
    cleanup.append(q)
    switch = Switch()
    worker = _worker(q, switch)
    ids = await _fill_dlq(settings, worker, 20)
    url = settings.url.get_secret_value()

    # A running worker rejects each replayed message straight back into the DLQ while replay is
    # still reading it: replay must stop at what was there when it started, not loop.
    runner = Runner([worker], settings=settings, handle_signals=False)
    async with running(runner):
        result = await dlq.replay(q, settings=settings)
        assert sorted(result.replayed) == ids
        assert result.not_found == []
        await _wait_ready(url, f"{q}.dlq", 20)
    assert await asyncio.to_thread(ready_count, url, q) == 0

    switch.reject = False
    result = await asyncio.to_thread(dlq.replay_sync, q, None, settings=settings)
    assert sorted(result.replayed) == ids
    await asyncio.wait_for(Runner([worker], settings=settings, burst=True).run(), 60)
    assert sorted((m[0] for m in switch.handled), key=str) == ids
    assert await asyncio.to_thread(ready_count, url, f"{q}.dlq") == 0


async def test_messages_dead_lettered_by_the_brokers_delivery_limit(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    """A message that keeps killing its worker is moved by the broker itself (quorum delivery
    limit): no workerkit headers, an x-death reason the tooling must understand."""
    q = unique("dlq-limit")
    cleanup.append(q)

    class Poison(Worker):
        queue = q
        delivery_limit = 1

        async def handle(self, body: dict) -> None:  # type: ignore[type-arg]
            raise AssertionError("never consumed in this test")

    await asyncio.wait_for(
        Runner([Poison], settings=settings, burst=True, handle_signals=False).run(), 60
    )
    url = settings.url.get_secret_value()
    await asyncio.to_thread(publish_raw, url, "wkt", q, b'{"n": 1}', message_id="poison-1")
    await asyncio.to_thread(_deliver_without_ack, url, q, 2)
    await _wait_ready(url, f"{q}.dlq", 1)

    (dead,) = await dlq.list_dead(q, settings=settings)
    assert (dead.id, dead.reason, dead.attempts) == ("poison-1", "delivery-limit", None)
    assert dead.original_routing_key == q
    assert dead.failed_at is not None
    result = await _cli(settings, "dlq", "list", q)
    assert result.stdout.splitlines()[1].split()[:3] == ["poison-1", "delivery-limit", "-"]


def _deliver_without_ack(url: str, queue: str, times: int) -> None:
    """What a crashing worker does to the broker: take the message, never ack it, and lose its
    connection. (Not basic.nack: from RabbitMQ 4.3 a nack is not a failed delivery.)"""
    for _ in range(times):
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            method, _props, _body = conn.channel().basic_get(queue)
            assert method is not None
        finally:
            conn.close()


async def test_purge_asks_first_and_refuses_without_a_terminal(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("dlq-purge")
    cleanup.append(q)
    await _fill_dlq(settings, _worker(q, Switch()), 4)
    url = settings.url.get_secret_value()

    counted = await _cli(settings, "dlq", "count", q)
    assert (counted.exit_code, counted.stdout) == (0, "4\n")
    refused = await _cli(settings, "dlq", "purge", q, input="y\n")
    assert refused.exit_code == 1
    assert "stdin is not a terminal; pass --yes" in refused.stderr
    assert await asyncio.to_thread(ready_count, url, f"{q}.dlq") == 4

    answer_no = await asyncio.to_thread(_purge_on_a_terminal, settings, q, "n")
    assert answer_no[0] == 1 and "Delete 4 message(s)" in answer_no[1]
    assert "workerkit: error: not purged" in answer_no[1] and "Aborted" not in answer_no[1]
    assert await asyncio.to_thread(ready_count, url, f"{q}.dlq") == 4

    answer_yes = await asyncio.to_thread(_purge_on_a_terminal, settings, q, "y")
    assert answer_yes[0] == 0 and f"purged 4 message(s) from {q}.dlq" in answer_yes[1]
    assert await asyncio.to_thread(ready_count, url, f"{q}.dlq") == 0
    assert (await _cli(settings, "dlq", "count", f"{q}.dlq")).stdout == "0\n"

    await _fill_dlq(settings, _worker(f"{q}x", Switch()), 0)  # a second, empty DLQ
    cleanup.append(f"{q}x")
    assert await dlq.purge(f"{q}x", settings=settings) == 0


def _purge_on_a_terminal(settings: Settings, queue: str, answer: str) -> tuple[int, str]:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workerkit", "dlq", "purge", queue],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, **_env(settings)},
        )
        os.close(slave)
        output = b""
        while b"[y/N]" not in output:
            chunk = os.read(master, 4096)
            assert chunk, output
            output += chunk
        os.write(master, answer.encode() + b"\n")
        code = proc.wait(timeout=30)
        try:
            while chunk := os.read(master, 4096):
                output += chunk
        except OSError:  # EIO once the child closed the terminal
            pass
        return code, output.decode()
    finally:
        os.close(master)


async def test_purge_with_yes_and_missing_queues(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("dlq-purge-yes")
    cleanup.append(q)
    await _fill_dlq(settings, _worker(q, Switch()), 3)

    result = await _cli(settings, "dlq", "purge", q, "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"purged 3 message(s) from {q}.dlq"
    assert await asyncio.to_thread(dlq.count_sync, q, settings=settings) == 0

    missing = unique("never-declared")
    listed = await _cli(settings, "dlq", "list", missing)
    assert listed.exit_code == 3
    assert listed.stderr.startswith(f"workerkit: error: queue '{missing}.dlq' does not exist")
    with pytest.raises(TopologyError):
        await dlq.replay(missing, settings=settings)


async def test_message_without_id_is_addressed_by_a_stable_hash(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("dlq-noid")
    cleanup.append(q)
    switch = Switch()
    worker = _worker(q, switch)
    await _fill_dlq(settings, worker, 0)
    url = settings.url.get_secret_value()
    headers = {
        Header.REASON: "invalid",
        Header.ERROR_TYPE: "workerkit.errors.DecodeError",
        Header.ERROR_MESSAGE: "body is not JSON",
        Header.ATTEMPT: 1,
    }
    await asyncio.to_thread(publish_raw, url, "", f"{q}.dlq", b'{"n": 9}', headers=headers)

    (dead,) = await dlq.list_dead(q, settings=settings)
    assert dead.id.startswith("h-") and dead.reason == "invalid"
    (again,) = await dlq.list_dead(q, settings=settings)  # its x-delivery-count changed
    assert again.id == dead.id
    switch.reject = False
    assert (await dlq.replay(q, [dead.id], settings=settings)).replayed == [dead.id]
    await asyncio.wait_for(Runner([worker], settings=settings, burst=True).run(), 60)
    await wait_for(lambda: len(switch.handled) == 1, what="the replayed message handled")
    assert switch.handled[0][0] == dead.id  # the stable hash became its id


async def test_back_to_back_commands_see_every_message_of_a_large_quorum_dlq(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    """A quorum queue applies returns asynchronously; a listing followed at once by a replay must
    still see all of them (without waiting for the returns, replay took 536 of 5,000)."""
    q = unique("dlq-big")
    cleanup.append(q)
    await _fill_dlq(settings, _worker(q, Switch()), 0)
    url = settings.url.get_secret_value()
    bodies = [orjson.dumps({"n": n}) for n in range(1500)]
    await asyncio.to_thread(publish_many_raw, url, "", f"{q}.dlq", bodies)
    await _wait_ready(url, f"{q}.dlq", 1500)

    first = await dlq.list_dead(q, settings=settings)
    second = await dlq.list_dead(q, settings=settings, limit=10)
    assert [d.body for d in first] == bodies
    assert [d.id for d in second] == [d.id for d in first[:10]]
    # Handed back twice by now: RabbitMQ shuffles a batch of more than 32 returns.
    assert [d.body for d in await dlq.list_dead(q, settings=settings)] == bodies
    result = await dlq.replay(q, settings=settings)
    assert result.replayed == [d.id for d in first]
    await _wait_ready(url, q, 1500)
    assert await asyncio.to_thread(ready_count, url, f"{q}.dlq") == 0
    assert [got.body for got in await asyncio.to_thread(get_all, url, q)] == bodies


async def test_a_copy_refused_mid_window_leaves_its_original_and_the_rest_in_order(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    """The work queue takes 5 copies and nacks the rest (reject-publish) while many are in
    flight: only the originals of confirmed copies may be acked, and the others stay in order."""
    q = unique("dlq-refused")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    quorum = {"x-queue-type": "quorum"}
    await asyncio.to_thread(declare_raw, url, f"{q}.dlq", quorum)
    # Classic: a quorum queue enforces its length limit only approximately.
    full_at_5 = {"x-max-length": 5, "x-overflow": "reject-publish"}
    await asyncio.to_thread(declare_raw, url, q, full_at_5)
    bodies = [orjson.dumps({"n": n}) for n in range(300)]
    await asyncio.to_thread(publish_many_raw, url, "", f"{q}.dlq", bodies)
    await _wait_ready(url, f"{q}.dlq", 300)
    ids = [d.id for d in await dlq.list_dead(q, settings=settings)]

    with pytest.raises(PublishError) as failed:
        await dlq.replay(q, settings=settings)
    assert f"replaying {ids[5]!r} to {q!r}: " in str(failed.value)
    assert f"(5 message(s) replayed; the rest are still in '{q}.dlq')" in str(failed.value)
    await _wait_ready(url, f"{q}.dlq", 295)
    assert [d.id for d in await dlq.list_dead(q, settings=settings)] == ids[5:]
    assert [got.body for got in await asyncio.to_thread(get_all, url, q)] == bodies[:5]


async def test_a_scheduled_message_no_queue_took_is_listed_as_unroutable_with_its_own_key(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    """It lands in <exchange>.unroutable out of a delay queue; the listing said "expired" and
    showed the delay layout's routing key (a new-user check)."""
    from workerkit import AsyncPublisher

    key, unroutable = unique("nobody") + ".due", f"{settings.exchange}.unroutable"
    async with AsyncPublisher(settings=settings) as publisher:
        sent = await publisher.publish(key, {"n": 1}, delay=0.1)

    async def ours() -> list[dlq.DeadLetter]:
        found = await dlq.list_dead(unroutable, settings=settings)
        return [dead for dead in found if dead.message_id == sent]

    deadline = asyncio.get_running_loop().time() + 15
    while not (found := await ours()):
        assert asyncio.get_running_loop().time() < deadline, f"{sent} never reached {unroutable}"
        await asyncio.sleep(0.1)
    (dead,) = found
    assert (dead.reason, dead.original_exchange, dead.original_routing_key) == (
        "unroutable",
        settings.exchange,
        key,
    )
    listed = await _cli(settings, "dlq", "list", unroutable)
    assert f"{sent}" in listed.stdout and "unroutable" in listed.stdout
    await dlq.purge(unroutable, settings=settings)  # no other test reads it
