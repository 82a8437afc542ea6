"""A request's two outcomes, its publish confirm and its reply, heard in one wait.

``_Request.when_settled`` is what both publishers wait on: once per request, when the second
of the two is in (a reply may beat its confirm), or at the first failure. The broker's verdict
on the publish wins over a reply that came before it, as it did when callers waited for the
confirm first and then for the reply.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from workerkit import (
    ConnectionFailed,
    Publisher,
    PublishError,
    Reject,
    RemoteError,
    RequestTimeout,
    Settings,
    Unroutable,
    Worker,
    _shared_loop,
)
from workerkit.middleware import Middleware
from workerkit.publisher import _Request
from workerkit.testing import in_memory, running
from workerkit.transport.memory import MemoryTransport

REPLY: Any = object()  # _Request never looks inside a reply


class Heard:
    def __init__(self) -> None:
        self.calls: list[tuple[BaseException | None, Any]] = []

    def __call__(self, error: BaseException | None, reply: Any) -> None:
        self.calls.append((error, reply))


def _request() -> tuple[_Request, dict[str, _Request], Heard]:
    pending: dict[str, _Request] = {}
    request = _Request(pending, "c1")
    pending["c1"] = request
    heard = Heard()
    request.when_settled(heard)
    return request, pending, heard


@pytest.mark.parametrize("reply_first", [False, True])
def test_settles_once_when_both_the_confirm_and_the_reply_are_in(reply_first: bool) -> None:
    request, pending, heard = _request()
    if reply_first:
        request.answer(None, REPLY)
        assert heard.calls == []  # not before the broker confirmed the request
        request.published(None)
    else:
        request.published(None)
        assert heard.calls == []  # confirmed: now the reply
        request.answer(None, REPLY)
    assert heard.calls == [(None, REPLY)]
    assert not pending


def test_a_refused_publish_wins_over_a_reply_that_beat_its_confirm() -> None:
    request, _, heard = _request()
    request.answer(None, REPLY)
    refused = Unroutable("wk", "nobody")
    request.published(refused)
    assert heard.calls == [(refused, None)]


@pytest.mark.parametrize(
    "fail",
    [
        lambda r: r.published(Unroutable("wk", "nobody")),  # the broker refused it
        lambda r: r.answer(ConnectionFailed("lost"), None),  # lost before its confirm
    ],
)
def test_a_failure_before_the_confirm_settles_at_once_and_only_once(fail: Any) -> None:
    request, pending, heard = _request()
    fail(request)
    assert len(heard.calls) == 1 and heard.calls[0][1] is None
    error = heard.calls[0][0]
    assert isinstance(error, Unroutable | ConnectionFailed)
    request.published(None)  # nothing after the outcome is known changes it
    request.answer(None, REPLY)
    assert heard.calls == [(error, None)] and not pending


def test_a_timeout_after_the_confirm_settles_with_it() -> None:
    request, _, heard = _request()
    request.published(None)
    timeout = RequestTimeout("no reply within 1s")
    request.answer(timeout, None)
    assert heard.calls == [(timeout, None)]


def test_registered_after_both_are_in_settles_at_once() -> None:
    request = _Request({}, "c1")
    request.published(None)
    request.answer(None, REPLY)
    heard = Heard()
    request.when_settled(heard)
    assert heard.calls == [(None, REPLY)]


# -- the sync Publisher waits once per request -----------------------------------------------

SETTINGS = Settings(exchange="wkm", publish_timeout=5.0)


class Pricing(Worker):
    queue = "pricing.settle"

    async def handle(self, body: dict[str, Any]) -> Any:
        if body.get("reject"):
            raise Reject("no such sku")
        if body.get("slow"):
            await asyncio.sleep(body["slow"])
        return {"sku": body["sku"]}


class Counting(_shared_loop.SharedLoop):
    calls = 0

    def call(self, start: Any, limit: float | None) -> Any:
        Counting.calls += 1
        return super().call(start, limit)


class Hooks(Middleware):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def after_publish(self, outgoing: Any, outcome: str, duration: float) -> None:
        self.seen.append(outcome)


def _waits(pub: Publisher, *args: Any, **kw: Any) -> tuple[Any, int]:
    before = Counting.calls
    try:
        result: Any = pub.request(*args, **kw)
    except PublishError as exc:  # RequestTimeout, Unroutable: PublishError subclasses
        result = exc
    except RemoteError as exc:
        result = exc
    return result, Counting.calls - before


async def test_a_sync_request_is_one_wait_and_keeps_its_outcomes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("workerkit.publisher.SharedLoop", Counting)
    runner, broker = in_memory([Pricing], settings=SETTINGS)
    hooks = Hooks()
    plain = Publisher(settings=SETTINGS, transport=MemoryTransport(broker))
    hooked = Publisher(settings=SETTINGS, transport=MemoryTransport(broker), middleware=[hooks])

    def ask() -> list[tuple[Any, int]]:
        return [
            _waits(plain, "pricing.settle", {"sku": "A"}),
            _waits(plain, "nobody.home", {"sku": "A"}),
            _waits(plain, "pricing.settle", {"sku": "A", "reject": True}),
            _waits(plain, "pricing.settle", {"sku": "A", "slow": 1}, timeout=0.2),
            _waits(hooked, "pricing.settle", {"sku": "H"}),
        ]

    async with running(runner):
        (ok, unroutable, rejected, late, observed) = await asyncio.to_thread(ask)
        await asyncio.to_thread(plain.close)
        await asyncio.to_thread(hooked.close)
    assert ok == ({"sku": "A"}, 1)  # one wait for the confirm and the reply together
    assert isinstance(unroutable[0], Unroutable) and unroutable[1] == 1
    assert isinstance(rejected[0], RemoteError) and rejected[1] == 1
    assert isinstance(late[0], RequestTimeout) and late[1] == 1
    # With publish hooks the confirm is its own wait: after_publish runs in the caller's thread
    # once the request is confirmed, before the reply is waited for.
    assert observed == ({"sku": "H"}, 2)
    assert hooks.seen == ["confirmed"]
