"""Acknowledgements for one channel, batched without ever acking an unfinished message."""

from __future__ import annotations

import asyncio

from .transport.base import Channel

__all__ = ["AckTracker"]


class AckTracker:
    """Acks for one channel. Batches contiguous finished deliveries into one multiple=True ack.

    A delivery below the floor is acked only when it finished, so batching never acks a message
    whose handler has not returned. Finished tags stuck behind a slow one are acked singly on the
    next flush so that they do not hold the prefetch window.
    """

    __slots__ = (
        "_batching",
        "_channel",
        "_done",
        "_floor",
        "_loop",
        "_scheduled",
        "_singly",
        "dead",
    )

    def __init__(self, channel: Channel, loop: asyncio.AbstractEventLoop, batching: bool) -> None:
        self._channel = channel
        self._loop = loop
        self._batching = batching
        self._floor = 0  # every tag <= floor is acked
        self._done: set[int] = set()
        self._singly: set[int] = set()
        self._scheduled = False
        self.dead = False

    def done(self, tag: int) -> None:
        if self.dead:
            return
        if not self._batching:
            self._channel.ack(tag)
            return
        self._done.add(tag)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def requeue(self, tag: int) -> None:
        """Give the message back to the broker (its copy could not be published)."""
        if self.dead:
            return
        self.flush()
        self._channel.nack(tag, requeue=True)
        self._singly.add(tag)
        self._advance_over_settled()

    def _advance_over_settled(self) -> None:
        floor = self._floor
        while floor + 1 in self._singly:
            floor += 1
            self._singly.discard(floor)
        self._floor = floor

    def flush(self) -> None:
        self._scheduled = False
        if self.dead or not self._done:
            return
        done, singly = self._done, self._singly
        floor = self._floor
        last_unsettled = 0
        while True:
            nxt = floor + 1
            if nxt in done:
                done.discard(nxt)
                last_unsettled = nxt
            elif nxt in singly:
                singly.discard(nxt)
            else:
                break
            floor = nxt
        self._floor = floor
        if last_unsettled:
            self._channel.ack(last_unsettled, True)
        if done:
            for tag in done:
                self._channel.ack(tag)
            singly.update(done)
            done.clear()

    def close(self) -> None:
        self.flush()
        self.dead = True
