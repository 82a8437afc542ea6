"""Body compression: what a publisher applies and what every decoder undoes.

Producers choose (``Publisher(compression="gzip")`` or ``WORKERKIT_COMPRESSION``) and mark the
body with the AMQP ``content-encoding`` property; consumers undo whatever it names, whichever
client sent it:

* ``gzip`` (the stdlib's zlib; ``x-gzip`` is read too),
* ``zstd`` (the optional ``zstandard`` package: ``pip install 'workerkit[zstd]'``),
* ``identity``/none: the body as it is.

Decompression streams with a cap: it never produces more than ``limit`` bytes, so a small
"zip bomb" fails with :class:`~workerkit.errors.DecodeError` (and goes to the DLQ as
``invalid``) without inflating. An encoding workerkit does not know is a ``DecodeError`` naming it.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, Literal

from .errors import ConfigurationError, DecodeError

__all__ = ["CODECS", "Compression", "compress", "decompress"]

Compression = Literal["none", "gzip", "zstd"]
CODECS = ("gzip", "zstd")
# content-encoding values that mean "not compressed" (utf-8: some clients label text this way).
PLAIN = frozenset({"", "identity", "utf-8", "UTF-8"})
_GZIP_NAMES = frozenset({"gzip", "x-gzip"})
# Level 6 (the zlib default) halves the CPU of level 9 for a few percent of size; zstd's 3 is its
# own default: fast with a better ratio than gzip.
GZIP_LEVEL = 6
ZSTD_LEVEL = 3


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def check_codec(name: str) -> None:
    """ConfigurationError unless ``name`` can be used to compress here and now."""
    if name not in ("none", *CODECS):
        raise ConfigurationError(f"compression must be one of none, gzip, zstd; got {name!r}")
    if name == "zstd" and _zstandard() is None:
        raise ConfigurationError(
            "compression='zstd' needs the zstandard package: pip install 'workerkit[zstd]'"
        )


def compress(body: bytes, codec: str) -> bytes:
    """``body`` compressed with ``codec`` (``gzip`` or ``zstd``, checked by :func:`check_codec`)."""
    if codec == "gzip":
        # zlib with a gzip header (wbits 31): gzip.compress's format, without its file object.
        packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        return packer.compress(body) + packer.flush()
    return bytes(_zstandard().ZstdCompressor(level=ZSTD_LEVEL).compress(body))


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decoded from its ``content-encoding``; DecodeError past ``limit`` bytes, for a
    corrupt body, or for an encoding that is not known (the message goes to the DLQ)."""
    if encoding in PLAIN:
        return body
    if encoding in _GZIP_NAMES:
        return _gunzip(body, limit)
    if encoding == "zstd":
        return _unzstd(body, limit)
    raise DecodeError(
        f"unsupported content-encoding {encoding!r} (workerkit reads gzip, zstd and identity)"
    )


def _too_large(limit: int) -> DecodeError:
    return DecodeError(f"decompressed body is above max_body_size={limit} bytes")


def _gunzip(body: bytes, limit: int) -> bytes:
    out = bytearray()
    data = body
    while True:  # a gzip body may be several members end to end
        unpacker = zlib.decompressobj(31)
        try:
            out += unpacker.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise DecodeError(f"corrupt gzip body: {exc}") from None
        if len(out) > limit:
            raise _too_large(limit)
        if not unpacker.eof:
            if unpacker.unconsumed_tail:  # stopped at the cap with input left: too large
                raise _too_large(limit)
            raise DecodeError("truncated gzip body")
        data = unpacker.unused_data
        if not data:
            return bytes(out)


def _unzstd(body: bytes, limit: int) -> bytes:
    zstandard = _zstandard()
    if zstandard is None:
        raise DecodeError(
            "content-encoding 'zstd' needs the zstandard package: pip install 'workerkit[zstd]'"
        )
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(body), read_across_frames=True
        )
        out = reader.read(limit + 1)  # never more than the cap plus one byte is inflated
    except zstandard.ZstdError as exc:
        raise DecodeError(f"corrupt zstd body: {exc}") from None
    if len(out) > limit:
        raise _too_large(limit)
    return bytes(out)
