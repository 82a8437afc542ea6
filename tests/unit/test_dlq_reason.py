"""The reason a DLQ entry shows when the broker, not workerkit, dead-lettered it."""

from __future__ import annotations

from workerkit.dlq import dead_letter_from
from workerkit.message import Message


def test_expired_from_x_death() -> None:
    headers = {
        "x-death": [{"reason": b"expired", "queue": b"orders", "count": 1}],
        "x-first-death-reason": b"expired",
    }
    assert dead_letter_from(Message(b"{}", headers=headers)).reason == "expired"


def test_the_latest_death_wins_over_an_earlier_one_in_the_delay_queues() -> None:
    # A scheduled publish first expired out of a delay level, then hit the delivery limit.
    headers = {
        "x-death": [
            {"reason": b"delivery_limit", "queue": b"orders", "count": 1},
            {"reason": b"expired", "queue": b"wkt.delay.03", "count": 1},
        ],
        "x-first-death-reason": b"expired",
    }
    assert dead_letter_from(Message(b"{}", headers=headers)).reason == "delivery-limit"


def test_workerkit_reason_first() -> None:
    headers = {"workerkit-reason": "rejected", "x-first-death-reason": b"expired"}
    assert dead_letter_from(Message(b"{}", headers=headers)).reason == "rejected"
