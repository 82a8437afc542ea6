"""OpenTelemetry through the real broker: a publish in a span reaches the handler, the handler's
publish continues the trace, and a retried message keeps it (SDK in-memory exporter)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from workerkit import Publisher, RetryPolicy, Runner, Settings, Worker
from workerkit.dlq import list_dead
from workerkit.testing import running, wait_for
from workerkit.tracing import Tracing

from .workers_fixture import delete_queues

pytestmark = pytest.mark.integration


@pytest.fixture
def exporter() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def queues(settings: Settings, unique: Callable[[str], str]) -> Iterator[tuple[str, str]]:
    first, second = unique("trace-a"), unique("trace-b")
    yield first, second
    names = (first, second)
    delete_queues(settings.url.get_secret_value(), *names, *(f"{q}.dlq" for q in names))


def _by_name(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _attr(span: ReadableSpan, key: str) -> Any:
    """An attribute the span must have (a finished span's attributes may be None by type)."""
    assert span.attributes is not None, span
    return span.attributes[key]


def _parent_id(span: ReadableSpan) -> int:
    """The span id of the span's parent, which it must have."""
    assert span.parent is not None, span
    return span.parent.span_id


async def test_a_trace_crosses_the_broker_twice_and_survives_a_retry(
    settings: Settings,
    queues: tuple[str, str],
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, spans = exporter
    first, second = queues
    tracing = Tracing(tracer_provider=provider)
    handler_publisher = Publisher(settings=settings, middleware=[tracing])
    attempts: list[int] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    class First(Worker):  # a plain def handler: runs in a pool thread
        queue = first
        retry = RetryPolicy(max_attempts=3, delay=0.2, jitter=0.0)

        def handle(self, body: dict[str, Any]) -> None:
            attempts.append(len(attempts) + 1)
            if len(attempts) == 1:
                raise RuntimeError("first attempt fails")
            handler_publisher.publish(second, {"from": "first"})

    class Second(Worker):
        queue = second

        async def handle(self, body: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(done.set)

    runner = Runner([First, Second], settings=settings, middleware=[tracing])
    try:
        async with running(runner):
            tracer = provider.get_tracer("test")

            def publish_in_a_span() -> None:
                with (
                    tracer.start_as_current_span("checkout"),
                    Publisher(settings=settings, middleware=[tracing]) as publisher,
                ):
                    publisher.publish(first, {"order": 1})

            await asyncio.to_thread(publish_in_a_span)
            await asyncio.wait_for(done.wait(), 15)
            await wait_for(
                lambda: len(_by_name(spans.get_finished_spans(), f"process {second}")) == 1
            )
    finally:
        await asyncio.to_thread(handler_publisher.close)

    finished = list(spans.get_finished_spans())
    (root,) = _by_name(finished, "checkout")
    (send_first,) = _by_name(finished, f"send {first}")
    process_first = sorted(
        _by_name(finished, f"process {first}"), key=lambda s: _attr(s, "workerkit.attempt")
    )
    (send_second,) = _by_name(finished, f"send {second}")
    (process_second,) = _by_name(finished, f"process {second}")
    trace_id = root.context.trace_id
    assert all(s.context.trace_id == trace_id for s in finished), "one trace end to end"

    assert send_first.kind is SpanKind.PRODUCER and _parent_id(send_first) == root.context.span_id
    assert _attr(send_first, "messaging.system") == "rabbitmq"
    assert _attr(send_first, "workerkit.outcome") == "confirmed"
    # Both attempts are children of the original publish: the retry kept the trace context.
    assert [_attr(s, "workerkit.attempt") for s in process_first] == [1, 2]
    for span in process_first:
        assert span.kind is SpanKind.CONSUMER
        assert _parent_id(span) == send_first.context.span_id
    assert _attr(process_first[0], "workerkit.outcome") == "retried"
    assert process_first[0].status.status_code is StatusCode.ERROR
    assert _attr(process_first[1], "workerkit.outcome") == "acked"
    # The handler's publish (from its pool thread) continues the trace from its consumer span.
    assert _parent_id(send_second) == process_first[1].context.span_id
    assert _parent_id(process_second) == send_second.context.span_id
    assert _attr(process_second, "messaging.destination.subscription.name") == second


async def test_a_dead_letter_keeps_its_trace_context(
    settings: Settings,
    queues: tuple[str, str],
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, spans = exporter
    first, _ = queues

    class Fails(Worker):
        queue = first
        retry = RetryPolicy(max_attempts=2, delay=0.1, jitter=0.0)

        async def handle(self, body: dict[str, Any]) -> None:
            raise RuntimeError("always")

    runner = Runner([Fails], settings=settings, middleware=[Tracing(tracer_provider=provider)])
    async with running(runner):
        tracer = provider.get_tracer("test")

        def publish_in_a_span() -> None:
            with (
                tracer.start_as_current_span("job"),
                Publisher(
                    settings=settings, middleware=[Tracing(tracer_provider=provider)]
                ) as publisher,
            ):
                publisher.publish(first, {"n": 1})

        await asyncio.to_thread(publish_in_a_span)
        await wait_for(
            lambda: len(_by_name(spans.get_finished_spans(), f"process {first}")) == 2, 15
        )
    (send,) = _by_name(list(spans.get_finished_spans()), f"send {first}")
    (dead,) = await list_dead(first, settings=settings)
    traceparent = dead.headers["traceparent"]
    assert traceparent.split("-")[1] == format(send.context.trace_id, "032x")
    assert traceparent.split("-")[2] == format(send.context.span_id, "016x")
