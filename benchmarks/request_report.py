"""The request/reply and compression sections of docs/performance.md (see benchmarks/request.py).

``Results.request`` maps ``"<kind>-<callers>"`` (``wk-1``, ``pika-16``...) to ``{"rate", "p50",
"p99"}`` series; ``Results.compression`` maps a codec to ``{"rate", "wire_bytes", "body_bytes"}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Results, Series, Target

LABELS = {
    "wk": "workerkit `Publisher.request`, threads sharing one publisher",
    "pika": "raw pika, a BlockingConnection per calling thread",
    "faststream": "FastStream `broker.request`, tasks on one broker",
}


def _median(r: Results, key: str, what: str = "rate") -> float | None:
    found = r.request.get(key)
    return found[what].median if found and what in found else None


def targets(r: Results) -> list[Target]:
    from .report import Target

    rows = []
    for callers in sorted({int(k.rsplit("-", 1)[1]) for k in r.request}):
        wk = _median(r, f"wk-{callers}")
        rows.append(
            Target(
                f"request/reply, {callers} caller(s): workerkit / raw pika",
                wk,
                _median(r, f"pika-{callers}"),
                1.0,
            )
        )
        rows.append(
            Target(
                f"request/reply, {callers} caller(s): workerkit / FastStream",
                wk,
                _median(r, f"faststream-{callers}"),
                3.0,
            )
        )
    return rows


def tables(r: Results) -> list[str]:
    from .report import _table

    lines: list[str] = []
    rows = []
    for key, series in r.request.items():
        kind, callers = key.rsplit("-", 1)
        rows.append(_request_row(kind, callers, series))
    lines += _table(
        f"Request/reply over direct reply-to, {r.params.get('request_count', '?'):,} round"
        " trips per case, quorum queue, responder in its own process",
        "| caller and responder | callers | round trips/s | p50 (ms) | p99 (ms) |",
        rows,
    )
    rows = [
        f"| {codec} | {s['body_bytes'].cell()} | {s['wire_bytes'].cell()} | {s['rate'].cell()} |"
        for codec, s in r.compression.items()
    ]
    lines += _table(
        f"Compression: {r.params.get('compress_count', '?'):,} publishes of a ~20 KB JSON order"
        " through `Publisher(compression=...)`, publish_many, confirmed",
        "| compression | JSON bytes | body bytes on the wire | msg/s |",
        rows,
    )
    return lines


def _request_row(kind: str, callers: str, s: dict[str, Series]) -> str:
    return (
        f"| {LABELS.get(kind, kind)} | {callers} | {s['rate'].cell()} | {s['p50'].cell('{:.2f}')}"
        f" | {s['p99'].cell('{:.2f}')} |"
    )


def notes() -> list[str]:
    return [
        "- Request/reply: each case starts its responder in a subprocess (workerkit: a Worker",
        "  returning the body; raw pika: a consumer that replies and acks each; FastStream: a",
        "  subscriber returning the body), then each caller makes 20 warm-up round trips and",
        "  the timed ones; round trips/s is the count over the callers' mean busy time. The",
        "  workerkit caller confirms each request and publishes it mandatory; the raw pika",
        "  caller does neither (as a hand-written direct reply-to caller usually does).",
        "- Compression: bytes on the wire are the message body as published (headers and",
        "  framing excluded).",
        "",
    ]
