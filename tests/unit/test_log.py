"""Log lines: one per event, plain or JSON, carrying worker, queue and message id."""

from __future__ import annotations

import logging

import orjson
import pytest

from workerkit.log import configure_logging


@pytest.fixture
def restore_logging() -> object:
    logger = logging.getLogger("workerkit")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def _emit(capsys: pytest.CaptureFixture[str], fmt: str) -> str:
    configure_logging("INFO", fmt)
    logging.getLogger("workerkit.runner").warning(
        "handler failed; retrying in %.1fs",
        1.5,
        extra={"worker": "SendReceipt", "queue": "receipts", "message_id": "m-1", "attempt": 2},
    )
    logging.getLogger("workerkit.runner").debug("not shown at INFO")
    return capsys.readouterr().err


def test_plain_line_carries_the_context(
    capsys: pytest.CaptureFixture[str], restore_logging: object
) -> None:
    out = _emit(capsys, "plain")
    [line] = out.splitlines()
    assert "WARNING" in line and "handler failed; retrying in 1.5s" in line
    assert "worker=SendReceipt queue=receipts message_id=m-1 attempt=2" in line


def test_json_line_is_one_object_with_the_context(
    capsys: pytest.CaptureFixture[str], restore_logging: object
) -> None:
    out = _emit(capsys, "json")
    [line] = out.splitlines()
    record = orjson.loads(line)
    assert record["level"] == "warning"
    assert record["msg"] == "handler failed; retrying in 1.5s"
    assert (record["worker"], record["queue"], record["message_id"], record["attempt"]) == (
        "SendReceipt",
        "receipts",
        "m-1",
        2,
    )


def test_your_own_logger_carries_the_log_context_through_workerkit_formatters() -> None:
    """docs/observability.md: a handler with workerkit's formatter on your own logger."""
    from workerkit.log import JsonFormatter, PlainFormatter, log_context

    record = logging.LogRecord("myapp.timing", logging.INFO, __file__, 1, "took %ss", (1.2,), None)
    token = log_context.set({"tenant": "acme"})
    try:
        plain, as_json = PlainFormatter().format(record), JsonFormatter().format(record)
    finally:
        log_context.reset(token)
    assert plain.endswith("myapp.timing: took 1.2s [tenant=acme]")
    assert orjson.loads(as_json)["tenant"] == "acme"
