"""OpenTelemetry tracing as middleware (``pip install 'workerkit[otel]'``).

Install :class:`Tracing` on publishers and runners (or workers)::

    from workerkit.tracing import Tracing
    publisher = Publisher(middleware=[Tracing()])
    runner = Runner([SendReceipt], middleware=[Tracing()])

* A publish runs in a ``send <routing key>`` span (kind PRODUCER, a child of the caller's
  current span) whose context goes into the message's headers as W3C ``traceparent`` /
  ``tracestate`` (through the globally configured propagator).
* A delivery runs in a ``process <queue>`` span (kind CONSUMER), a child of that producer span;
  it is the current span while the handler runs (async or plain ``def``), so the handler's own
  spans and publishes continue the trace.
* Retry and dead-letter copies keep the original headers, so every attempt is a child of the
  original publish, and a replayed dead letter still names its trace.

Attributes follow the OpenTelemetry messaging semantic conventions (``messaging.system``
``rabbitmq``, ``messaging.operation.type`` ``send``/``process``, destination, message id,
conversation id, body size, routing key), plus ``workerkit.outcome`` and ``workerkit.attempt``.
Spans go to whatever tracer provider the application configured (the OpenTelemetry SDK and
an exporter); with none, the API's no-op provider makes this nearly free.

Only this module imports opentelemetry; nothing in workerkit imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "workerkit.tracing needs OpenTelemetry: pip install 'workerkit[otel]'"
    ) from exc

from . import __version__
from .middleware import Middleware

if TYPE_CHECKING:
    from .message import Message, Outgoing

__all__ = ["Tracing"]


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads W3C headers from AMQP headers (values may arrive as bytes)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()


class Tracing(Middleware):
    """Producer spans around publishes, consumer spans around handlers, W3C context in headers.

    ``tracer_provider`` defaults to the global one (``opentelemetry.trace.set_tracer_provider``).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("workerkit", __version__, tracer_provider=tracer_provider)
        # Spans between a before_* and its after_* hook, by the id of the message object (alive
        # until after_*; dict operations are atomic, and publishes come from many threads).
        self._sending: dict[int, trace.Span] = {}
        self._handling: dict[int, tuple[trace.Span, object]] = {}

    # -- publish -----------------------------------------------------------------------------

    def before_publish(self, outgoing: Outgoing) -> None:
        span = self._tracer.start_span(
            f"send {outgoing.routing_key}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": f"{outgoing.exchange}:{outgoing.routing_key}",
                "messaging.rabbitmq.destination.routing_key": outgoing.routing_key,
                "messaging.message.id": outgoing.message_id,
                "messaging.message.body.size": len(outgoing.body),
                **_conversation(outgoing.properties.correlation_id),
            },
        )
        propagate.inject(outgoing.headers, context=trace.set_span_in_context(span))
        self._sending[id(outgoing)] = span

    def after_publish(self, outgoing: Outgoing, outcome: str, duration: float) -> None:
        span = self._sending.pop(id(outgoing), None)
        if span is None:
            return
        span.set_attribute("workerkit.outcome", outcome)
        if outcome != "confirmed":
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()

    # -- handle ------------------------------------------------------------------------------

    def before_handle(self, message: Message) -> None:
        parent = propagate.extract(message.headers, getter=_GETTER)
        span = self._tracer.start_span(
            f"process {message.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": (
                    f"{message.exchange}:{message.routing_key}:{message.queue}"
                ),
                "messaging.destination.subscription.name": message.queue,
                "messaging.rabbitmq.destination.routing_key": message.routing_key,
                "messaging.rabbitmq.message.delivery_tag": message.delivery_tag,
                "messaging.message.id": message.message_id or "",
                "messaging.message.body.size": len(message.body),
                "workerkit.attempt": message.attempt,
                **_conversation(message.correlation_id),
            },
        )
        # Current for the rest of this slot's turn: the handler (and a plain def handler's
        # thread, which gets a copy of this context) sees it.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        self._handling[id(message)] = (span, token)

    def after_handle(self, message: Message, outcome: str, duration: float) -> None:
        found = self._handling.pop(id(message), None)
        if found is None:
            return
        span, token = found
        span.set_attribute("workerkit.outcome", outcome)
        if outcome != "acked":
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()
        otel_context.detach(token)  # type: ignore[arg-type]


def _conversation(correlation_id: str | None) -> dict[str, str]:
    return {"messaging.message.conversation_id": correlation_id} if correlation_id else {}
