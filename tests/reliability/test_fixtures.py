"""The fixtures themselves work: the private node, the proxy's cut and stall, the oracle."""

from __future__ import annotations

import socket
import threading
import time

import pika
import pytest
from broker import PrivateBroker
from harness import wait_until
from oracle import Oracle
from proxy import Proxy


def test_private_broker_is_not_the_shared_one(private_broker: PrivateBroker) -> None:
    assert private_broker.port != 5672
    connection = pika.BlockingConnection(pika.URLParameters(private_broker.url))
    try:
        props = connection._impl.server_properties  # the node answering is ours
        assert props["product"] == b"RabbitMQ" or props["product"] == "RabbitMQ"
    finally:
        connection.close()
    result = private_broker.ctl("eval", "node().")
    assert private_broker.node in result.stdout


def test_proxy_forwards_and_cut_resets(proxy: Proxy) -> None:
    params = pika.URLParameters(proxy.url())
    connection = pika.BlockingConnection(params)
    assert proxy.open_connections == 1
    proxy.cut()
    with pytest.raises(pika.exceptions.AMQPError):
        connection.channel().queue_declare("", exclusive=True)
        connection.process_data_events(1)
    # New connections still go through after a cut.
    pika.BlockingConnection(params).close()


def test_proxy_stall_holds_bytes_without_closing(proxy: Proxy) -> None:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        # The stall applies to links open at the time: wait until the proxy has set this one up.
        wait_until(lambda: proxy.open_connections == 1, 5, "the proxy to open the upstream link")
        proxy.stall()
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            sock.recv(100)  # nothing reached the broker, so nothing comes back
        proxy.resume()
        sock.settimeout(5.0)
        assert sock.recv(100).startswith(b"\x01")  # connection.start from the broker
    finally:
        sock.close()


def test_memory_alarm_blocks_publishers(private_broker: PrivateBroker) -> None:
    blocked = threading.Event()
    params = pika.URLParameters(private_broker.url)
    connection = pika.BlockingConnection(params)
    connection.add_on_connection_blocked_callback(lambda *_: blocked.set())
    try:
        channel = connection.channel()
        private_broker.set_memory_alarm()
        try:
            channel.basic_publish("", "nowhere", b"x")  # the broker blocks on the first publish
            deadline = time.monotonic() + 10
            while not blocked.is_set() and time.monotonic() < deadline:
                connection.process_data_events(0.1)
            assert blocked.is_set()
        finally:
            private_broker.clear_memory_alarm()
    finally:
        connection.close()


def test_oracle_verdicts() -> None:
    oracle = Oracle("unit")
    for mid in ("a", "b", "c", "d"):
        oracle.attempt(mid)
    oracle.confirm("a")
    oracle.confirm("b")
    oracle.confirm("c")
    oracle.fail("d")
    oracle.finish_many(["a", "a", "b"])
    assert oracle.lost == {"c"}
    oracle.dead.add("c")
    assert not oracle.lost and not oracle.unexpected and oracle.duplicates == 1
    oracle.finish("zzz")
    assert oracle.unexpected == {"zzz"}
