"""The one translation seam (transport/pika_asyncio.translate): pika's refusals as workerkit's
errors, without the URL's user name that the broker quotes."""

from __future__ import annotations

import pika.exceptions as px
import pytest

from workerkit.errors import AccessRefused, TopologyError
from workerkit.transport.pika_asyncio import translate

REFUSED = (
    "ACCESS_REFUSED - write access to exchange 'workerkit' in vhost '/' refused for user 'app'"
)


@pytest.mark.parametrize(
    "exc",
    [px.ChannelClosedByBroker(403, REFUSED), px.ConnectionClosedByBroker(403, REFUSED)],
)
def test_a_permission_refusal_keeps_the_cause_and_drops_the_user_name(exc: Exception) -> None:
    error = translate(exc, what="publish")
    assert isinstance(error, AccessRefused)
    assert "write access to exchange 'workerkit'" in str(error)
    assert "'app'" not in str(error) and "for user '***'" in str(error)


def test_a_queue_that_exists_with_other_arguments_is_a_topology_error() -> None:
    text = (
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/':"
        " received 'quorum' but current is 'classic'"
    )
    error = translate(px.ChannelClosedByBroker(406, text))
    assert isinstance(error, TopologyError) and "queue_type" in str(error)
