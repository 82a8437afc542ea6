"""Every use of pika's private names, in one module (the speed machinery).

pika is pinned below 1.5 because of what is here. ``check()`` names each private attribute the
fast path relies on; tests/unit/test_pika_internals.py calls it, so a pika release that renames
one fails the suite loudly instead of silently dropping the speed-up through a fallback.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import struct
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions as px
import pika.frame
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport
from pika.channel import Channel as PikaRawChannel
from pika.spec import Basic, BasicProperties

from ..message import Message
from . import _fastframes, turn_end

# Private names used below, by owner: class attributes and methods, then instance attributes
# (set in some constructor or method of the class or its bases). check() verifies all of them.
_PRIVATE: dict[type, tuple[str, ...]] = {
    AsyncioConnection: (
        "_output_marshaled_frames",
        "_adapter_emit_data",
        # The fast consume path (_fastframes.py): pika's transport hands received bytes to
        # _on_data_available; frames the fast path does not take go to _process_frame.
        "_on_data_available",
        "_process_frame",
    ),
    _AsyncPlaintextTransport: ("_STATE_ACTIVE", "get_write_buffer_size", "_MAX_RECV_BYTES"),
}
_PRIVATE_INSTANCE: dict[type, tuple[str, ...]] = {
    AsyncioConnection: (
        "_body_max_length",
        "_transport",
        "bytes_sent",
        "frames_sent",
        "_frame_buffer",
        "bytes_received",
        "frames_received",
    ),
    _AsyncPlaintextTransport: ("_sock", "_state"),
    PikaRawChannel: ("callbacks", "channel_number"),
}
_ACTIVE = getattr(_AsyncPlaintextTransport, "_STATE_ACTIVE", object())


def check() -> list[str]:
    """The private names this module needs that the installed pika lacks (empty when all good)."""
    missing = [
        f"{owner.__name__}.{name}"
        for owner, names in _PRIVATE.items()
        for name in names
        if not hasattr(owner, name)
    ]
    for owner, names in _PRIVATE_INSTANCE.items():
        source = "".join(_source(cls) for cls in owner.__mro__ if cls.__module__.startswith("pika"))
        missing.extend(
            f"{owner.__name__}.{name}"
            for name in names
            if f"self.{name} =" not in source and f"self.{name}:" not in source
        )
    return missing


def _missing_on(connection: Any) -> list[str]:
    """What a live connection lacks of the names the fast path uses (cheap: no source read;
    ``check()`` is the thorough version the tests run)."""
    missing = [
        f"{owner.__name__}.{name}"
        for owner, names in _PRIVATE.items()
        for name in names
        if not hasattr(owner, name)
    ]
    missing.extend(
        f"AsyncioConnection.{name}"
        for name in _PRIVATE_INSTANCE[AsyncioConnection]
        if not hasattr(connection, name)
    )
    return missing


def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


_warned = False
log = logging.getLogger("workerkit.transport")


def _warn_slow_path() -> None:
    """Say once that this pika no longer has what the direct send needs (it still works)."""
    global _warned
    _warned = True
    log.warning(
        "pika %s has no _AsyncPlaintextTransport._sock: frames go through pika's own (slower)"
        " send path; workerkit.transport._pika_internals needs updating for this release",
        pika.__version__,
    )


def _fast_path_chosen(connection: Any) -> bool:
    """Whether a new connection reads deliveries itself, said once per connection."""
    if not _fastframes.ENABLED:
        log.info("fast consume path off: deliveries go through pika's decoder")
        return False
    missing = _missing_on(connection)
    if missing:
        log.warning(
            "pika %s lacks %s: deliveries go through pika's own (slower) decoder;"
            " workerkit.transport._pika_internals needs updating for this release",
            pika.__version__,
            ", ".join(missing),
        )
        return False
    log.debug("fast consume path on")
    return True


def remove_get_empty_callback(raw: PikaRawChannel, callback: Callable[[Any], None]) -> None:
    """Withdraw a one-shot Basic.GetEmpty callback once Basic.GetOk answered instead."""
    raw.callbacks.remove(raw.channel_number, Basic.GetEmpty, callback)


# Bytes per recv() once the fast path reads: pika's 4096 took a system call (and a pass through
# its read loop) per ~16 small deliveries.
RECV_BYTES = 65536


def consume_fast(
    raw: PikaRawChannel, consumer_tag: str, on_message: Callable[[Message], None]
) -> None:
    """Let the connection's fast path take this consumer's deliveries (when it is on)."""
    connection = raw.connection
    if isinstance(connection, BatchingConnection):
        connection.wk_register(raw.channel_number, consumer_tag, on_message)


def stop_fast(raw: PikaRawChannel, consumer_tag: str | None = None) -> None:
    """Hand a consumer's later deliveries (all of the channel's with no tag) back to pika."""
    connection = raw.connection
    reader = getattr(connection, "_wk_reader", None)
    if reader is None:
        return
    if consumer_tag is None:
        reader.forget(raw.channel_number)
    else:
        reader.unregister(raw.channel_number, consumer_tag)


def receiver(connection: AsyncioConnection) -> Callable[[bytes], None]:
    """Where the connection's transport hands the bytes it received (benchmarks/frames.py feeds
    recorded frames through it, as the socket would)."""
    receive: Callable[[bytes], None] = connection._on_data_available
    return receive


def acker(raw: PikaRawChannel) -> Callable[[int, bool], None]:
    """``ack(delivery_tag, multiple)`` for an open channel: one packed frame on the fast path,
    pika's ``basic_ack`` otherwise."""
    connection = raw.connection
    if isinstance(connection, BatchingConnection) and connection.wk_fast:
        return functools.partial(connection.wk_send_ack, raw.channel_number)
    return raw.basic_ack  # type: ignore[no-any-return]


class BatchingConnection(AsyncioConnection):  # type: ignore[misc]
    """pika writes every frame with its own send(); this one writes a loop turn's frames at once.

    A publish is three frames and an ack one: batching cuts the syscalls per message several
    fold when many publishes or acks happen in one turn of the loop.

    It also reads: with the fast path on (``wk_fast``, decided once when the connection is made
    and logged), the first fast consumer makes a :class:`_fastframes.FrameReader` the reader
    of everything this connection receives.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._wk_reader: _fastframes.FrameReader | None = None
        self._wk_frames: list[bytes] = []
        self._wk_routes: dict[tuple[int, str, str, bool], bytes] = {}
        loop: asyncio.AbstractEventLoop = kwargs["custom_ioloop"]
        self._wk_loop = loop
        # The loop's owner may run callbacks at the end of its turn (the sync Publisher's
        # does): then the frames go out without a turn of their own.
        self._wk_turn_end = turn_end.hook_for(loop)
        super().__init__(*args, **kwargs)
        self.wk_fast = _fast_path_chosen(self)

    # -- the fast consume path ------------------------------------------------------------------

    def _on_data_available(self, data_in: bytes) -> None:
        reader = self._wk_reader
        if reader is None:
            super()._on_data_available(data_in)
            return
        frames = reader.frames
        self.bytes_received += reader.feed(data_in)
        self.frames_received += reader.frames - frames

    def _wk_to_pika(self, frame_bytes: bytes) -> None:
        """One whole frame the fast path does not take, through pika's own decoder."""
        _consumed, value = pika.frame.decode_frame(frame_bytes)
        self._process_frame(value)

    def wk_register(
        self, channel_number: int, consumer_tag: str, on_message: Callable[[Message], None]
    ) -> None:
        if not self.wk_fast:
            return
        reader = self._wk_reader
        if reader is None:
            reader = _fastframes.FrameReader(self._wk_to_pika)
            # Called between two reads (from a coroutine, never inside one): the start of a
            # frame pika holds moves over, and from now on every byte goes through the reader.
            buffered: bytes = getattr(self, "_frame_buffer", b"")
            reader.prepend(buffered)
            self._frame_buffer = b""
            transport = self._transport
            if type(transport) is _AsyncPlaintextTransport:
                transport._MAX_RECV_BYTES = RECV_BYTES
            self._wk_reader = reader
        reader.register(channel_number, consumer_tag, on_message)

    def wk_send_ack(self, channel_number: int, delivery_tag: int, multiple: bool = False) -> None:
        if self.is_closed:
            raise px.ConnectionWrongStateError("acking on a closed connection")
        self._output_marshaled_frames(
            (_fastframes.ack_frame(channel_number, delivery_tag, multiple),)
        )

    # -- writing ---------------------------------------------------------------------------------

    def _output_marshaled_frames(self, marshaled_frames: Any) -> None:
        frames = self._wk_frames
        if not frames:
            if self._wk_turn_end is not None:
                self._wk_turn_end(self._wk_flush)
            else:
                self._wk_loop.call_soon(self._wk_flush)
        for frame in marshaled_frames:
            self.bytes_sent += len(frame)
            self.frames_sent += 1
            frames.append(frame)

    def publish_frames(
        self,
        channel_number: int,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        props: BasicProperties,
        body: bytes,
    ) -> list[bytes]:
        """The frames of a ``basic.publish``, built with pika's own classes, not yet sent.

        Building first means a value the client cannot encode fails before a byte is written.
        Only the Basic.Publish frame of a route is built once and reused, because a publisher
        sends to a few routes over and over.
        """
        key = (channel_number, exchange, routing_key, mandatory)
        method = self._wk_routes.get(key)
        if method is None:
            publish = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
            method = pika.frame.Method(channel_number, publish).marshal()
            if len(self._wk_routes) >= 1024:
                self._wk_routes.clear()
            self._wk_routes[key] = method
        frames: list[bytes] = [
            method,
            pika.frame.Header(channel_number, len(body), props).marshal(),
        ]
        step = self._body_max_length
        if len(body) > step:
            frames.append(_body_frames(channel_number, body, step))
        elif body:
            frames.append(pika.frame.Body(channel_number, body).marshal())
        return frames

    def send_frames(self, frames: list[bytes]) -> None:
        if self.is_closed:
            raise px.ConnectionWrongStateError("publishing on a closed connection")
        self._output_marshaled_frames(frames)

    def _wk_flush(self) -> None:
        frames, self._wk_frames = self._wk_frames, []
        transport = self._transport
        if not frames or transport is None:
            return
        for data in writes(frames):
            self._wk_send(transport, data)

    def _wk_send(self, transport: Any, data: bytes | memoryview) -> None:
        sock = getattr(transport, "_sock", None)
        plain = type(transport) is _AsyncPlaintextTransport
        if plain and not _warned and not hasattr(transport, "_sock"):
            _warn_slow_path()  # renamed in this pika (None only means closing)
        if (
            sock is not None
            and plain
            and transport.get_write_buffer_size() == 0
            and getattr(transport, "_state", None) == _ACTIVE
        ):
            # pika would wait a loop turn for writability (and pay two epoll_ctl calls) to send
            # what a non-blocking send takes now; only a remainder goes through its buffer.
            try:
                sent = sock.send(data)
            except OSError:  # would block, or broken: pika's own send sees to it
                sent = 0
            if sent == len(data):
                return
            # What is left, as a view: pika's partial sends slice it again (a copy each time
            # of bytes, none of a view).
            data = memoryview(data)[sent:]
        self._adapter_emit_data(data)


# A frame at least this large (the body frames of a large message, built as one) is written
# without being joined to its neighbours.
BIG_FRAMES = 256 * 1024
_FRAME_HEAD = struct.Struct(">BHI")
_END = bytes((pika.spec.FRAME_END,))


def writes(frames: list[bytes]) -> list[bytes]:
    """The writes that send ``frames`` in order: small frames joined, a large body's frames as
    they are (joining them would copy the body)."""
    if len(frames) == 1:
        return frames
    if all(len(frame) < BIG_FRAMES for frame in frames):
        return [b"".join(frames)]
    out: list[bytes] = []
    small: list[bytes] = []
    for frame in frames:
        if len(frame) < BIG_FRAMES:
            small.append(frame)
            continue
        if small:
            out.append(b"".join(small))
            small = []
        out.append(frame)
    if small:
        out.append(b"".join(small))
    return out


def _body_frames(channel_number: int, body: bytes, step: int) -> bytes:
    """The body frames of a message as one ``bytes``: one copy of the body (joined from views),
    where pika's ``Body(...).marshal()`` makes two per frame (a slice, then the frame)."""
    view = memoryview(body)
    pieces: list[bytes | memoryview] = []
    for start in range(0, len(body), step):
        chunk = view[start : start + step]
        pieces += (_FRAME_HEAD.pack(pika.spec.FRAME_BODY, channel_number, len(chunk)), chunk, _END)
    return b"".join(pieces)
