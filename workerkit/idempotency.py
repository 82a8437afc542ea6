"""Effectively-once handlers under at-least-once delivery: claim a key, run, commit.

A Worker with ``idempotent = True`` and an ``idempotency_store`` runs its handler at most once
per key (its message id, or what its ``idempotency_key(body, message)`` returns)::

    claim(key)   SET key <token> NX, expiring after the claim TTL (the handler's time limit
                 plus a margin), before the handler runs
        claimed  -> run the handler
                    returned -> commit: the key becomes "done" for ``idempotency_ttl`` seconds;
                                then reply (requests) and ack
                    raised   -> release (delete the key if the claim is still ours): the retry
                                runs the handler again
        done     -> a duplicate of a handled message: acked without running (no reply)
        busy     -> another delivery holds the claim (running now, or its process was killed
                    and the claim has not expired yet): retried once the claim can have expired

What it cannot do: a process killed after the handler's side effect but before the commit leaves
a claim that expires, and the redelivered message runs the handler again. Only a side effect
committed in the same transaction as the key can close that window.

Stores: :class:`MemoryStore` (one process; tests) and :class:`RedisStore` (production,
``pip install 'workerkit[redis]'``). Any :class:`IdempotencyStore` subclass works.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import time
from typing import Any

from .errors import ConfigurationError

__all__ = ["Claim", "IdempotencyStore", "MemoryStore", "RedisStore"]

DONE = "done"


class Claim(enum.Enum):
    """The answer to :meth:`IdempotencyStore.claim`."""

    CLAIMED = "claimed"  # the key is ours until we commit or release it
    DONE = "done"  # handled before: a duplicate
    BUSY = "busy"  # claimed by another delivery (possibly a dead process): try again later


class IdempotencyStore(abc.ABC):
    """Where claims and commits live. Keys are prefixed with :attr:`prefix`."""

    def __init__(self, prefix: str = "workerkit:idem:") -> None:
        self.prefix = prefix

    @abc.abstractmethod
    async def claim(self, key: str, token: str, ttl: float) -> tuple[Claim, float]:
        """Claim ``key`` for ``ttl`` seconds with ``token``: (answer, seconds until a BUSY
        claim expires; 0 otherwise)."""

    @abc.abstractmethod
    async def commit(self, key: str, token: str, ttl: float) -> bool:
        """Mark ``key`` done for ``ttl`` seconds; False if the claim had stopped being ours."""

    @abc.abstractmethod
    async def release(self, key: str, token: str) -> None:
        """Delete ``key`` if it is still claimed with ``token``."""

    async def close(self) -> None:  # noqa: B027 - optional: most stores hold nothing to close
        """Let go of connections (called when the worker stops)."""


class MemoryStore(IdempotencyStore):
    """Claims in this process's memory: for tests and single-process tools."""

    def __init__(self, prefix: str = "workerkit:idem:") -> None:
        super().__init__(prefix)
        self.entries: dict[str, tuple[str, float]] = {}  # key -> (token or "done", expiry)

    def _live(self, key: str) -> tuple[str, float] | None:
        entry = self.entries.get(self.prefix + key)
        if entry is not None and entry[1] <= time.monotonic():
            del self.entries[self.prefix + key]
            return None
        return entry

    async def claim(self, key: str, token: str, ttl: float) -> tuple[Claim, float]:
        entry = self._live(key)
        if entry is None:
            self.entries[self.prefix + key] = (token, time.monotonic() + ttl)
            return Claim.CLAIMED, 0.0
        if entry[0] == DONE:
            return Claim.DONE, 0.0
        return Claim.BUSY, entry[1] - time.monotonic()

    async def commit(self, key: str, token: str, ttl: float) -> bool:
        entry = self._live(key)
        self.entries[self.prefix + key] = (DONE, time.monotonic() + ttl)
        return entry is not None and entry[0] == token

    async def release(self, key: str, token: str) -> None:
        entry = self._live(key)
        if entry is not None and entry[0] == token:
            del self.entries[self.prefix + key]


# Atomic on the server: claim, or say why not (done, or busy with the claim's time left).
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0} end
local value = redis.call('GET', KEYS[1])
if value == 'done' then return {2, 0} end
return {3, redis.call('PTTL', KEYS[1])}
"""
_COMMIT = """
local value = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
if value == ARGV[1] then return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore(IdempotencyStore):
    """Claims in Redis (redis-py's asyncio client), shared by every worker process.

    ``RedisStore("redis://127.0.0.1:6379/0", prefix="billing:")``. The client is made on first
    use in the running event loop (and again if a later run uses another loop).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "workerkit:idem:",
        socket_timeout: float = 5.0,
    ) -> None:
        super().__init__(prefix)
        try:
            import redis.asyncio  # noqa: F401 - fail at class definition, not at the first message
        except ImportError:
            raise ConfigurationError(
                "RedisStore needs redis-py: pip install 'workerkit[redis]'"
            ) from None
        self.url = url
        self.socket_timeout = socket_timeout
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _redis(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            import redis.asyncio

            self._client = redis.asyncio.from_url(
                self.url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
            )
            self._loop = loop
        return self._client

    async def claim(self, key: str, token: str, ttl: float) -> tuple[Claim, float]:
        ms = max(1, int(ttl * 1000))
        answer, left = await self._redis().eval(_CLAIM, 1, self.prefix + key, token, ms)
        if answer == 1:
            return Claim.CLAIMED, 0.0
        if answer == 2:
            return Claim.DONE, 0.0
        return Claim.BUSY, max(int(left), 0) / 1000

    async def commit(self, key: str, token: str, ttl: float) -> bool:
        ms = max(1, int(ttl * 1000))
        return bool(await self._redis().eval(_COMMIT, 1, self.prefix + key, token, ms))

    async def release(self, key: str, token: str) -> None:
        await self._redis().eval(_RELEASE, 1, self.prefix + key, token)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"  # never the URL: it may hold a password
