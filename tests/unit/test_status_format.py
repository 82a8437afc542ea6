"""The status table's text (workerkit.status.format_status), without a broker."""

from __future__ import annotations

from workerkit.status import Status, format_status


def test_the_footer_says_the_delay_layout_waits_or_is_not_declared() -> None:
    empty = Status("amqp", [], None, "http://h:15672", management_error="refused")
    assert "delay layout: not declared" in "\n".join(format_status(empty))
    assert "delay layout: -" not in "\n".join(format_status(empty))
    some = Status("management", [], 17, "http://h:15672")
    assert "delay layout: 17 message(s) waiting" in "\n".join(format_status(some))
