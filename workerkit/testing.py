"""Helpers for testing workers: run a Runner in the background, wait on conditions, and run
workers on an in-memory broker when no RabbitMQ is at hand."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from .dlq import DeadLetter, list_dead
from .errors import TopologyError, WorkerkitError
from .publisher import AsyncPublisher, Publisher
from .runner import Runner
from .settings import Settings
from .topology import Topology
from .transport import default_transport
from .transport.base import Channel, Transport
from .transport.memory import MemoryBroker, MemoryTransport
from .worker import Worker

__all__ = [
    "BrokerHarness",
    "LoopThread",
    "MemoryBroker",
    "delete_layout",
    "in_memory",
    "memory_publisher",
    "running",
    "wait_for",
]

T = TypeVar("T")


@asynccontextmanager
async def running(runner: Runner, timeout: float = 20.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``runner`` in the background for the body of the block, then stop it and wait.

    Start-up errors (bad topology, refused credentials) are raised from the ``async with``.
    """
    task = asyncio.create_task(runner.run())
    try:
        ready = asyncio.create_task(runner.wait_ready(timeout))
        done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            task.result()
        await ready
        yield task
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout + runner.settings.shutdown_grace)


async def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until it returns something true (a non-empty list will do); fail
    after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.01)


def in_memory(
    workers: Sequence[type[Worker]],
    *,
    broker: MemoryBroker | None = None,
    settings: Settings | None = None,
    **kwargs: Any,
) -> tuple[Runner, MemoryBroker]:
    """A Runner on an in-memory broker (no RabbitMQ), and that broker to inspect.

    Signal handlers are left alone unless ``handle_signals=True`` is passed.
    """
    broker = broker if broker is not None else MemoryBroker()
    kwargs.setdefault("handle_signals", False)
    runner = Runner(workers, settings=settings, transport=MemoryTransport(broker), **kwargs)
    return runner, broker


def memory_publisher(broker: MemoryBroker, settings: Settings | None = None) -> AsyncPublisher:
    """An AsyncPublisher that publishes to ``broker``: ``async with memory_publisher(b) as p``."""
    return AsyncPublisher(settings=settings, transport=MemoryTransport(broker))


# -- the broker a test runs on (what the pytest plugin hands out) ------------------------------


class LoopThread:
    """An event loop running in a daemon thread: the home of a test's in-memory broker, and
    where a synchronous test's workers run."""

    def __init__(self, name: str = "workerkit-test-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the thread's loop and block until it is done."""
        if _running_loop() is self.loop:
            coro.close()
            raise RuntimeError("LoopThread.call from its own loop would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop.is_closed():
            return

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.call(cancel_rest(), timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class BrokerHarness:
    """One test's broker: the in-memory one (``kind == "memory"``) or RabbitMQ (``"rabbitmq"``).

    Everything it hands out is bound to that broker: :meth:`run` runs Workers in the background,
    :meth:`publisher` / :meth:`async_publisher` publish to it, :meth:`join` waits until every
    message has been handled, :meth:`dead_letters` reads a worker's dead-letter queue.

    On RabbitMQ each test is isolated: its workers' queues get a per-test prefix (their own
    name stays bound as a routing key, so ``publish("receipts", ...)`` still reaches them) on a
    per-session exchange; what a test declared is deleted when it ends.
    """

    def __init__(
        self,
        kind: str,
        settings: Settings,
        *,
        memory: MemoryBroker | None = None,
        prefix: str = "",
        loop_thread: Callable[[], LoopThread],
    ) -> None:
        if kind not in ("memory", "rabbitmq"):
            raise ValueError(f"kind must be 'memory' or 'rabbitmq', not {kind!r}")
        if (kind == "memory") != (memory is not None):
            raise ValueError("a memory harness needs its MemoryBroker (and only it)")
        self.kind = kind
        self.settings = settings
        self.memory = memory
        self.prefix = prefix
        self.errors: list[BaseException] = []  # handler exceptions, first first
        self._loop_thread = loop_thread
        self._runs: list[_Run] = []
        self._publishers: list[Publisher] = []
        self._declared: list[str] = []  # queues to delete at the end (RabbitMQ)
        self._workers: dict[type[Worker], type[Worker]] = {}
        self._registered: dict[str, type[Worker] | None] = {}

    # -- what tests use ----------------------------------------------------------------------

    def transport(self) -> Transport | None:
        """The transport to hand to Runner/Publisher/dlq (None: RabbitMQ through pika)."""
        return MemoryTransport(self.memory) if self.memory is not None else None

    def queue_name(self, worker: type[Worker] | str) -> str:
        """The name ``worker``'s queue has on this broker (prefixed on RabbitMQ)."""
        name = worker if isinstance(worker, str) else worker.queue
        return f"{self.prefix}{name}"

    def run(self, *workers: type[Worker], **runner_kwargs: Any) -> _Run:
        """Run ``workers`` for the body of a ``with`` (sync test) or ``async with`` (async test)
        block; their handlers' exceptions are recorded in :attr:`errors`."""
        if not workers:
            raise ValueError("run() needs at least one Worker class")
        runner_kwargs.setdefault("handle_signals", False)
        runner = Runner(
            [self.testable(w) for w in workers],
            settings=self.settings,
            transport=self.transport(),
            **runner_kwargs,
        )
        run = _Run(self, runner)
        self._runs.append(run)
        return run

    def publisher(self) -> Publisher:
        """A sync :class:`Publisher` bound to this broker (closed when the test ends)."""
        publisher = Publisher(settings=self.settings, transport=self.transport())
        self._publishers.append(publisher)
        return publisher

    def async_publisher(self) -> AsyncPublisher:
        """An :class:`AsyncPublisher` bound to this broker: ``async with h.async_publisher()``."""
        return AsyncPublisher(settings=self.settings, transport=self.transport())

    def join(self, timeout: float = 10.0, *, raise_errors: bool = False) -> None:
        """Block until every message has been handled (see :meth:`join_async`); from sync tests
        whose workers run in :meth:`run`'s ``with`` block."""
        if _running_loop() is not None:
            # An async test: blocking here stalls its loop, where `async with run()` runs the
            # workers, and the wait would end in a misleading "still busy".
            raise RuntimeError(
                "join() blocks, and this thread runs an event loop (an async test): use"
                " `await workerkit_broker.join_async()`"
            )
        self._loop_thread().call(self.join_async(timeout, raise_errors=raise_errors))

    async def join_async(self, timeout: float = 10.0, *, raise_errors: bool = False) -> None:
        """Wait until the running workers' queues and the delay queues (retries, delayed
        publishes) are empty and no message is being handled or awaits its ack.

        ``raise_errors=True`` raises the first exception a handler raised (at once, even while
        busy) - including the ones that were retried or dead-lettered. On timeout an
        AssertionError says what is still busy.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # The memory broker is exact; RabbitMQ's counts lag by a network round trip and a
        # message moving between delay levels is briefly in neither: ask for a quiet spell.
        quiet_needed, pause = (2, 0.005) if self.memory is not None else (5, 0.05)
        quiet = 0
        while True:
            if raise_errors and self.errors:
                raise self.errors[0]
            busy = await self._busy()
            quiet = 0 if busy else quiet + 1
            if quiet >= quiet_needed:
                return
            if loop.time() > deadline:
                raise AssertionError(f"join: still busy after {timeout}s: {busy}")
            await asyncio.sleep(pause)

    def dead_letters(self, worker: type[Worker] | str) -> list[DeadLetter]:
        """The messages in ``worker``'s dead-letter queue, oldest first (left in place)."""
        queue = self.queue_name(worker)
        return self._loop_thread().call(
            list_dead(queue, settings=self.settings, transport=self.transport()), 30
        )

    def ready(self, queue: str) -> int:
        """Messages waiting in ``queue`` (its name on this broker: see :meth:`queue_name`)."""
        return self._loop_thread().call(self._ready(queue), 30)

    # -- internals ---------------------------------------------------------------------------

    def testable(self, worker: type[Worker]) -> type[Worker]:
        """``worker`` under this broker's queue name, recording its handler's exceptions."""
        made = self._workers.get(worker)
        if made is None:
            queue = self.queue_name(worker.queue)
            # Defining the subclass registers it under its queue: put back what was there after.
            self._registered.setdefault(queue, Worker.registry.get(queue))
            made = _recording_subclass(worker, queue, self.errors)
            self._workers[worker] = made
            if self.kind == "rabbitmq":
                name = made.queue
                self._declared += [name, Topology.dlq_name(name)]
        return made

    async def _ready(self, queue: str) -> int:
        if self.memory is not None:
            return self.memory.ready_count(queue)
        async with self._channel() as channel:
            ready, _ = await channel.queue_state(queue)
            return ready

    @contextlib.asynccontextmanager
    async def _channel(self) -> AsyncIterator[Channel]:
        connection = await (self.transport() or default_transport()).connect(
            self.settings, name="workerkit-test", on_lost=lambda _e: None
        )
        try:
            yield await connection.channel()
        finally:
            await connection.close()

    async def _busy(self) -> str:
        """What is still going on ('' when idle)."""
        runs = [run for run in self._runs if run.started]
        for run in runs:
            for rt in run.runner.runtimes:
                # Prefetched messages wait in the runtime's deque; handled ones count in flight
                # until their ack is sent (acks are held a few milliseconds to share a frame).
                if rt.busy:
                    return f"{rt.queue}: a message is being handled"
        queues = [rt.queue for run in runs for rt in run.runner.runtimes]
        delays = [spec.name for spec in Topology(self.settings).delay_queues()[1:]]
        if self.memory is not None:
            return self.memory.on_home(lambda: _memory_busy(self.memory, queues, delays))
        async with self._channel() as channel:
            for name in [*queues, *delays]:
                try:
                    ready, _ = await channel.queue_state(name)
                except TopologyError:
                    continue  # not declared (nothing was ever delayed): nothing waits there
                if ready:
                    return f"{name}: {ready} message(s) waiting"
        return ""

    def close(self) -> None:
        """Stop what is still running, close publishers, delete what the test declared."""
        for run in self._runs:
            run.stop()
        for publisher in self._publishers:
            publisher.close()
        for queue, previous in self._registered.items():
            if previous is None:
                Worker.registry.pop(queue, None)
            else:
                Worker.registry[queue] = previous
        if self.kind == "rabbitmq":
            self._loop_thread().call(self._clean_up(), 60)

    async def _clean_up(self) -> None:
        topo = Topology(self.settings)
        # The delay layout is shared by the session's tests: a retry still waiting there
        # belongs to this test, which is over.
        leftovers = [spec.name for spec in topo.delay_queues()]
        async with self._channel() as channel:
            for name in self._declared:
                with contextlib.suppress(WorkerkitError):
                    await channel.delete_queue(name)
            for name in leftovers:
                try:
                    await channel.purge(name)
                except WorkerkitError:
                    break  # never declared (the channel is closed now): nothing to purge


async def delete_layout(settings: Settings, transport: Transport | None = None) -> None:
    """Delete the exchange of ``settings`` and its delay layout (queues first)."""
    topo = Topology(settings)
    connection = await (transport or default_transport()).connect(
        settings, name="workerkit-test", on_lost=lambda _e: None
    )
    try:
        channel = await connection.channel()
        for spec in topo.delay_queues():
            await channel.delete_queue(spec.name)
        for exchange in [topo.main_exchange(), *topo.delay_exchanges()]:
            await channel.delete_exchange(exchange.name)
    finally:
        await connection.close()


def _recording_subclass(
    worker: type[Worker], queue: str, errors: list[BaseException]
) -> type[Worker]:
    """A subclass of ``worker`` on ``queue`` (its own name still bound as a routing key) whose
    handler appends what it raises to ``errors`` before the runner sees it."""
    original = worker.handle
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def handle(self: Worker, *args: Any) -> Any:
            try:
                return await original(self, *args)
            except Exception as exc:
                errors.append(exc)
                raise

    else:

        @functools.wraps(original)
        def handle(self: Worker, *args: Any) -> Any:
            try:
                return original(self, *args)
            except Exception as exc:
                errors.append(exc)
                raise

    bindings = (
        tuple(dict.fromkeys((worker.queue, *worker.bindings)))
        if queue != worker.queue
        else worker.bindings
    )
    attrs: dict[str, Any] = {
        "__module__": worker.__module__,
        "__qualname__": worker.__qualname__,
        "__doc__": worker.__doc__,
        "queue": queue,
        "bindings": bindings,
        "handle": handle,
    }
    return type(worker.__name__, (worker,), attrs)


class _Run:
    """Workers running for the body of a ``with`` / ``async with`` block (see BrokerHarness.run)."""

    def __init__(self, harness: BrokerHarness, runner: Runner) -> None:
        self.harness = harness
        self.runner = runner
        self.started = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._thread: LoopThread | None = None

    async def __aenter__(self) -> Runner:
        await self._start()
        return self.runner

    async def __aexit__(self, *_exc: object) -> None:
        await self._finish()

    def __enter__(self) -> Runner:
        self._thread = self.harness._loop_thread()
        self._thread.call(self._start())
        return self.runner

    def __exit__(self, *_exc: object) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.call(self._finish())

    async def _start(self) -> None:
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(running(self.runner))
        self._stack, self.started = stack, True

    async def _finish(self) -> None:
        stack, self._stack = self._stack, None
        self.started = False
        if stack is not None:
            await stack.aclose()

    def stop(self) -> None:
        """At the end of the test: stop a runner its ``with`` block left running."""
        if self._thread is not None:
            self.__exit__(None, None, None)
        elif self._stack is not None:
            self.runner.stop()  # an ``async with`` that never exited: its loop is gone


def _memory_busy(memory: MemoryBroker | None, queues: list[str], delays: list[str]) -> str:
    """What still waits in the memory broker ('' when idle); runs on the broker's loop."""
    assert memory is not None
    for name in [*queues, *delays]:
        if memory.ready_count(name):
            return f"{name}: {memory.ready_count(name)} message(s) waiting"
    for name in queues:
        if memory.unacked(name):
            return f"{name}: {memory.unacked(name)} message(s) not acked yet"
    return ""
