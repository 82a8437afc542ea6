"""The sync Publisher's loop, driven by the threads that wait on it (leader/follower).

No broker here: each call's ``start`` decides when and how it is answered, so every hand-over
is forced by the test instead of left to timing.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from workerkit._shared_loop import Settle
from workerkit._shared_loop import SharedLoop as _SharedLoop
from workerkit.errors import PublishError, PublishTimeout

DEADLINE = 10.0


@pytest.fixture
def shared() -> Iterator[_SharedLoop]:
    loop = _SharedLoop(housekeeping_interval=0.05)
    yield loop
    loop.stop(DEADLINE)


def answer_now(value: Any) -> Callable[[Settle], None]:
    return lambda settle: settle(None, value)


class Held:
    """A call whose answer the test gives later; records the thread that started it."""

    def __init__(self, shared: _SharedLoop) -> None:
        self.shared = shared
        self.started = threading.Event()
        self.started_in: str = ""
        self._settle: Settle | None = None

    def __call__(self, settle: Settle) -> None:
        self._settle = settle
        self.started_in = threading.current_thread().name
        self.started.set()

    def answer(self, value: Any = None, error: BaseException | None = None) -> None:
        assert self.started.wait(DEADLINE)
        settle = self._settle
        assert settle is not None
        self.shared.loop.call_soon_threadsafe(settle, error, value)


class Caller(threading.Thread):
    """A thread making one call and keeping its outcome."""

    def __init__(self, shared: _SharedLoop, start: Callable[[Settle], None], **kw: Any) -> None:
        super().__init__(daemon=True, name=kw.pop("name", None))
        self.shared, self.start_fn, self.limit = shared, start, kw.pop("limit", DEADLINE)
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.shared.call(self.start_fn, self.limit)
        except BaseException as exc:
            self.error = exc

    def outcome(self) -> Any:
        self.join(DEADLINE)
        assert not self.is_alive(), "the call never returned"
        if self.error is not None:
            raise self.error
        return self.value


def wait_until(condition: Callable[[], bool]) -> None:
    done = threading.Event()
    for _ in range(int(DEADLINE / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition not met within the deadline")


def test_a_lone_caller_runs_the_loop_in_its_own_thread(shared: _SharedLoop) -> None:
    seen: list[str] = []

    def start(settle: Settle) -> None:
        seen.append(threading.current_thread().name)
        settle(None, 42)

    assert shared.call(start, DEADLINE) == 42
    assert seen == [threading.current_thread().name]


def test_errors_reach_the_caller(shared: _SharedLoop) -> None:
    with pytest.raises(ValueError, match="settled"):
        shared.call(lambda settle: settle(ValueError("settled"), None), DEADLINE)

    def broken(_settle: Settle) -> None:
        raise RuntimeError("bug in start")

    with pytest.raises(RuntimeError, match="bug in start"):
        shared.call(broken, DEADLINE)
    assert shared.call(answer_now("still fine"), DEADLINE) == "still fine"


def test_waiting_callers_are_answered_and_the_loop_is_handed_on(shared: _SharedLoop) -> None:
    first, second, third = Held(shared), Held(shared), Held(shared)
    a = Caller(shared, first, name="caller-a")
    a.start()
    assert first.started.wait(DEADLINE)
    b, c = Caller(shared, second, name="caller-b"), Caller(shared, third, name="caller-c")
    b.start()
    assert second.started.wait(DEADLINE)  # queued by b, started by a's turn of the loop
    c.start()
    assert third.started.wait(DEADLINE)
    assert first.started_in == second.started_in == third.started_in == "caller-a"

    third.answer("c")  # answered while a drives: c wakes with it
    assert c.outcome() == "c"
    first.answer("a")  # a's own answer: a returns and hands the loop to b
    assert a.outcome() == "a"
    after = Held(shared)
    d = Caller(shared, after, name="caller-d")
    d.start()
    assert after.started.wait(DEADLINE)
    assert after.started_in == "caller-b"  # b drives now
    second.answer("b")
    after.answer("d")
    assert b.outcome() == "b"
    assert d.outcome() == "d"


def test_a_caller_inside_an_event_loop_is_served_by_the_housekeeper(
    shared: _SharedLoop,
) -> None:
    seen: list[str] = []

    def start(settle: Settle) -> None:
        seen.append(threading.current_thread().name)
        settle(None, "ok")

    async def from_a_coroutine() -> Any:
        return shared.call(start, DEADLINE)  # blocking on purpose: sync code called from async

    assert asyncio.run(from_a_coroutine()) == "ok"
    assert seen == ["workerkit-publisher"]


def test_the_housekeeper_runs_timers_while_nobody_calls(shared: _SharedLoop) -> None:
    fired = threading.Event()

    def start(settle: Settle) -> None:
        shared.loop.call_later(0.1, fired.set)
        settle(None, None)

    shared.call(start, DEADLINE)
    assert fired.wait(DEADLINE)


def test_a_stuck_loop_times_out_a_waiting_caller(shared: _SharedLoop) -> None:
    stuck = Held(shared)
    a = Caller(shared, stuck, name="caller-a")
    a.start()
    assert stuck.started.wait(DEADLINE)
    late = Held(shared)
    with pytest.raises(PublishTimeout):
        shared.call(late, 0.2)
    late.answer("too late")  # dropped: its caller gave up
    stuck.answer("a")
    assert a.outcome() == "a"
    assert shared.call(answer_now(1), DEADLINE) == 1


def test_an_interrupted_driver_hands_the_loop_on(shared: _SharedLoop) -> None:
    def interrupted(_settle: Settle) -> None:
        shared.loop.call_soon(_raise_interrupt)

    waiting = Held(shared)
    started = threading.Event()

    def interrupted_after_b_queued(settle: Settle) -> None:
        started.set()
        # Let b queue first, then stop this driver the way Ctrl-C would.
        shared.loop.call_later(0.05, _raise_interrupt)

    a = Caller(shared, interrupted_after_b_queued, name="caller-a")
    a.start()
    assert started.wait(DEADLINE)
    b = Caller(shared, waiting, name="caller-b")
    b.start()
    assert waiting.started.wait(DEADLINE)
    with pytest.raises(KeyboardInterrupt):
        a.outcome()
    waiting.answer("b")
    assert b.outcome() == "b"
    with pytest.raises(KeyboardInterrupt):
        shared.call(interrupted, DEADLINE)
    assert shared.call(answer_now("after"), DEADLINE) == "after"


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


def test_stop_refuses_new_calls(shared: _SharedLoop) -> None:
    shared.call(answer_now(None), DEADLINE)
    shared.stop(DEADLINE)
    with pytest.raises(PublishError, match="closed"):
        shared.call(answer_now(None), DEADLINE)
    assert shared.loop.is_closed()


def test_many_threads_each_get_their_own_answer(shared: _SharedLoop) -> None:
    """Answers arrive out of order, some from inside an event loop; none is lost or swapped."""
    results: dict[tuple[int, int], Any] = {}
    lock = threading.Lock()
    rng = random.Random(7)
    delays = [rng.random() / 500 for _ in range(8 * 150)]

    def start_for(value: tuple[int, int], delay: float) -> Callable[[Settle], None]:
        def start(settle: Settle) -> None:
            asyncio.get_running_loop().call_later(delay, settle, None, value)

        return start

    def produce(thread: int) -> None:
        for i in range(150):
            got = shared.call(start_for((thread, i), delays[thread * 150 + i]), DEADLINE)
            with lock:
                results[(thread, i)] = got

    async def produce_in_a_loop(thread: int) -> None:
        produce(thread)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(7)]
    threads.append(threading.Thread(target=lambda: asyncio.run(produce_in_a_loop(7))))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert results == {(t, i): (t, i) for t in range(8) for i in range(150)}
    wait_until(lambda: not shared._waiting and shared._driver is None)


def test_answers_given_in_the_drivers_last_turn_still_wake_their_threads() -> None:
    """The driver's own answer stops the loop before its turn's end, where wake-ups happen.

    The housekeeper is slowed down so that it cannot be what wakes b.
    """
    shared = _SharedLoop(housekeeping_interval=3600)
    mine, theirs = Held(shared), Held(shared)
    a = Caller(shared, mine, name="caller-a")
    a.start()
    assert mine.started.wait(DEADLINE)
    b = Caller(shared, theirs, name="caller-b", limit=None)
    b.start()
    assert theirs.started.wait(DEADLINE)
    settle_a, settle_b = mine._settle, theirs._settle
    assert settle_a is not None and settle_b is not None

    def both() -> None:  # one callback: both answers in the same turn
        settle_b(None, "b")
        settle_a(None, "a")

    shared.loop.call_soon_threadsafe(both)
    assert a.outcome() == "a"
    assert b.outcome() == "b"
    shared.stop(DEADLINE)
