"""Stop signals (SIGTERM, SIGINT) as requests: the first asks for a drain, a second for "now".

One request often arrives twice. A process-group kill reaches every process of the group:
GNU ``timeout`` signals its command and then the whole group, and a terminal's Ctrl-C reaches a
``--processes`` supervisor and its children, which the supervisor then signals itself. Taken as
two requests, the second would cut the grace period short (handlers abandoned, their messages
redelivered). So the same signal again within ``ECHO_WINDOW`` seconds is the same request; a
person pressing Ctrl-C twice is slower than that.
"""

from __future__ import annotations

import signal
import time

__all__ = ["ECHO_WINDOW", "StopRequests"]

ECHO_WINDOW = 0.25


class StopRequests:
    """Counts the stop requests that signals make (:meth:`count`)."""

    def __init__(self) -> None:
        self.requests = 0
        self._last: signal.Signals | None = None
        self._at = 0.0

    def count(self, sig: signal.Signals) -> int | None:
        """The request number ``sig`` makes (1: drain, 2 or more: stop now), or None when it is
        an echo of the previous one: the same signal within ``ECHO_WINDOW`` seconds."""
        now = time.monotonic()
        if sig is self._last and now - self._at < ECHO_WINDOW:
            return None
        self._last, self._at = sig, now
        self.requests += 1
        return self.requests
