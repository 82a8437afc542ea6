"""Thumbnails for uploaded images: a plain ``def`` handler doing CPU work in the thread pool.

Run it with ``workerkit run workers.thumbnails:MakeThumbnail``.

Images are raw 8-bit grayscale pixels (to stay within the standard library); the thumbnail is a
box-filtered downscale written as a binary PGM file (any image viewer opens it) into the folder
named by ``THUMBNAILS_DIR`` (default ``/tmp/workerkit-demo/thumbnails``). The file name is the
image id plus a hash of its pixels, so a redelivered task rewrites the same file: idempotent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from pydantic import Base64Bytes, BaseModel, Field

from workerkit import Message, Reject, Worker

__all__ = ["ImageUploaded", "MakeThumbnail", "downscale", "pgm"]

log = logging.getLogger("workerkit.examples.thumbnails")

DEFAULT_DIR = "/tmp/workerkit-demo/thumbnails"


class ImageUploaded(BaseModel):
    """A thumbnail task: ``pixels`` is base64 of ``width * height`` grayscale bytes."""

    image_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    width: int = Field(ge=1, le=8192)
    height: int = Field(ge=1, le=8192)
    pixels: Base64Bytes
    max_side: int = Field(default=64, ge=1, le=1024)


class MakeThumbnail(Worker):
    queue = "thumbnails"
    bindings = ("images.uploaded",)
    # CPU-bound: a few threads are plenty; the broker keeps the rest.
    prefetch = 8
    concurrency = 2

    async def setup(self) -> None:
        self.folder = Path(os.environ.get("THUMBNAILS_DIR", DEFAULT_DIR))
        self.folder.mkdir(parents=True, exist_ok=True)

    def handle(self, image: ImageUploaded, message: Message) -> None:
        if len(image.pixels) != image.width * image.height:
            raise Reject(
                f"image {image.image_id}: {len(image.pixels)} bytes of pixels, "
                f"expected {image.width}x{image.height}"
            )
        scale = max(image.width, image.height) / image.max_side
        width = max(1, round(image.width / scale)) if scale > 1 else image.width
        height = max(1, round(image.height / scale)) if scale > 1 else image.height
        thumb = downscale(image.pixels, image.width, image.height, width, height)
        digest = hashlib.sha256(image.pixels).hexdigest()[:16]
        target = self.folder / f"{image.image_id}-{digest}.pgm"
        _write_atomically(target, pgm(thumb, width, height))
        log.info(
            "thumbnail %dx%d -> %dx%d written to %s",
            image.width,
            image.height,
            width,
            height,
            target,
            extra={"message_id": message.message_id},
        )


def downscale(pixels: bytes, width: int, height: int, new_width: int, new_height: int) -> bytes:
    """Box-filter ``pixels`` (row-major grayscale) down to ``new_width`` x ``new_height``."""
    out = bytearray(new_width * new_height)
    for ty in range(new_height):
        y0 = ty * height // new_height
        y1 = max((ty + 1) * height // new_height, y0 + 1)
        for tx in range(new_width):
            x0 = tx * width // new_width
            x1 = max((tx + 1) * width // new_width, x0 + 1)
            total = 0
            for y in range(y0, y1):
                row = y * width
                total += sum(pixels[row + x0 : row + x1])
            out[ty * new_width + tx] = total // ((y1 - y0) * (x1 - x0))
    return bytes(out)


def pgm(pixels: bytes, width: int, height: int) -> bytes:
    """A binary PGM (P5) image file."""
    return b"P5\n%d %d\n255\n" % (width, height) + pixels


def _write_atomically(target: Path, data: bytes) -> None:
    # A reader never sees half a file, and a redelivered task simply replaces it.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
