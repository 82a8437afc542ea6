"""The sync ``Publisher``'s event loop, driven by the threads that wait on it (leader/follower).

Private to workerkit: ``publisher.Publisher`` is its only user. The loop registers an explicit
end-of-turn hook (``transport.turn_end``) so that the transport sends a turn's frames at its end.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import selectors
import threading
from collections.abc import Callable
from typing import Any

from .errors import PublishError, PublishTimeout
from .transport import turn_end

log = logging.getLogger("workerkit.publisher")

# What a loop-side operation reports back: (error, value).
Settle = Callable[[BaseException | None, Any], None]


class TurnEndSelector(selectors.DefaultSelector):
    """The loop's selector, running ``turn_end`` callbacks just before each poll.

    Before the poll is the end of a turn of the loop: frames queued during the turn go out
    and answered threads are woken there, without a turn (and a poll that lets go of the
    GIL) of their own, and without waking a thread while this one still has work to do.
    """

    def __init__(self) -> None:
        super().__init__()
        self.turn_end: list[Callable[[], object]] = []

    def end_turn(self) -> None:
        while self.turn_end:
            callbacks = self.turn_end[:]
            del self.turn_end[:]
            for callback in callbacks:
                try:
                    callback()
                except Exception:  # one broken callback must not stop the loop or the others
                    log.exception("publisher loop: end-of-turn callback failed")

    def select(self, timeout: float | None = None) -> list[Any]:
        self.end_turn()
        return super().select(timeout)


class _Waiter:
    """One synchronous call waiting for its answer, or for its turn to drive the loop.

    ``wake`` is a lock held from birth: releasing it is the cheapest wake-up CPython has.
    """

    __slots__ = ("can_drive", "done", "error", "promoted", "value", "wake")

    def __init__(self, can_drive: bool) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.can_drive = can_drive
        self.done = False
        self.promoted = False
        self.error: BaseException | None = None
        self.value: Any = None


_HOUSEKEEPER = _Waiter(can_drive=False)  # marks the housekeeping thread as the driver


class SharedLoop:
    """An event loop driven by the threads that wait on it (leader/follower).

    A thread that calls while nobody drives runs the loop itself until its own answer is in: no
    hand-off to an I/O thread and back, so one thread publishes about as fast as a blocking
    client. Threads that call meanwhile queue their callback and sleep; the loop wakes each
    with its answer, and a driver whose answer is in hands the loop to a waiting thread. A
    housekeeping thread drives when nobody else does: heartbeats while idle, and callers that
    cannot drive because their thread already runs an event loop.
    """

    def __init__(self, housekeeping_interval: float) -> None:
        self._selector = TurnEndSelector()
        self.loop = asyncio.SelectorEventLoop(self._selector)
        # The transport sends a turn's frames at the end of that turn (not in a turn of its own).
        turn_end.register(self.loop, self._selector.turn_end.append)
        self._interval = housekeeping_interval
        self._mutex = threading.Lock()
        self._driver: _Waiter | None = None
        self._waiting: dict[_Waiter, None] = {}  # oldest first
        self._inbox: list[tuple[Callable[[Settle], None], _Waiter]] = []
        self._nudge = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._housekeep, name="workerkit-publisher", daemon=True
        )
        self._thread.start()

    def call(self, start: Callable[[Settle], None], limit: float | None) -> Any:
        """Run ``start(settle)`` on the loop; return what it settles with, or raise it.

        ``limit`` bounds only the wait for a loop that another thread drives and that never
        answers; the work itself carries its own deadlines.
        """
        waiter = _Waiter(can_drive=asyncio._get_running_loop() is None)
        with self._mutex:
            if self._stopping:
                raise PublishError("publisher is closed")
            driver = self._driver
            drive = driver is None and waiter.can_drive
            if drive:
                self._driver = waiter
            else:
                self._waiting[waiter] = None
            self._inbox.append((start, waiter))
            first = len(self._inbox) == 1
        if drive:
            if first:
                self.loop.call_soon(self._drain)
            self._drive(waiter)
        else:
            # Under load the loop is awake anyway: one wake-up serves every queued call.
            if first:
                self.loop.call_soon_threadsafe(self._drain)
            if driver is None:
                self._nudge.set()
            elif driver is _HOUSEKEEPER and waiter.can_drive:
                self.loop.call_soon_threadsafe(self.loop.stop)  # let this thread drive instead
            self._follow(waiter, limit)
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    def _drain(self) -> None:
        """On the loop: start every queued call."""
        with self._mutex:
            batch, self._inbox = self._inbox, []
        for start, waiter in batch:
            settle = functools.partial(self._settle, waiter)
            try:
                start(settle)
            except Exception as exc:  # a bug must reach its caller, not hang it
                settle(exc, None)

    def stop(self, timeout: float) -> None:
        """Stop the housekeeping thread and close the loop once nobody waits on it."""
        with self._mutex:
            self._stopping = True
        self._nudge.set()
        self._thread.join(timeout)

    def _settle(self, waiter: _Waiter, error: BaseException | None, value: Any) -> None:
        """On the loop: record the answer and wake whoever waits for it."""
        with self._mutex:
            if waiter.done:
                return  # its caller gave up
            waiter.done = True
            waiter.error, waiter.value = error, value
            self._waiting.pop(waiter, None)
            driver = self._driver
            idle = driver is _HOUSEKEEPER and not self._waiting
        if driver is waiter or idle:
            self.loop.stop()
        if driver is not waiter:
            # Woken now, the thread would fight this one for the GIL at each of its system
            # calls; at the end of the turn this thread is about to block instead.
            self._selector.turn_end.append(waiter.wake.release)

    def _drive(self, waiter: _Waiter) -> None:
        try:
            while not waiter.done:
                self.loop.run_forever()
                self._selector.end_turn()  # stop() ends the loop before its turn's end
        finally:
            waiter.done = True  # interrupted: a late answer is dropped
            self._hand_over()

    def _follow(self, waiter: _Waiter, limit: float | None) -> None:
        try:
            woke = waiter.wake.acquire(timeout=-1 if limit is None else limit)
        except BaseException:  # interrupted: never keep the loop to ourselves
            if not self._withdraw(waiter) and waiter.promoted:
                waiter.done = True
                self._hand_over()
            raise
        if not woke:
            if self._withdraw(waiter):
                raise PublishTimeout(f"no answer within {limit}s: the publisher loop is stuck")
            waiter.wake.acquire()  # answered or promoted just now: the wake-up is due
        if waiter.promoted:
            self._drive(waiter)

    def _withdraw(self, waiter: _Waiter) -> bool:
        """Stop waiting; False if ``waiter`` was answered or handed the loop meanwhile."""
        with self._mutex:
            if waiter.done or waiter.promoted:
                return False
            waiter.done = True
            del self._waiting[waiter]
            return True

    def _hand_over(self) -> None:
        """Pass the loop to the oldest waiting thread that can drive, else to the housekeeper."""
        with self._mutex:
            successor = next((w for w in self._waiting if w.can_drive), None)
            self._driver = successor
            if successor is not None:
                del self._waiting[successor]
                successor.promoted = True
            unattended = successor is None and bool(self._waiting)
        if successor is not None:
            successor.wake.release()
        elif unattended:
            self._nudge.set()

    def _housekeep(self) -> None:
        while True:
            self._nudge.wait(self._interval)
            self._nudge.clear()
            with self._mutex:
                if self._driver is not None:
                    continue
                self._driver = _HOUSEKEEPER
                finished = self._stopping and not self._waiting
                if not self._waiting:
                    self.loop.call_soon(self.loop.stop)  # one pass: timers and heartbeats
            if finished:
                break
            try:
                while True:
                    self.loop.run_forever()
                    self._selector.end_turn()
                    with self._mutex:
                        if not self._waiting or any(w.can_drive for w in self._waiting):
                            break
            finally:
                self._hand_over()
        self.loop.close()
