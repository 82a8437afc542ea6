"""A publish keeps its own deadline: the RPCs it makes (channel open, declares) are inside it."""

from __future__ import annotations

import time

import pytest
from proxy import Proxy

from workerkit import AsyncPublisher, PublishTimeout, Settings


async def test_a_publish_fits_its_rpcs_in_its_own_timeout(proxy: Proxy) -> None:
    """A broker that stops answering mid-publish: the delay layout a delayed publish declares
    first is inside publish(timeout=1), not 30 s per declare (issue 9, item 13)."""
    settings = Settings(url=proxy.url(), exchange="wk.deadline", connect_timeout=5.0)
    async with AsyncPublisher(settings=settings) as publisher:
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(PublishTimeout):
            await publisher.publish("anything", {"n": 1}, delay=1, timeout=1)
        assert time.monotonic() - started < 2.5
