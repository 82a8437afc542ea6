"""The timings the runtime keeps for metrics (workerkit/stats.py): the runtime's inlined copy of
``Timings.observe`` counts exactly what the reference does, for every kind of delivery."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pika.compat
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workerkit import runtime as runtime_module
from workerkit.decision import Outcome
from workerkit.message import Message
from workerkit.runtime import WorkerRuntime
from workerkit.stats import HANDLER_BUCKETS, LAG_BUCKETS, PUBLISHED_AT_HEADER, Timings

NOW = 1_764_489_600.0  # the wall clock when a delivery is carried out
CLOCK = 5_000.0  # the runtime's clock (time.monotonic) then
OFFSET = NOW - CLOCK  # the runtime's wall_offset: wall clock minus its clock

# Publish times around NOW (lags from negative, a publisher's clock ahead, to hours), durations
# from sub-microsecond to minutes: every bucket and the clamp at 0 are reached.
offsets = st.floats(min_value=-30.0, max_value=5000.0, allow_nan=False)
published_at = st.one_of(
    st.none(),  # no header
    offsets.map(lambda ago: int((NOW - ago) * 1000)),
    # What the header is off the wire: pika decodes 64-bit integers as its int subclass.
    offsets.map(lambda ago: pika.compat.long(int((NOW - ago) * 1000))),
    st.booleans(),  # not a publish time
    st.text(max_size=5),
)
deliveries = st.fixed_dictionaries(
    {
        "sent": published_at,
        "timestamp": st.one_of(st.none(), offsets.map(lambda ago: int(NOW - ago))),
        "redelivered": st.booleans(),
        "republished": st.booleans(),
        "duration": st.one_of(
            st.floats(min_value=1e-7, max_value=2.0), st.floats(min_value=2.0, max_value=300.0)
        ),
    }
)


def _message(case: dict[str, Any]) -> Message:
    headers = {} if case["sent"] is None else {PUBLISHED_AT_HEADER: case["sent"]}
    message = Message(
        b"{}", headers=headers, timestamp=case["timestamp"], redelivered=case["redelivered"]
    )
    message._republished = case["republished"]
    return message


@settings(max_examples=300, deadline=None)
@given(st.lists(deliveries, min_size=1, max_size=20))
def test_the_runtimes_inlined_timings_are_timings_observe(
    cases: list[dict[str, Any]],
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime_module, "_clock", lambda: CLOCK)
        runtime = SimpleNamespace(
            outcomes=dict.fromkeys(Outcome, 0),
            timings=Timings(),
            _after_hooks=(),
            wall_offset=OFFSET,
        )
        reference = Timings()
        for case in cases:
            message = _message(case)
            began = message._began = CLOCK - case["duration"]
            WorkerRuntime._finished(runtime, message, Outcome.ACKED)  # type: ignore[arg-type]
            # What the runtime measured: the duration, and when its slot took the delivery.
            reference.observe(_message(case), CLOCK - began, began + OFFSET)
    kept = runtime.timings
    assert kept.handler.counts == reference.handler.counts
    assert kept.handler.sum == reference.handler.sum
    assert kept.lag.counts == reference.lag.counts
    assert kept.lag.sum == reference.lag.sum
    assert runtime.outcomes[Outcome.ACKED] == len(cases)


def test_observe_counts_each_value_in_its_bucket_and_the_lag_by_its_rules() -> None:
    timings = Timings()
    sent_ms = int((NOW - 2.0) * 1000)
    first = Message(b"x", headers={PUBLISHED_AT_HEADER: sent_ms})
    assert timings.observe(first, 0.5, NOW - 0.5) == pytest.approx(1.5)
    assert timings.observe(Message(b"x", timestamp=int(NOW) - 10), 0.0, NOW) == 10.0
    ahead = Message(b"x", headers={PUBLISHED_AT_HEADER: int(NOW * 1000) + 5000})
    assert timings.observe(ahead, 0.001, NOW) == 0.0  # the publisher's clock ahead of ours
    retried = Message(b"x", headers={PUBLISHED_AT_HEADER: sent_ms})
    retried._republished = True
    assert timings.observe(retried, 0.001, NOW) is None
    assert timings.observe(Message(b"x", timestamp=1, redelivered=True), 0.001, NOW) is None
    assert timings.observe(Message(b"x", headers={PUBLISHED_AT_HEADER: True}), 0.001, NOW) is None
    wire = Message(b"x", headers={PUBLISHED_AT_HEADER: pika.compat.long(sent_ms)})
    assert timings.observe(wire, 0.0, NOW) == pytest.approx(2.0)  # as a consumer decodes it
    assert sum(timings.handler.counts) == 7
    # le=b holds values <= b: 0.001 is in the first bucket, 0.5 in the 0.5 one, 0.0 first.
    assert timings.handler.counts[0] == 6
    assert timings.handler.counts[HANDLER_BUCKETS.index(0.5)] == 1
    assert timings.lag.counts[LAG_BUCKETS.index(5.0)] == 2  # 1.5 s, 2 s
    assert timings.lag.counts[LAG_BUCKETS.index(10.0)] == 1  # 10 s
    assert timings.lag.counts[0] == 1  # 0 s
    assert timings.lag.sum == pytest.approx(13.5)
