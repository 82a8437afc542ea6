"""Compression: the codecs, the capped decompression, and what publishers set."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import orjson
import pytest
import zstandard

from workerkit import AsyncPublisher, ConfigurationError, Settings
from workerkit.compression import compress, decompress
from workerkit.errors import DecodeError
from workerkit.message import Message, build_outgoing, decoder_for
from workerkit.reply import OK, REPLY_HEADER, decode_reply

BODY = orjson.dumps({"rows": [{"id": i, "name": "widget"} for i in range(200)]})


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_round_trip_and_the_cap(codec: str) -> None:
    packed = compress(BODY, codec)
    assert len(packed) < len(BODY) / 4
    assert decompress(packed, codec, len(BODY)) == BODY
    with pytest.raises(DecodeError, match="above max_body_size"):
        decompress(packed, codec, len(BODY) - 1)


def test_a_bomb_is_refused_without_inflating() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = packer.compress(bytes(50_000_000)) + packer.flush()
    with pytest.raises(DecodeError, match="above max_body_size=1000"):
        decompress(bomb, "gzip", 1000)
    zbomb = zstandard.ZstdCompressor().compress(bytes(50_000_000))
    with pytest.raises(DecodeError, match="above max_body_size=1000"):
        decompress(zbomb, "zstd", 1000)


def test_bad_bodies_and_encodings() -> None:
    with pytest.raises(DecodeError, match="unsupported content-encoding 'br'"):
        decompress(b"x", "br", 100)
    with pytest.raises(DecodeError, match="corrupt gzip"):
        decompress(b"not gzip at all", "gzip", 100)
    with pytest.raises(DecodeError, match="truncated gzip"):
        decompress(gzip.compress(BODY)[:-20], "gzip", 10**6)
    with pytest.raises(DecodeError, match="corrupt zstd"):
        decompress(b"not zstd", "zstd", 100)
    # several gzip members end to end, as some clients send them
    assert decompress(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 10) == b"abcd"
    assert decompress(b"plain", "identity", 10) == b"plain"


@pytest.mark.parametrize("annotation", [list, Any, str, bytes, list[dict[str, Any]]])
def test_every_decoder_decompresses(annotation: Any) -> None:
    body = orjson.dumps([{"a": 1}])
    decode = decoder_for(annotation, 1000)
    for codec in ("gzip", "zstd"):
        message = Message(
            compress(body, codec), content_type="application/json", content_encoding=codec
        )
        value = decode(message)
        assert value == {"str": body.decode(), "bytes": body}.get(
            getattr(annotation, "__name__", ""), [{"a": 1}]
        )
    unknown = Message(body, content_type="application/json", content_encoding="compress")
    with pytest.raises(DecodeError, match="unsupported content-encoding 'compress'"):
        decode(unknown)


def test_build_outgoing_compresses_from_the_minimum_size_and_checks_the_raw_size() -> None:
    def out(body: Any, **kw: Any) -> Any:
        return build_outgoing("x", "k", body, max_body_size=len(BODY), **kw)

    big = out(orjson.loads(BODY), compression="gzip", compress_min_size=1024)
    assert big.properties.content_encoding == "gzip" and gzip.decompress(big.body) == BODY
    small = out({"a": 1}, compression="gzip", compress_min_size=1024)
    assert small.properties.content_encoding is None and small.body == b'{"a":1}'
    assert out(orjson.loads(BODY)).properties.content_encoding is None
    from workerkit import MessageTooLarge

    with pytest.raises(MessageTooLarge):  # the cap is the size a consumer will decode
        build_outgoing("x", "k", BODY + b" ", max_body_size=len(BODY), compression="gzip")


def test_publisher_compression_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERKIT_COMPRESSION", "zstd")
    monkeypatch.setenv("WORKERKIT_COMPRESS_MIN_SIZE", "10")
    settings = Settings()
    assert settings.compression == "zstd" and settings.compress_min_size == 10
    assert AsyncPublisher(settings=settings)._core.compression == "zstd"
    assert AsyncPublisher(settings=settings, compression="none")._core.compression == "none"
    with pytest.raises(ConfigurationError, match="compression must be one of"):
        AsyncPublisher(settings=settings, compression="lz4")  # type: ignore[arg-type]
    monkeypatch.setenv("WORKERKIT_COMPRESSION", "brotli")
    with pytest.raises(ConfigurationError):
        Settings()


def test_compressed_replies_are_decoded() -> None:
    reply = Message(
        compress(b'{"price": 7}', "zstd"),
        headers={REPLY_HEADER: OK},
        content_type="application/json",
        content_encoding="zstd",
    )
    assert decode_reply(reply) == {"price": 7}
