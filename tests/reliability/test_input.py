"""Bad input: every malformed body goes to the DLQ with its reason, the worker keeps going, and
a body over the size limit is refused at publish time with a typed error."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pika
import pytest
from broker import PrivateBroker
from harness import EXCHANGE, Load, WorkerProcess, collect, settle
from oracle import Oracle

import workerkit

pytestmark = pytest.mark.reliability

MAX_BODY = 4096


class Exploit:
    """Unpickling this would create the marker file: proof that pickle was never loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (open, (str(self.marker), "w"))


def bad_bodies(marker: Path) -> dict[str, tuple[bytes, str]]:
    return {
        "non-utf8": (b'{"n": 1, "x": "\xff\xfe"}', "application/json"),
        "truncated": (b'{"n": 1, "sle', "application/json"),
        "deep": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        "deep-object": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "application/json"),
        "schema": (b'{"n": "not a number"}', "application/json"),
        "pickle": (pickle.dumps(Exploit(marker)), "application/python-pickle"),
        "too-large": (b'{"n": 1, "pad": "' + b"x" * (2 * MAX_BODY) + b'"}', "application/json"),
    }


def publish_raw(url: str, queue: str, oracle: Oracle, bodies: dict[str, tuple[bytes, str]]) -> None:
    """Bypass workerkit's publisher: these bodies come from foreign or broken producers."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for name, (body, content_type) in bodies.items():
            oracle.attempt(name)
            props = pika.BasicProperties(
                content_type=content_type, message_id=name, delivery_mode=2
            )
            channel.basic_publish(EXCHANGE, queue, body, props, mandatory=True)
            oracle.confirm(name)
    finally:
        connection.close()


def test_bad_input_goes_to_dlq_and_worker_keeps_going(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("badinput"), private_broker.url
    worker = workers(queue, url, max_body_size=MAX_BODY)
    worker.wait_healthy()
    marker = out_dir / "pickle-was-loaded"
    bodies = bad_bodies(marker)
    Load(oracle, url, queue, 20, rate=1000, prefix="before").start().join()
    publish_raw(url, queue, oracle, bodies)
    Load(oracle, url, queue, 20, rate=1000, prefix="after").start().join()
    settle(oracle, url, queue, out_dir)
    headers = {h.get("workerkit-error-message", ""): h for h in oracle.read_dlq(url, queue)}
    collect(oracle, out_dir)
    assert oracle.dead == set(bodies), f"dead-lettered: {sorted(oracle.dead)}"
    assert all(h.get("workerkit-reason") == "invalid" for h in headers.values()), headers.keys()
    assert not marker.exists(), "a pickle body was unpickled"
    stats = worker.stats()
    assert stats["healthy"] and stats["reconnects"] == 0
    assert worker.proc.poll() is None
    oracle.check(max_duplicates=0)


def test_publish_over_max_body_size_raises_typed_error(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("toolarge"), private_broker.url
    workers(queue, url).wait_healthy()
    settings = workerkit.Settings(url=url, exchange=EXCHANGE, max_body_size=MAX_BODY)
    with workerkit.Publisher(settings=settings) as publisher:
        with pytest.raises(workerkit.MessageTooLarge):
            publisher.publish(queue, {"pad": "x" * (2 * MAX_BODY)})
        publisher.publish(queue, {"n": 1})  # the publisher is still usable
