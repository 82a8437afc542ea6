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


def test_a_scheduled_message_no_queue_took_says_so_with_its_own_routing_key() -> None:
    """In <exchange>.unroutable: not "expired" under the delay layout's routing key (found by
    a new-user check), but what the publisher asked for."""
    route = "p." + ".".join(["0"] * 26 + ["1", "1"]) + ".orders.nobody"
    headers = {
        "x-death": [
            {"reason": b"expired", "queue": b"wkt.delay.01", "routing-keys": [route.encode()]}
        ],
        "x-first-death-reason": b"expired",
        "x-first-death-exchange": b"wkt.delay.01",
    }
    dead = dead_letter_from(Message(b"{}", headers=headers), "wkt.unroutable")
    assert (dead.reason, dead.original_exchange, dead.original_routing_key) == (
        "unroutable",
        "wkt",
        "orders.nobody",
    )
    # The same headers in a work queue's DLQ (it expired, then failed there) keep their reason.
    assert dead_letter_from(Message(b"{}", headers=headers), "orders.dlq").reason == "expired"
