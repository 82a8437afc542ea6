"""workerkit.signals: which stop signals are a new request and which one request twice."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from workerkit import signals
from workerkit.signals import ECHO_WINDOW, StopRequests


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(signals, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_the_same_signal_again_at_once_is_one_request(clock: list[float]) -> None:
    requests = StopRequests()
    assert requests.count(signal.SIGTERM) == 1
    clock[0] += 0.001  # GNU timeout: the command, then its whole process group
    assert requests.count(signal.SIGTERM) is None
    clock[0] += ECHO_WINDOW  # a person sending it again
    assert requests.count(signal.SIGTERM) == 2


def test_another_signal_at_once_is_another_request(clock: list[float]) -> None:
    requests = StopRequests()
    assert requests.count(signal.SIGINT) == 1
    assert requests.count(signal.SIGTERM) == 2
    assert requests.count(signal.SIGINT) == 3
