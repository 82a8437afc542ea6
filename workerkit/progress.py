"""Progress of long CLI work: a rich progress bar on a terminal, plain lines when piped.

Both go to stderr, so stdout keeps only the command's result. Work on fewer than
:data:`MIN_TOTAL` items shows nothing: it is over before a bar would help.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

__all__ = ["MIN_TOTAL", "progress_bar", "spinner"]

MIN_TOTAL = 1000
PLAIN_EVERY = 2.0  # seconds between plain lines


@contextlib.contextmanager
def progress_bar(
    what: str, stream: TextIO | None = None
) -> Iterator[Callable[[int], Callable[[int], None]]]:
    """Yields ``start(total)``, which returns ``update(done)``; the bar ends with the block."""
    out = stream if stream is not None else sys.stderr
    with contextlib.ExitStack() as stack:

        def start(total: int) -> Callable[[int], None]:
            if total < MIN_TOTAL:
                return _ignore
            if out.isatty():
                return stack.enter_context(_rich(what, total, out))
            return stack.enter_context(_plain(what, total, out))

        yield start


def _ignore(_done: int) -> None:
    pass


@contextlib.contextmanager
def _rich(what: str, total: int, out: TextIO) -> Iterator[Callable[[int], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        f"{what}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(file=out),
        transient=False,
    )
    task = bar.add_task(what, total=total)
    with bar:
        yield lambda done: bar.update(task, completed=done)


class _Plain:
    """A line every PLAIN_EVERY seconds, from a timer, so that a stall (a broker blocked by an
    alarm) shows as the same count again instead of silence; and the last one."""

    def __init__(self, what: str, total: int, out: TextIO) -> None:
        self.what, self.total, self.out = what, total, out
        self.done = 0
        self.shown = -1
        self.lock = threading.Lock()  # the timer's thread and the last line

    def show(self) -> None:
        with self.lock:
            done = self.done
            percent = 100 * done // max(1, self.total)
            self.out.write(f"{self.what}: {done}/{self.total} ({percent}%)\n")
            self.out.flush()
            self.shown = done

    def update(self, done: int) -> None:
        self.done = done  # an int store: read whole by the timer's thread

    def every(self, stop: threading.Event) -> None:
        while not stop.wait(PLAIN_EVERY):
            self.show()


@contextlib.contextmanager
def _plain(what: str, total: int, out: TextIO) -> Iterator[Callable[[int], None]]:
    lines = _Plain(what, total, out)
    lines.show()
    stop = threading.Event()
    timer = threading.Thread(target=lines.every, args=(stop,), name="workerkit-progress")
    timer.daemon = True
    timer.start()
    try:
        yield lines.update
    finally:
        stop.set()
        timer.join()
    if lines.shown != lines.done:
        lines.show()


@contextlib.contextmanager
def spinner(what: str, stream: TextIO | None = None) -> Iterator[None]:
    """For one long broker operation with no steps to count: a spinner on a terminal only."""
    out = stream if stream is not None else sys.stderr
    if not out.isatty():
        yield
        return
    from rich.console import Console

    with Console(file=out).status(what):
        yield
