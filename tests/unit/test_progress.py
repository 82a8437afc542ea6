"""Progress output: a rich bar on a terminal, plain lines when piped, nothing for small work."""

from __future__ import annotations

import io
import time

import pytest

from workerkit.progress import MIN_TOTAL, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_output_is_plain_lines_ending_at_the_total() -> None:
    out = io.StringIO()
    with progress_bar("replaying x.dlq", out) as start:
        update = start(1500)
        for done in range(1, 1501):
            update(done)
    lines = out.getvalue().splitlines()
    assert lines[0] == "replaying x.dlq: 0/1500 (0%)"
    assert lines[-1] == "replaying x.dlq: 1500/1500 (100%)"
    assert "\x1b" not in out.getvalue()  # no terminal escapes in a pipe


def test_a_terminal_gets_a_rich_bar() -> None:
    out = Terminal()
    with progress_bar("replaying x.dlq", out) as start:
        update = start(1500)
        update(1500)
    text = out.getvalue()
    assert "replaying x.dlq" in text and "1500/1500" in text
    assert "━" in text  # the bar itself


def test_small_work_shows_nothing() -> None:
    for out in (io.StringIO(), Terminal()):
        with progress_bar("replaying", out) as start:
            start(MIN_TOTAL - 1)(MIN_TOTAL - 1)
        assert out.getvalue() == ""


def test_piped_lines_keep_coming_while_the_work_stalls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay blocked by a memory alarm: the count stays, the lines keep coming (a log that
    goes silent for minutes looks like a hang)."""
    import workerkit.progress

    monkeypatch.setattr(workerkit.progress, "PLAIN_EVERY", 0.02)
    out = io.StringIO()
    with progress_bar("replaying x.dlq", out) as start:
        update = start(2000)
        update(1)  # then nothing moves
        deadline = time.monotonic() + 10
        while out.getvalue().count("replaying x.dlq: 1/2000 (0%)") < 3:
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.01)
        update(2000)
    assert out.getvalue().splitlines()[-1] == "replaying x.dlq: 2000/2000 (100%)"
