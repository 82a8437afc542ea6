"""Defects the chaos soak found, each cut down to a focused, deterministic reproduction.

Each test names the soak seed that first showed the defect; the soak itself
(``test_chaos.py``) keeps running the whole mix.
"""

from __future__ import annotations

import threading
import time

import pytest
from broker import free_port

import workerkit

pytestmark = pytest.mark.reliability


def test_sync_publisher_retry_survives_a_change_of_driving_thread() -> None:
    """Soak seed 3 (40 s): ``KeyError('idle_for')`` escaped ``Publisher.publish``.

    The sync Publisher's loop is driven by whichever calling thread is waiting (leader/
    follower). A publish that needs the retrying path starts its tenacity ``AsyncRetrying`` on
    the thread driving at that moment; tenacity keeps its statistics in a ``threading.local``,
    so when the driving thread changes mid-retry the next backoff finds an empty dict and
    raises KeyError instead of retrying (and the caller gets a non-PublishError). No broker is
    needed: connection refused is enough to take the retrying path.
    """
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # nobody listens: refused at once
    settings = workerkit.Settings(url=url, exchange="wkr", connect_timeout=1.0)  # type: ignore[arg-type]
    publisher = workerkit.Publisher(settings=settings)
    outcome: dict[str, BaseException | None] = {}

    def publish(name: str, timeout: float) -> None:
        try:
            publisher.publish("chaos.finding", {"n": 1}, timeout=timeout)
            outcome[name] = None
        except BaseException as exc:
            outcome[name] = exc

    # "first" drives the loop for 1 s; "second" queues behind it, so its publish (and its
    # retrying) starts on first's thread and continues on its own once first is answered.
    first = threading.Thread(target=publish, args=("first", 1.0))
    second = threading.Thread(target=publish, args=("second", 4.0))
    try:
        first.start()
        time.sleep(0.2)
        began = time.monotonic()
        second.start()
        first.join(15)
        second.join(15)
        took = time.monotonic() - began
    finally:
        publisher.close()
    assert not first.is_alive() and not second.is_alive(), "a publish never returned"
    assert isinstance(outcome["first"], workerkit.PublishTimeout), outcome["first"]
    assert isinstance(outcome["second"], workerkit.PublishTimeout), repr(outcome["second"])
    assert took < 4.0 + 2.0, f"the 4 s publish raised after {took:.1f}s"
