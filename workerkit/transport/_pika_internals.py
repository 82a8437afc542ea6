"""Every use of pika's private names, in one module (the speed machinery).

pika is pinned below 1.5 because of what is here. ``check()`` names each private attribute the
fast path relies on; tests/unit/test_pika_internals.py calls it, so a pika release that renames
one fails the suite loudly instead of silently dropping the speed-up through a fallback.
"""

from __future__ import annotations

import asyncio
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

from . import turn_end

# Private names used below, by owner: class attributes and methods, then instance attributes
# (set in some constructor or method of the class or its bases). check() verifies all of them.
_PRIVATE: dict[type, tuple[str, ...]] = {
    AsyncioConnection: ("_output_marshaled_frames", "_adapter_emit_data"),
    _AsyncPlaintextTransport: ("_STATE_ACTIVE", "get_write_buffer_size"),
}
_PRIVATE_INSTANCE: dict[type, tuple[str, ...]] = {
    AsyncioConnection: ("_body_max_length", "_transport", "bytes_sent", "frames_sent"),
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


def remove_get_empty_callback(raw: PikaRawChannel, callback: Callable[[Any], None]) -> None:
    """Withdraw a one-shot Basic.GetEmpty callback once Basic.GetOk answered instead."""
    raw.callbacks.remove(raw.channel_number, Basic.GetEmpty, callback)


class BatchingConnection(AsyncioConnection):  # type: ignore[misc]
    """pika writes every frame with its own send(); this one writes a loop turn's frames at once.

    A publish is three frames and an ack one: batching cuts the syscalls per message several
    fold when many publishes or acks happen in one turn of the loop.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._wk_frames: list[bytes] = []
        self._wk_routes: dict[tuple[int, str, str, bool], bytes] = {}
        loop: asyncio.AbstractEventLoop = kwargs["custom_ioloop"]
        self._wk_loop = loop
        # The loop's owner may run callbacks at the end of its turn (the sync Publisher's
        # does): then the frames go out without a turn of their own.
        self._wk_turn_end = turn_end.hook_for(loop)
        super().__init__(*args, **kwargs)

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
        if len(frames) == 1 or all(len(frame) < BIG_FRAMES for frame in frames):
            self._wk_send(transport, frames[0] if len(frames) == 1 else b"".join(frames))
            return
        # A large body's frames are not joined with the rest (a copy of the body): each run
        # of small frames is, and the large ones go as they are, in order.
        small: list[bytes] = []
        for frame in frames:
            if len(frame) < BIG_FRAMES:
                small.append(frame)
                continue
            if small:
                self._wk_send(transport, b"".join(small))
                small = []
            self._wk_send(transport, frame)
        if small:
            self._wk_send(transport, b"".join(small))

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


def _body_frames(channel_number: int, body: bytes, step: int) -> bytes:
    """The body frames of a message as one ``bytes``: one copy of the body (joined from views),
    where pika's ``Body(...).marshal()`` makes two per frame (a slice, then the frame)."""
    view = memoryview(body)
    pieces: list[bytes | memoryview] = []
    for start in range(0, len(body), step):
        chunk = view[start : start + step]
        pieces += (_FRAME_HEAD.pack(pika.spec.FRAME_BODY, channel_number, len(chunk)), chunk, _END)
    return b"".join(pieces)
