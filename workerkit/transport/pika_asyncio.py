"""Transport over pika's asyncio adapter: the consume path, publisher confirms and admin calls.

Chosen for the hot path because it measured about 3x aio-pika's callback consumer on the same
broker (see docs/performance.md). Every pika exception is translated here, and only here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import ssl
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, TypeVar

import pika
import pika.exceptions as px
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils.connection_workflow import AMQPConnectorStackTimeout
from pika.channel import Channel as PikaRawChannel
from pika.spec import Basic, BasicProperties

from ..errors import (
    AccessRefused,
    ConfigurationError,
    ConnectionFailed,
    InvalidMessage,
    PublishError,
    PublishNacked,
    PublishTimeout,
    TopologyError,
    Unroutable,
    WorkerkitError,
)
from ..message import Message, Outgoing, Properties
from ..settings import Settings, redact_url
from ._pika_internals import (
    BatchingConnection,
    acker,
    consume_fast,
    remove_get_empty_callback,
    stop_fast,
)
from .base import OnClosed, OnLost, OnMessage, OnPublished, wait_set
from .specs import ExchangeSpec, QueueSpec

log = logging.getLogger("workerkit.transport")

T = TypeVar("T")

PERSISTENT = 2
SWEEP_INTERVAL = 0.05  # how often unconfirmed publishes are checked against their deadline


def translate(exc: BaseException, *, what: str = "") -> WorkerkitError:
    """The workerkit error for a pika (or socket) exception. The one translation seam."""
    if isinstance(exc, WorkerkitError):
        return exc
    prefix = f"{what}: " if what else ""
    if isinstance(exc, px.IncompatibleProtocolError):  # before unwrapping: it says so itself
        return ConnectionFailed(
            f"{prefix}the server does not speak AMQP: is that the broker's AMQP port (5672;"
            " 5671 with amqps://)?"
        )
    if _no_amqp_answer(exc):
        return ConnectionFailed(
            f"{prefix}no AMQP answer in time: not the broker's AMQP port (5672; 5671 with"
            " amqps://), or a broker too busy to answer"
        )
    inner = _wrapped(exc)
    if inner is not None:
        return translate(inner, what=what)
    return (
        _broker_refusal(exc, prefix)
        or _network_failure(exc, prefix)
        or ConnectionFailed(f"{prefix}{type(exc).__name__}: {exc}".rstrip(": "))
    )


def _no_amqp_answer(exc: BaseException) -> bool:
    """A server that took the connection and said nothing back to the AMQP header before the
    connect timeout (pika's words differ by where the timeout found it)."""
    if isinstance(exc, px.ConnectionOpenAborted):
        return "setting up AMQP" in str(exc)
    return isinstance(exc, AMQPConnectorStackTimeout) and "AMQP handshake" in str(exc)


def _wrapped(exc: BaseException) -> BaseException | None:
    """The real failure inside one of pika's wrappers, if ``exc`` is one."""
    if isinstance(exc, px.AMQPConnectionError) and exc.args:
        first = exc.args[0]
        if isinstance(first, BaseException):  # pika wraps the workflow failure in args
            return first
    causes = getattr(exc, "exceptions", None)
    if causes:  # pika's AMQPConnectionWorkflowFailed wraps the real failure
        return causes[-1]  # type: ignore[no-any-return]
    inner = getattr(exc, "exception", None)
    if isinstance(inner, BaseException):  # AMQPConnectorSocketConnectError and friends
        return inner
    return None


def _broker_refusal(exc: BaseException, prefix: str) -> WorkerkitError | None:
    """What the broker said no to: credentials, permissions, topology, a channel close."""
    if isinstance(exc, px.ProbableAuthenticationError | px.AuthenticationError):
        return AccessRefused(f"{prefix}the broker refused the credentials{_broker_words(exc)}")
    if isinstance(exc, px.ProbableAccessDeniedError):
        return AccessRefused(f"{prefix}access to the virtual host was refused{_broker_words(exc)}")
    if isinstance(exc, px.ConnectionClosedByBroker) and exc.reply_code in (403, 530):
        return AccessRefused(f"{prefix}{_without_user(exc.reply_text)}")
    if isinstance(exc, px.ChannelClosedByBroker):
        if exc.reply_code == 403:
            return AccessRefused(f"{prefix}permission refused: {_without_user(exc.reply_text)}")
        if exc.reply_code in (404, 405, 406):
            return TopologyError(f"{prefix}{_explain_precondition(exc.reply_text)}")
        return ConnectionFailed(f"{prefix}channel closed by the broker: {exc.reply_text}")
    return None


def _network_failure(exc: BaseException, prefix: str) -> WorkerkitError | None:
    """Timeouts, TLS and socket errors."""
    if isinstance(exc, asyncio.TimeoutError):
        return ConnectionFailed(f"{prefix}timed out")
    if isinstance(exc, ssl.SSLCertVerificationError | ssl.CertificateError):
        # Fatal like refused credentials: a wrong CA or host name does not fix itself, and a
        # certificate we cannot trust may be an attacker's. Never retried, never downgraded.
        return AccessRefused(f"{prefix}TLS certificate verification failed: {exc}")
    if isinstance(exc, ssl.SSLError):
        return ConnectionFailed(f"{prefix}TLS failed: {exc}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionFailed(f"{prefix}connection refused (is the broker running?)")
    if isinstance(exc, OSError):
        return ConnectionFailed(f"{prefix}{exc.strerror or exc}")
    return None


def _without_user(text: str) -> str:
    """The broker's words without the user name ("... refused for user 'app'"): the URL's user
    and password never appear in an error, and logs keep errors."""
    return re.sub(r"(for user) '[^']*'", r"\1 '***'", text)


def _broker_words(exc: BaseException) -> str:
    """The broker's reason, when pika kept it: ' (NOT_ALLOWED - vhost x not found)'."""
    found = re.search(r"\(\d+\) '([^']+)'", str(exc))
    return f" ({found[1]})" if found else ""


def _explain_precondition(text: str) -> str:
    # "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/':
    #  received 'quorum' but current is 'classic'"
    if "inequivalent arg" in text:
        detail = text.split(" - ", 1)[-1]
        return (
            f"{detail}. The queue already exists with other arguments (a classic queue where the"
            " Worker wants quorum reports its first differing x- argument): set queue_type,"
            " delivery_limit... on the Worker to match, or drain and delete the queue"
        )
    return text


def _parameters(settings: Settings, url: str, name: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = settings.heartbeat
    params.connection_attempts = 1
    params.retry_delay = 0
    params.socket_timeout = settings.connect_timeout
    params.stack_timeout = settings.connect_timeout
    params.blocked_connection_timeout = None
    params.client_properties = {"connection_name": name, "product": "workerkit"}
    if url.lower().startswith("amqps"):
        context = ssl.create_default_context(cafile=settings.tls_ca_file)
        if settings.tls_cert_file:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)
    return params


class PikaTransport:
    """Opens :class:`PikaConnection` objects on the running event loop."""

    async def connect(self, settings: Settings, *, name: str, on_lost: OnLost) -> PikaConnection:
        """A connection to the first broker of ``settings.urls`` that answers (see HostOrder).

        Refused credentials or an untrusted certificate are raised at once (a configuration
        error); any other failure moves on to the next host. The caller's jittered backoff
        applies between rounds.
        """
        order = HostOrder.of(settings.urls)
        failures: list[str] = []
        for url in order.candidates():
            try:
                conn = await self._connect_one(settings, url, name, order.watch(url, on_lost))
            except AccessRefused:
                raise
            except ConnectionFailed as exc:
                failures.append(str(exc))
                continue
            if order.connected(url) and len(order.urls) > 1:
                log.info("%s: connected to %s", name, redact_url(url))
            return conn
        if len(failures) == 1:
            raise ConnectionFailed(failures[0])
        raise ConnectionFailed(f"no broker answered: {'; '.join(failures)}")

    async def _connect_one(
        self, settings: Settings, url: str, name: str, on_lost: OnLost
    ) -> PikaConnection:
        redacted = redact_url(url)
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        conn = PikaConnection(on_lost)

        def on_open(_c: Any) -> None:
            if not opened.done():
                opened.set_result(None)

        def on_open_error(_c: Any, exc: BaseException) -> None:
            if not opened.done():
                opened.set_exception(translate(exc, what=f"connecting to {redacted}"))

        try:
            params = _parameters(settings, url, name)
        except (ValueError, TypeError, OSError, ssl.SSLError) as exc:
            # Settings already refused what they can tell (unknown query parameters, missing
            # files); what is left here (a file that is not a certificate) is configuration
            # too: retrying cannot fix it.
            raise ConfigurationError(f"bad connection settings for {redacted}: {exc}") from None
        raw = BatchingConnection(
            params,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=conn._on_closed,
            custom_ioloop=loop,
        )
        conn._raw = raw
        raw.add_on_connection_blocked_callback(conn._on_blocked)
        raw.add_on_connection_unblocked_callback(conn._on_unblocked)
        try:
            await asyncio.wait_for(opened, settings.connect_timeout + 1)
        except asyncio.TimeoutError:
            conn._closing = True
            _abort(raw)
            raise ConnectionFailed(
                f"connecting to {redacted}: no answer in {settings.connect_timeout}s"
            ) from None
        except asyncio.CancelledError:
            conn._closing = True
            _abort(raw)
            raise
        return conn


class HostOrder:
    """The order in which one process tries a cluster's broker URLs.

    The list is shuffled once per process, so that many clients given the same list spread
    over the nodes. A connect tries every URL once, starting with the one last connected to;
    when a connection is lost, the start moves to the next URL, so the reconnect fails over
    to another node first (a node that died may still accept TCP while it shuts down).
    """

    _known: ClassVar[dict[tuple[int, tuple[str, ...]], HostOrder]] = {}

    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)
        random.shuffle(self.urls)
        self.start = 0

    @classmethod
    def of(cls, urls: list[str]) -> HostOrder:
        # Keyed by pid too: a forked child shuffles again instead of inheriting its parent's order.
        key = (os.getpid(), tuple(urls))
        order = cls._known.get(key)
        if order is None:
            order = cls._known[key] = cls(urls)
        return order

    def candidates(self) -> list[str]:
        return self.urls[self.start :] + self.urls[: self.start]

    def connected(self, url: str) -> bool:
        """Record a successful connect; True when it moved to another host."""
        index = self.urls.index(url)
        moved = index != self.start
        self.start = index
        return moved

    def lost(self, url: str) -> None:
        index = self.urls.index(url)
        if index == self.start:  # the first of several lost connections to one host moves on
            self.start = (index + 1) % len(self.urls)

    def watch(self, url: str, on_lost: OnLost) -> OnLost:
        def lost(error: Exception) -> None:
            self.lost(url)
            on_lost(error)

        return lost


def _abort(raw: AsyncioConnection) -> None:
    try:
        if raw.is_open or raw.is_opening:
            raw.close()
    except Exception:  # the connection is being thrown away; nothing more to do
        pass


class PikaConnection:
    def __init__(self, on_lost: OnLost) -> None:
        self._raw: AsyncioConnection
        self._on_lost = on_lost
        self._closing = False
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unblocked = asyncio.Event()  # set while the broker reads this connection's publishes
        self._unblocked.set()
        self._channels: list[PikaChannel] = []

    @property
    def is_open(self) -> bool:
        return bool(self._raw.is_open) and not self._closing

    @property
    def blocked(self) -> bool:
        return not self._unblocked.is_set()

    async def wait_unblocked(self, timeout: float) -> bool:
        return await wait_set(self._unblocked, timeout)

    def _on_blocked(self, _c: Any, frame: Any) -> None:
        self._unblocked.clear()
        log.warning("the broker blocked this connection: %s", frame.method.reason)

    def _on_unblocked(self, _c: Any, _frame: Any) -> None:
        self._unblocked.set()
        log.info("the broker unblocked this connection")

    def _on_closed(self, _c: Any, exc: BaseException) -> None:
        self._unblocked.set()  # nobody waits on a closed connection: its publishes fail now
        error = translate(exc)
        for channel in self._channels:
            channel._fail_all(error)
        if not self._closed.done():
            self._closed.set_result(None)
        if not self._closing:
            self._closing = True
            self._on_lost(error)

    async def channel(
        self,
        *,
        prefetch: int | None = None,
        confirms: bool = False,
        on_closed: OnClosed | None = None,
    ) -> PikaChannel:
        if not self.is_open:
            raise ConnectionFailed("connection is closed")
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[PikaRawChannel] = loop.create_future()
        channel = PikaChannel(self)
        channel._on_closed = on_closed

        def on_open(raw: PikaRawChannel) -> None:
            if not opened.done():
                opened.set_result(raw)

        try:
            self._raw.channel(on_open_callback=on_open)
        except Exception as exc:
            raise translate(exc, what="opening a channel") from None
        channel._pending.add(opened)
        raw = await channel._wait(opened, what="opening a channel")
        channel._attach(raw)
        self._channels.append(channel)
        if prefetch is not None:
            await channel._call(lambda cb: raw.basic_qos(prefetch_count=prefetch, callback=cb))
        if confirms:
            await channel._call(lambda cb: raw.confirm_delivery(channel._on_confirm, callback=cb))
            raw.add_on_return_callback(channel._on_return)
            channel.confirms = True
        return channel

    async def close(self) -> None:
        if self._closing and self._closed.done():
            return
        self._closing = True
        try:
            if self._raw.is_open or self._raw.is_opening:
                self._raw.close()
        except px.ConnectionWrongStateError:
            pass
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), 5)
        except asyncio.TimeoutError:
            log.warning("connection did not close within 5s; abandoning it")


class _Pending(NamedTuple):
    """A publish waiting for its confirm."""

    on_done: OnPublished
    message: Outgoing
    deadline: float  # loop time
    timeout: float


class PikaChannel:
    """One pika channel. RPC futures are failed when the channel or connection closes."""

    rpc_timeout = 30.0

    def __init__(self, connection: PikaConnection) -> None:
        self._connection = connection
        self._raw: PikaRawChannel
        self._ack: Callable[[int, bool], None]
        self._pending: set[asyncio.Future[Any]] = set()
        self._close_error: WorkerkitError | None = None
        self._cancel_callbacks: dict[str, Callable[[], None]] = {}
        self._on_closed: OnClosed | None = None
        self.confirms = False
        # Publisher confirms: sequence number -> (callback, message, deadline).
        self._seq = 0
        self._unconfirmed: dict[int, _Pending] = {}
        self._sweeping = False
        # Sequence numbers of publishes the broker returned; checked when their confirm arrives.
        self._lowest = 1
        self._returned: set[int] = set()
        # Set by a nack: the channel takes no more publishes and closes once every earlier
        # publish is answered (see _on_confirm).
        self._retired: ConnectionFailed | None = None

    def _attach(self, raw: PikaRawChannel) -> None:
        self._raw = raw
        self._ack = acker(raw)
        raw.add_on_close_callback(self._on_close)
        raw.add_on_cancel_callback(self._on_cancel)

    @property
    def is_open(self) -> bool:
        return self._close_error is None and self._retired is None and bool(self._raw.is_open)

    # -- plumbing ----------------------------------------------------------------------------

    def _on_close(self, _raw: Any, exc: BaseException) -> None:
        stop_fast(self._raw)
        error = translate(exc, what="channel closed")
        self._fail_all(error)
        if isinstance(exc, px.ChannelClosedByClient | px.ConnectionClosedByClient):
            if self._retired is not None:
                # Closed here after a nack, not by its owner: its consumers (a publisher's reply
                # consumer) end with it, and their owners must hear it.
                self._end_consumers()
            return
        on_closed, self._on_closed = self._on_closed, None
        if on_closed is not None:
            on_closed(error)
        # The broker closed a consuming channel (consumer_timeout, a protocol error): its
        # consumers are gone, which the runner must hear about rather than sit idle.
        self._end_consumers()

    def _end_consumers(self) -> None:
        callbacks, self._cancel_callbacks = self._cancel_callbacks, {}
        for callback in callbacks.values():
            callback()

    def _fail_all(self, error: WorkerkitError) -> None:
        if self._close_error is None:
            self._close_error = error
        for fut in self._pending:
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        unconfirmed, self._unconfirmed = self._unconfirmed, {}
        self._returned.clear()
        for entry in unconfirmed.values():
            entry.on_done(error)

    def _on_cancel(self, frame: Any) -> None:
        tag = frame.method.consumer_tag
        stop_fast(self._raw, tag)
        callback = self._cancel_callbacks.pop(tag, None)
        if callback is not None:
            callback()

    async def _wait(self, fut: asyncio.Future[T], *, what: str) -> T:
        try:
            return await asyncio.wait_for(fut, self.rpc_timeout)
        except asyncio.TimeoutError:
            raise ConnectionFailed(f"{what}: no answer in {self.rpc_timeout}s") from None
        finally:
            self._pending.discard(fut)

    async def _call(self, start: Callable[[Callable[[Any], None]], Any], what: str = "") -> Any:
        """Run a pika RPC that reports through a callback, as an awaitable."""
        if self._close_error is not None:
            raise self._close_error
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(frame: Any) -> None:
            if not fut.done():
                fut.set_result(frame)

        self._pending.add(fut)
        try:
            start(done)
        except Exception as exc:
            self._pending.discard(fut)
            raise translate(exc, what=what) from None
        return await self._wait(fut, what=what)

    # -- topology ----------------------------------------------------------------------------

    async def declare_exchange(self, spec: ExchangeSpec) -> None:
        await self._call(
            lambda cb: self._raw.exchange_declare(
                spec.name, spec.type, durable=True, arguments=spec.arguments or None, callback=cb
            ),
            what=f"declaring exchange {spec.name!r}",
        )

    async def declare_queue(self, spec: QueueSpec) -> None:
        await self._call(
            lambda cb: self._raw.queue_declare(
                spec.name, durable=True, arguments=spec.arguments or None, callback=cb
            ),
            what=f"declaring queue {spec.name!r}",
        )

    async def queue_state(self, name: str) -> tuple[int, int]:
        frame = await self._call(
            lambda cb: self._raw.queue_declare(name, passive=True, callback=cb),
            what=f"queue {name!r}",
        )
        return frame.method.message_count, frame.method.consumer_count

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._call(
            lambda cb: self._raw.queue_bind(queue, exchange, routing_key, callback=cb),
            what=f"binding queue {queue!r} to {exchange!r}",
        )

    async def bind_exchange(self, destination: str, source: str, routing_key: str) -> None:
        await self._call(
            lambda cb: self._raw.exchange_bind(destination, source, routing_key, callback=cb),
            what=f"binding exchange {destination!r} to {source!r}",
        )

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await self._call(
            lambda cb: self._raw.queue_unbind(queue, exchange, routing_key, callback=cb),
            what=f"unbinding queue {queue!r} from {exchange!r}",
        )

    async def delete_queue(self, name: str) -> None:
        await self._call(
            lambda cb: self._raw.queue_delete(name, callback=cb), what=f"deleting queue {name!r}"
        )

    async def delete_exchange(self, name: str) -> None:
        await self._call(
            lambda cb: self._raw.exchange_delete(name, callback=cb),
            what=f"deleting exchange {name!r}",
        )

    async def purge(self, name: str) -> int:
        frame = await self._call(
            lambda cb: self._raw.queue_purge(name, callback=cb), what=f"purging queue {name!r}"
        )
        return int(frame.method.message_count)

    async def get(self, queue: str) -> Message | None:
        if self._close_error is not None:
            raise self._close_error
        fut: asyncio.Future[Message | None] = asyncio.get_running_loop().create_future()

        def on_get(_ch: Any, method: Basic.GetOk, props: BasicProperties, body: bytes) -> None:
            remove_get_empty_callback(self._raw, on_empty)
            if not fut.done():
                fut.set_result(_message(method, props, body))

        def on_empty(_frame: Any) -> None:
            if not fut.done():
                fut.set_result(None)

        self._pending.add(fut)
        try:
            self._raw.basic_get(queue, on_get, auto_ack=False)
            # pika reports an empty queue through a channel-wide Basic.GetEmpty callback.
            self._raw.add_callback(on_empty, [Basic.GetEmpty], one_shot=True)
        except Exception as exc:
            self._pending.discard(fut)
            raise translate(exc, what=f"reading queue {queue!r}") from None
        return await self._wait(fut, what=f"reading queue {queue!r}")

    # -- consuming ---------------------------------------------------------------------------

    async def consume(
        self,
        queue: str,
        on_message: OnMessage,
        on_cancelled: Callable[[], None],
        *,
        no_ack: bool = False,
    ) -> str:
        build = _message

        def on_delivery(
            _ch: Any, method: Basic.Deliver, props: BasicProperties, body: bytes
        ) -> None:
            on_message(build(method, props, body))

        def start(done: Callable[[Any], None]) -> None:
            raw = self._raw
            # pika names the consumer when asked: the fast path knows it before the first
            # delivery can arrive. pika keeps on_delivery for deliveries it decodes itself.
            tag = raw.basic_consume(queue, on_delivery, auto_ack=no_ack, callback=done)
            consume_fast(raw, tag, on_message)

        frame = await self._call(start, what=f"consuming from {queue!r}")
        tag: str = frame.method.consumer_tag
        self._cancel_callbacks[tag] = on_cancelled
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        self._cancel_callbacks.pop(consumer_tag, None)
        stop_fast(self._raw, consumer_tag)  # pika rejects what still arrives, as before
        if not self.is_open:
            return
        await self._call(
            lambda cb: self._raw.basic_cancel(consumer_tag, callback=cb),
            what="cancelling consumer",
        )

    def has_consumer(self, consumer_tag: str) -> bool:
        # The broker's basic.cancel and a channel close both drop the tag (_on_cancel, _on_close).
        return self.is_open and consumer_tag in self._cancel_callbacks

    async def flush(self) -> None:
        if self._close_error is None and self._raw.is_open:
            self._raw.connection._wk_flush()  # write what this turn buffered now
        await asyncio.sleep(0)

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        # A closed channel means the broker already requeued the message: nothing to ack.
        if self._close_error is None and self._raw.is_open:
            self._ack(delivery_tag, multiple)

    def nack(self, delivery_tag: int, requeue: bool = True) -> None:
        if self._close_error is None and self._raw.is_open:
            self._raw.basic_nack(delivery_tag, multiple=False, requeue=requeue)

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, message: Outgoing, *, mandatory: bool, timeout: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle(error: BaseException | None) -> None:
            if fut.done():
                return  # the caller was cancelled
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

        self.publish_nowait(message, mandatory=mandatory, timeout=timeout, on_done=settle)
        await fut

    def publish_nowait(
        self, message: Outgoing, *, mandatory: bool, timeout: float, on_done: OnPublished
    ) -> None:
        """Send now; ``on_done(error or None)`` runs on the loop once the broker answered.

        The plain callback is what keeps this path free of a future, a task and the extra turn
        of the loop that an asyncio future's callbacks take.
        """
        refused = self._close_error or self._retired
        if refused is not None:
            on_done(refused)
            return
        raw = self._raw
        try:
            frames = raw.connection.publish_frames(
                raw.channel_number,
                message.exchange,
                message.routing_key,
                mandatory,
                _basic_properties(message.properties),
                message.body,
            )
        except Exception as exc:
            # Nothing was sent: a value the client cannot encode is the message's fault, never
            # the connection's (publishers would otherwise reconnect and retry it).
            on_done(InvalidMessage(f"cannot encode the message: {type(exc).__name__}: {exc}"))
            return
        try:
            if not raw.is_open:
                raise px.ChannelWrongStateError("the channel is closed")
            raw.connection.send_frames(frames)
        except Exception as exc:
            on_done(translate(exc, what="publishing"))
            return
        if not self.confirms:
            on_done(None)
            return
        self._seq += 1
        seq = self._seq
        loop = asyncio.get_running_loop()
        self._unconfirmed[seq] = _Pending(on_done, message, loop.time() + timeout, timeout)
        if not self._sweeping:
            # One timer for all unconfirmed publishes, not one per publish (heap work on the
            # hot path); it costs a timeout up to SWEEP_INTERVAL of lateness.
            self._sweeping = True
            loop.call_later(SWEEP_INTERVAL, self._expire)

    def _expire(self) -> None:
        """Fail the publishes whose confirm is overdue; look again while any are unconfirmed."""
        now = asyncio.get_running_loop().time()
        overdue = [seq for seq, entry in self._unconfirmed.items() if entry.deadline <= now]
        blocked = " (the broker has blocked this connection: alarm)" * self._connection.blocked
        for seq in overdue:
            entry = self._unconfirmed.pop(seq)
            self._returned.discard(seq)
            entry.on_done(
                PublishTimeout(f"no confirm from the broker within {entry.timeout:.1f}s{blocked}")
            )
        self._close_if_retired()
        self._sweeping = bool(self._unconfirmed)
        if self._sweeping:
            asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._expire)

    def _on_return(
        self, _ch: Any, method: Basic.Return, props: BasicProperties, _body: bytes
    ) -> None:
        """Mark the publish this basic.return belongs to.

        The broker routes a channel's publishes in order and returns an unroutable one before
        its confirm, so the return belongs to the oldest unconfirmed publish with the same
        exchange, routing key and id that is not marked yet. A publish that timed out is no
        longer unconfirmed, so its late return can never be pinned on a later one.
        """
        message_id = props.message_id or ""
        for seq, entry in self._unconfirmed.items():
            message = entry.message
            if (
                seq not in self._returned
                and message.routing_key == method.routing_key
                and message.exchange == method.exchange
                and (message.message_id or "") == message_id
            ):
                self._returned.add(seq)
                return
        log.debug("a return matched no unconfirmed publish (it timed out): %s", method)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag: int = method.delivery_tag
        nacked = isinstance(method, Basic.Nack)
        first = self._lowest if method.multiple else tag
        returned = self._returned
        for seq in range(first, tag + 1):
            entry = self._unconfirmed.pop(seq, None)
            if entry is None:
                continue
            if nacked:
                entry.on_done(PublishNacked("the broker nacked the message"))
            elif returned and seq in returned:
                returned.discard(seq)
                message = entry.message
                entry.on_done(Unroutable(message.exchange, message.routing_key))
            else:
                entry.on_done(None)
        # Everything below the lowest unconfirmed sequence number is settled.
        while self._lowest <= self._seq and self._lowest not in self._unconfirmed:
            self._lowest += 1
        if nacked and self._retired is None and self._raw.is_open:
            # Not reused: RabbitMQ 3.10 nacks every later publish on a channel whose publish to
            # a quorum queue found its leader gone, while a new channel works once a leader is
            # elected. Publishes sent before the nack are still answered here: a broker confirms
            # out of order (a classic queue acks a persisted message after its fsync but nacks a
            # full queue's at once), and failing them would call confirmed copies lost.
            log.warning("the broker nacked a publish; opening a new channel for the next ones")
            self._retired = ConnectionFailed("the channel was retired after a nack; publish again")
        self._close_if_retired()

    def _close_if_retired(self) -> None:
        if self._retired is not None and not self._unconfirmed and self._raw.is_open:
            self._raw.close()

    async def close(self) -> None:
        if self._close_error is not None or not self._raw.is_open:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_closed(_raw: Any, _exc: BaseException) -> None:
            if not fut.done():
                fut.set_result(None)

        self._raw.add_on_close_callback(on_closed)
        try:
            self._raw.close()
            await asyncio.wait_for(fut, 5)
        except (px.ChannelWrongStateError, asyncio.TimeoutError, PublishError):
            pass


def _basic_properties(props: Properties) -> BasicProperties:
    return BasicProperties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=props.headers or None,
        delivery_mode=PERSISTENT,
        message_id=props.message_id or None,
        correlation_id=props.correlation_id,
        timestamp=props.timestamp,
        reply_to=props.reply_to,
        expiration=props.expiration,
        priority=props.priority,
    )


def _message(method: Any, props: BasicProperties, body: bytes) -> Message:
    # Positional and flat: this runs once per delivery.
    return Message(
        body,
        method.delivery_tag,
        method.routing_key,
        method.exchange,
        method.redelivered,
        props.headers,
        props.content_type,
        props.content_encoding,
        props.message_id or None,
        props.correlation_id,
        props.timestamp,
        props.reply_to,
        "",
        props.priority,
    )
