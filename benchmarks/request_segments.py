"""Where a request/reply round trip's time goes, from the packets on the loopback interface.

``python -m benchmarks.request_segments [--rounds 3] [--count 1000] [--pairs wk/wk,pika/pika]``
runs one caller against one responder (``RESPONDER/CALLER``, each ``wk`` or ``pika`` as in
benchmarks/request.py; mixing them shows each side on its own; caller ``pika_confirm`` is raw
pika publishing its requests confirmed and mandatory, as workerkit does) while it captures
the AMQP packets on ``lo`` with the kernel's timestamps, then splits each round trip into four
parts:

* broker, request: the caller's request leaves -> its delivery reaches the responder (routing,
  the quorum queue's write and fsync);
* responder: the delivery arrives -> the reply leaves the responder;
* broker, reply: the reply leaves the responder -> it reaches the caller;
* caller: the reply arrives -> the caller's next request leaves (decoding the reply, the
  benchmark's own loop, building and sending the next request).

Needs the broker on this machine and the right to open a packet socket (root or CAP_NET_RAW).
Only the benchmark's own connections are read (their ports, taken while it runs). Each figure
is the median over one run's round trips; the table shows the median over the rounds.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import pickle
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKET_OUTGOING = 4  # lo shows every packet twice; the outgoing copy is enough
SO_TIMESTAMPNS = 35
BODY = re.compile(rb'"n": ?(\d+)')  # benchmarks.request.body(): {"n": i, ...}
BASIC_ACK = b"\x00<\x00P"  # class 60 (basic), method 80 (ack): a publisher confirm
PARTS = ("broker, request", "responder", "broker, reply", "caller", "total", "confirm")

# A packet: (kernel timestamp, client port, "out" (to the broker) or "in", payload).
Packet = tuple[float, int, str, bytes]


# -- capture (a subprocess of its own, so that it takes no time from the caller) --------------


def broker_port() -> int:
    """The port of the benchmark's broker (see benchmarks/common.py)."""
    from .common import URL

    return urllib.parse.urlsplit(URL).port or 5672


def sniff(out: str) -> None:
    """Capture AMQP packets on lo until SIGTERM; pickle them to ``out``."""
    port = broker_port()
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
    sock.bind(("lo", 0))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024 * 1024)
    sock.settimeout(0.2)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    packets: list[Packet] = []
    print("CAPTURING", flush=True)
    while not stop.is_set():
        try:
            data, ancillary, _flags, address = sock.recvmsg(65600, 64)
        except TimeoutError:
            continue
        if address[2] == PACKET_OUTGOING:
            packet = _amqp(data, ancillary, port)
            if packet is not None:
                packets.append(packet)
    Path(out).write_bytes(pickle.dumps(packets))


def _amqp(data: bytes, ancillary: list[tuple[int, int, bytes]], port: int) -> Packet | None:
    """The AMQP payload of an IPv4 TCP packet to or from the broker's port, with its time."""
    if len(data) < 34 or data[12:14] != b"\x08\x00" or data[23] != 6:  # IPv4, TCP
        return None
    tcp = data[14 + (data[14] & 15) * 4 :]
    source, destination = struct.unpack("!HH", tcp[:4])
    payload = bytes(tcp[(tcp[12] >> 4) * 4 :])
    if not payload or port not in (source, destination):
        return None
    stamp = time.time()
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = struct.unpack("qq", value[:16])
            stamp = seconds + nanoseconds * 1e-9
    if destination == port:
        return stamp, source, "out", payload
    return stamp, destination, "in", payload


# -- one pair (a subprocess: the caller in it, the responder in another) -----------------------


def call_pika_confirmed(queue: str, callers: int, count: int) -> list[float]:
    """Raw pika with workerkit's guarantees on the request: confirmed, mandatory, through the
    benchmark exchange (``basic_publish`` returns at the confirm; a reply that comes first
    waits in pika's buffer). Shows what the broker's share costs with them."""
    import pika

    from . import request
    from .common import EXCHANGE, URL

    def caller() -> Any:
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        ch = conn.channel()
        ch.confirm_delivery()
        replies: dict[str, bytes] = {}

        def on_reply(_ch: Any, _method: Any, props: Any, payload: bytes) -> None:
            replies[props.correlation_id] = payload

        ch.basic_consume(request.DIRECT_REPLY_TO, on_reply, auto_ack=True)

        def call(i: int) -> Any:
            corr = uuid.uuid4().hex
            props = pika.BasicProperties(
                reply_to=request.DIRECT_REPLY_TO,
                correlation_id=corr,
                content_type="application/json",
                delivery_mode=2,
            )
            body = json.dumps(request.body(i)).encode()
            ch.basic_publish(EXCHANGE, queue, body, props, mandatory=True)
            while corr not in replies:
                conn.process_data_events(time_limit=1)
            return json.loads(replies.pop(corr))

        return call

    return request._threads(callers, count, caller)


def pair(responder: str, caller: str, count: int) -> None:
    """Run ``count`` round trips; report the client ports that talked to the broker."""
    import psutil

    from . import request
    from .common import EXCHANGE, declare_raw_queue, delete_queues, queue_name, report

    queue = queue_name(f"seg-{responder}-{caller}")
    if responder == "pika":  # so that workerkit's caller (through its exchange) reaches it
        declare_raw_queue(queue, bind_exchange=EXCHANGE)
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.request", "--serve", responder, queue],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    ports: set[int] = set()
    done = threading.Event()
    amqp = broker_port()

    def watch() -> None:  # the ports of both processes' connections to the broker
        while True:
            for process in (psutil.Process(), psutil.Process(server.pid)):
                for conn in process.net_connections("tcp"):
                    if conn.raddr and conn.raddr.port == amqp:
                        ports.add(conn.laddr.port)
            if done.wait(0.05):
                return

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "READY":
            raise RuntimeError(f"the {responder} responder did not start")
        watcher.start()
        callers = {**request.CALLERS, "pika_confirm": call_pika_confirmed}
        callers[caller](queue, 1, count)
    finally:
        done.set()
        server.terminate()
        server.wait(15)
        delete_queues(queue, f"{queue}.dlq")
    report(ports=sorted(ports))


# -- splitting the capture into round trips ----------------------------------------------------


def _round_trips(bodies: list[tuple[float, int, str]]) -> list[list[tuple[float, int]]]:
    """(time, port) of each round trip's four body-carrying packets: out on the caller's port,
    in on another (the delivery), out (the reply), in on the caller's port again. Anything
    else (a stray packet) starts over at the next request."""
    trips: list[list[tuple[float, int]]] = []
    trip: list[tuple[float, int]] = []
    for t, port, way in bodies:
        step = len(trip)
        if way == "out" and step != 2:
            trip = [(t, port)]  # a request (or, unexpectedly, one more: start over)
            continue
        expected = (
            (step == 1 and way == "in" and port != trip[0][1])
            or (step == 2 and way == "out")
            or (step == 3 and way == "in" and port == trip[0][1])
        )
        if not expected:
            continue
        trip.append((t, port))
        if len(trip) == 4:
            trips.append(trip)
    return trips


def split(packets: list[Packet], ports: set[int]) -> dict[str, float]:
    """The median of each part over the round trips found in ``packets`` (microseconds)."""
    packets = sorted(p for p in packets if p[1] in ports)
    trips = _round_trips(
        [(t, port, way) for t, port, way, payload in packets if BODY.search(payload)]
    )
    if len(trips) < 2:
        raise RuntimeError(f"only {len(trips)} round trips found in the capture")
    caller_port = statistics.mode(t[0][1] for t in trips)
    confirms = [
        t
        for t, port, way, payload in packets
        if way == "in" and port == caller_port and BASIC_ACK in payload[:12]
    ]
    parts: dict[str, list[float]] = {name: [] for name in PARTS}
    for this, following in itertools.pairwise(trips):
        sent, delivered, replied, answered = (t for t, _ in this)
        parts["broker, request"].append(delivered - sent)
        parts["responder"].append(replied - delivered)
        parts["broker, reply"].append(answered - replied)
        parts["caller"].append(following[0][0] - answered)
        parts["total"].append(following[0][0] - sent)
        i = bisect.bisect_left(confirms, sent)
        if i < len(confirms) and confirms[i] < following[0][0]:
            parts["confirm"].append(confirms[i] - sent)
    found = {name: statistics.median(v) * 1e6 for name, v in parts.items() if v}
    found["round trips"] = len(trips)
    return found


def _module(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.request_segments", *args]


def measure(responder: str, caller: str, count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "packets.pickle")
        with subprocess.Popen(
            [*_module("--sniff"), out],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        ) as capture:
            assert capture.stdout is not None and capture.stderr is not None
            if capture.stdout.readline().strip() != "CAPTURING":
                capture.wait(10)
                error = capture.stderr.read().strip().splitlines() or ["no output"]
                raise RuntimeError(f"cannot capture packets: {error[-1]}")
            try:
                done = subprocess.run(
                    [*_module("--pair"), responder, caller, str(count)],
                    capture_output=True,
                    text=True,
                    timeout=600,
                    cwd=ROOT,
                )
            finally:
                capture.terminate()
                capture.wait(30)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
        ports = set(json.loads(lines[-1].removeprefix("RESULT "))["ports"])
        packets: list[Packet] = pickle.loads(Path(out).read_bytes())
    return split(packets, ports)


def table(found: dict[str, list[dict[str, float]]]) -> str:
    head = "| responder / caller | " + " | ".join(PARTS) + " |"
    lines = [head, "|---" * (len(PARTS) + 1) + "|"]
    for name, runs in found.items():
        cells = []
        for part in PARTS:
            values = [r[part] for r in runs if part in r]
            cells.append(f"{statistics.median(values):,.0f}" if values else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict[str, float]]]:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--sniff"]:
        sniff(args[1])
        return {}
    if args[:1] == ["--pair"]:
        pair(args[1], args[2], int(args[3]))
        return {}
    parser = argparse.ArgumentParser(prog="python -m benchmarks.request_segments")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=1000, help="round trips per run")
    parser.add_argument("--pairs", default="wk/wk,pika/pika", help="RESPONDER/CALLER,...")
    options = parser.parse_args(args)
    found: dict[str, list[dict[str, float]]] = {}
    for rnd in range(options.rounds):
        for name in options.pairs.split(","):
            responder, caller = name.split("/")
            result: Any = measure(responder, caller, options.count)
            found.setdefault(name, []).append(result)
            parts = ", ".join(f"{k} {v:,.0f}" for k, v in result.items())
            print(f"round {rnd + 1} {name}: {parts}", flush=True)
    print()
    print("Medians over the rounds, microseconds:")
    print()
    print(table(found))
    return found


if __name__ == "__main__":
    main()
