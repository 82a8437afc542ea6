"""Progress output: a rich bar on a terminal, plain lines when piped, nothing for small work."""

from __future__ import annotations

import io

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
