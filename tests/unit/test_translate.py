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


@pytest.mark.parametrize("server", ["closes", "silent"])
async def test_a_port_that_does_not_speak_amqp_is_said_so(server: str) -> None:
    """An HTTP port or a proxy: the error was pika's own words (IncompatibleProtocolError:
    StreamLostError, or ConnectionOpenAborted ... prev_state=PROTOCOL ...)."""
    import asyncio

    from workerkit import Settings
    from workerkit.errors import ConnectionFailed
    from workerkit.transport import default_transport

    held: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)  # the AMQP protocol header
        if server == "closes":
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            writer.close()
        else:
            held.append(writer)  # says nothing back

    listening = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    settings = Settings(url=f"amqp://guest:guest@127.0.0.1:{port}/", connect_timeout=1.0)
    try:
        words = "does not speak AMQP" if server == "closes" else "no AMQP answer in time"
        with pytest.raises(ConnectionFailed, match=words) as info:
            await default_transport().connect(settings, name="t", on_lost=lambda _e: None)
        assert "pika" not in str(info.value) and "prev_state" not in str(info.value)
    finally:
        for writer in held:
            writer.close()
        listening.close()
        await listening.wait_closed()


async def test_a_deadline_before_any_connection_says_so() -> None:
    """A server that never answers, a timeout below the connect timeout: not "the broker did
    not confirm it" (nothing was sent), but that there was no connection yet; or, when the
    connect attempt itself gave up first (its handshake timeout is cut to the time left), its
    own words."""
    import asyncio

    from workerkit import AsyncPublisher, Settings
    from workerkit.errors import PublishTimeout

    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    listening = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    settings = Settings(url=f"amqp://guest:guest@127.0.0.1:{port}/", connect_timeout=10.0)
    pub = AsyncPublisher(settings=settings)  # not `async with`: that connects first
    try:
        either = "no connection to the broker yet|no AMQP answer in time"
        with pytest.raises(PublishTimeout, match=either) as published:
            await pub.publish("k", {}, timeout=0.5)
        with pytest.raises(PublishTimeout, match=either) as requested:
            await pub.request("k", {}, timeout=0.5)
        for raised in (published, requested):
            assert "did not confirm" not in str(raised.value)
            assert "the broker did not answer" not in str(raised.value)
    finally:
        await pub.close()
        for writer in held:
            writer.close()
        listening.close()
        await listening.wait_closed()
