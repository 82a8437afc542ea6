"""Acknowledgements for one channel, batched without ever acking an unfinished message."""

from __future__ import annotations

import asyncio

from .transport.base import Channel

__all__ = ["AckTracker"]

# Longest a finished delivery's ack waits for others to share its frame (seconds).
HOLD_SECONDS = 0.005


class AckTracker:
    """Acks for one channel. Batches contiguous finished deliveries into one multiple=True ack.

    A delivery below the floor is acked only when it finished, so batching never acks a message
    whose handler has not returned. Finished tags stuck behind a slow one are acked singly on the
    next flush so that they do not hold the prefetch window.

    Above the floor the tracker remembers the *unsettled* tags up to the highest tag settled
    singly (``_gaps``), not the settled ones: unsettled deliveries are at most ``prefetch``, so
    one long handler cannot make it grow without bound.

    ``hold``: finished deliveries wait for this many to be finished (or ``HOLD_SECONDS``) before
    their ack is sent. 1 sends at the end of the loop's turn. The runtime holds half the
    prefetch window, as C clients do: the broker still has the other half to send meanwhile,
    and a write to the socket costs more than a loop turn.
    """

    __slots__ = (
        "_batching",
        "_channel",
        "_done",
        "_floor",
        "_gaps",
        "_high",
        "_hold",
        "_loop",
        "_scheduled",
        "_timer",
        "dead",
    )

    def __init__(
        self,
        channel: Channel,
        loop: asyncio.AbstractEventLoop,
        batching: bool,
        hold: int = 1,
    ) -> None:
        self._channel = channel
        self._loop = loop
        self._batching = batching
        self._hold = max(1, hold)
        self._timer = False
        self._floor = 0  # every tag <= floor is settled
        self._high = 0  # every tag in (floor, high] is settled unless it is in _gaps
        self._gaps: set[int] = set()
        self._done: set[int] = set()
        self._scheduled = False
        self.dead = False

    @property
    def held(self) -> int:
        """Finished deliveries whose ack is not sent yet (waiting for others, at most
        ``HOLD_SECONDS``)."""
        return 0 if self.dead else len(self._done)

    @property
    def remembered(self) -> int:
        """Tags held in memory (bounded by the prefetch window)."""
        return len(self._gaps) + len(self._done)

    def done(self, tag: int) -> None:
        if self.dead:
            return
        if not self._batching:
            self._channel.ack(tag)
            return
        done = self._done
        done.add(tag)
        if self._scheduled:
            return
        if len(done) >= self._hold:
            self._scheduled = True
            self._loop.call_soon(self.flush)
        elif not self._timer:
            self._timer = True
            self._loop.call_later(HOLD_SECONDS, self._held_long_enough)

    def _held_long_enough(self) -> None:
        self._timer = False
        self.flush()

    def requeue(self, tag: int) -> None:
        """Give the message back to the broker (to its queue)."""
        if self.dead:
            return
        self.flush()
        self._channel.nack(tag, requeue=True)
        self._settled_singly(tag)
        self._advance()

    def reject(self, tag: int) -> None:
        """Give the message to the queue's dead-letter exchange (nack without requeue)."""
        if self.dead:
            return
        self.flush()
        self._channel.nack(tag, requeue=False)
        self._settled_singly(tag)
        self._advance()

    def _settled_singly(self, tag: int) -> None:
        high = self._high
        if tag > high:
            start = max(high, self._floor) + 1
            if tag - start > 1:
                self._gaps.update(range(start, tag))
            elif tag - start == 1:
                self._gaps.add(start)
            self._high = tag
        else:
            self._gaps.discard(tag)

    def _advance(self) -> None:
        gaps = self._gaps
        if not gaps:
            self._floor = max(self._floor, self._high)
        else:
            self._floor = min(gaps) - 1

    def flush(self) -> None:
        self._scheduled = False
        if self.dead or not self._done:
            return
        done, gaps = self._done, self._gaps
        floor, high = self._floor, self._high
        last_unsettled = 0
        while True:
            nxt = floor + 1
            if nxt in done:
                done.discard(nxt)
                gaps.discard(nxt)
                last_unsettled = nxt
                floor = nxt
            elif nxt <= high and nxt not in gaps:
                # Settled singly earlier: skip to just below the next unsettled tag.
                floor = min(gaps) - 1 if gaps else high
            else:
                break
        self._floor = floor
        if high < floor:
            self._high = floor
        if last_unsettled:
            self._channel.ack(last_unsettled, True)
        if done:
            for tag in sorted(done):
                self._channel.ack(tag)
                self._settled_singly(tag)
            done.clear()
            self._advance()

    def close(self) -> None:
        """Send what is held, then ack nothing more (the channel is closing or gone; on a closed
        channel the acks are no-ops: the broker has requeued those deliveries)."""
        self.flush()
        self.dead = True
