"""AckTracker: batched multiple=True acks that never cover a message whose handler is running."""

from __future__ import annotations

import asyncio
import random

import pytest

from workerkit.acks import AckTracker


class StrictChannel:
    """Models the broker's view of one channel's unacked deliveries.

    Fails the test if an ack names a tag that is not outstanding (RabbitMQ would close the
    channel) or if a multiple ack covers a delivery whose handler has not finished.
    """

    def __init__(self, delivered: int) -> None:
        self.outstanding = set(range(1, delivered + 1))
        self.finished: set[int] = set()
        self.calls: list[tuple[str, int, bool]] = []

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.calls.append(("ack", tag, multiple))
        assert tag in self.outstanding, f"ack of tag {tag} which is not outstanding"
        covered = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        unfinished = covered - self.finished
        assert not unfinished, f"ack({tag}, multiple={multiple}) covers unfinished {unfinished}"
        self.outstanding -= covered

    def nack(self, tag: int, requeue: bool = True) -> None:
        self.calls.append(("nack", tag, requeue))
        assert tag in self.outstanding
        self.outstanding.discard(tag)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def tracker_for(channel: StrictChannel, batching: bool = True) -> AckTracker:
    return AckTracker(channel, asyncio.get_running_loop(), batching)  # type: ignore[arg-type]


def finish(channel: StrictChannel, tracker: AckTracker, tag: int) -> None:
    channel.finished.add(tag)
    tracker.done(tag)


async def test_contiguous_run_is_one_multiple_ack() -> None:
    channel = StrictChannel(50)
    tracker = tracker_for(channel)
    for tag in range(1, 51):
        finish(channel, tracker, tag)
    assert channel.calls == []  # flushed on the loop, not inline
    await settle()
    assert channel.calls == [("ack", 50, True)]
    assert not channel.outstanding


async def test_gap_is_acked_singly_and_never_covered() -> None:
    channel = StrictChannel(5)
    tracker = tracker_for(channel)
    for tag in (1, 2, 4, 5):  # 3 is still running
        finish(channel, tracker, tag)
    await settle()
    assert channel.calls[0] == ("ack", 2, True)
    assert sorted(channel.calls[1:]) == [("ack", 4, False), ("ack", 5, False)]
    assert channel.outstanding == {3}
    finish(channel, tracker, 3)
    await settle()
    assert channel.calls[-1] == ("ack", 3, True)
    assert not channel.outstanding


async def test_nothing_is_acked_while_the_first_handler_runs() -> None:
    channel = StrictChannel(3)
    tracker = tracker_for(channel)
    finish(channel, tracker, 2)
    finish(channel, tracker, 3)
    await settle()
    assert 1 in channel.outstanding
    assert all(not multiple for _, _, multiple in channel.calls)


@pytest.mark.parametrize("seed", range(20))
async def test_random_completion_orders(seed: int) -> None:
    rng = random.Random(seed)
    count = 200
    channel = StrictChannel(count)
    tracker = tracker_for(channel)
    order = list(range(1, count + 1))
    rng.shuffle(order)
    for tag in order:
        finish(channel, tracker, tag)
        if rng.random() < 0.3:
            await settle()  # flushes interleave with completions
    await settle()
    assert not channel.outstanding  # everything acked exactly once (StrictChannel checks)


async def test_nearly_ordered_completions_need_few_acks() -> None:
    # Handlers of similar length finish roughly in delivery order: the common case.
    rng = random.Random(1)
    channel = StrictChannel(1000)
    tracker = tracker_for(channel)
    for start in range(1, 1001, 10):
        window = list(range(start, start + 10))
        rng.shuffle(window)
        for tag in window:
            finish(channel, tracker, tag)
        await settle()
    assert not channel.outstanding
    assert len(channel.calls) < 400


async def test_requeue_nacks_and_the_floor_moves_past_it() -> None:
    channel = StrictChannel(3)
    tracker = tracker_for(channel)
    finish(channel, tracker, 1)
    tracker.requeue(2)  # its retry copy could not be published
    finish(channel, tracker, 3)
    await settle()
    assert channel.calls == [("ack", 1, True), ("nack", 2, True), ("ack", 3, True)]
    assert not channel.outstanding


async def test_without_batching_each_message_is_acked_at_once() -> None:
    channel = StrictChannel(3)
    tracker = tracker_for(channel, batching=False)
    for tag in (2, 1, 3):
        finish(channel, tracker, tag)
    assert channel.calls == [("ack", 2, False), ("ack", 1, False), ("ack", 3, False)]


async def test_close_flushes_then_nothing_more() -> None:
    channel = StrictChannel(3)
    tracker = tracker_for(channel)
    finish(channel, tracker, 1)
    tracker.close()  # shutdown: pending acks go out now
    assert channel.calls == [("ack", 1, True)]
    finish(channel, tracker, 2)
    tracker.requeue(3)
    await settle()
    assert channel.calls == [("ack", 1, True)]


async def test_a_dead_tracker_never_acks() -> None:
    # After a connection loss the tags belong to a closed channel: acking them on a new
    # channel would ack the wrong messages.
    channel = StrictChannel(2)
    tracker = tracker_for(channel)
    finish(channel, tracker, 1)
    tracker.dead = True
    await settle()
    finish(channel, tracker, 2)
    await settle()
    assert channel.calls == []


async def test_memory_stays_bounded_behind_one_long_handler() -> None:
    """Tag 1 never finishes while 20 000 later deliveries do (prefetch 10): what the tracker
    remembers stays within the prefetch window, not one entry per acked tag."""
    channel = StrictChannel(20_001)
    tracker = tracker_for(channel)
    for tag in range(2, 20_002):
        finish(channel, tracker, tag)
        if tag % 10 == 0:
            await settle()
    await settle()
    remembered = len(getattr(tracker, "_singly", ())) + getattr(tracker, "remembered", 0)
    assert remembered <= 10, remembered
    assert channel.outstanding == {1}
    finish(channel, tracker, 1)
    await settle()
    assert channel.outstanding == set()
    assert channel.calls[-1] == ("ack", 1, True) or channel.calls[-1] == ("ack", 1, False)


async def test_held_acks_go_out_once_half_the_window_finished() -> None:
    channel = StrictChannel(100)
    tracker = AckTracker(channel, asyncio.get_running_loop(), True, hold=50)  # type: ignore[arg-type]
    for tag in range(1, 50):
        finish(channel, tracker, tag)
    await settle()
    assert channel.calls == []  # 49 of 50: still held
    finish(channel, tracker, 50)
    await settle()
    assert channel.calls == [("ack", 50, True)]


async def test_held_acks_never_wait_longer_than_hold_seconds() -> None:
    from workerkit import acks

    channel = StrictChannel(100)
    loop = asyncio.get_running_loop()
    tracker = AckTracker(channel, loop, True, hold=50)  # type: ignore[arg-type]
    finish(channel, tracker, 1)
    finish(channel, tracker, 2)
    started = loop.time()
    while not channel.calls:
        assert loop.time() - started < 1.0, "held acks were never sent"
        await asyncio.sleep(0.001)
    assert channel.calls == [("ack", 2, True)]
    assert loop.time() - started >= acks.HOLD_SECONDS * 0.9


async def test_held_counts_the_acks_not_sent_yet() -> None:
    channel = StrictChannel(10)
    tracker = AckTracker(channel, asyncio.get_running_loop(), True, hold=5)  # type: ignore[arg-type]
    finish(channel, tracker, 1)
    finish(channel, tracker, 2)
    assert tracker.held == 2
    tracker.close()  # a channel loss or shutdown: what is held goes out first
    assert channel.calls == [("ack", 2, True)]
    assert tracker.held == 0
