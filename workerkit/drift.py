"""``workerkit topology --check``: what the code declares compared with what the broker has.

For each worker: its queue and dead-letter queue must exist with the code's arguments, and be
bound (on workerkit's exchanges: the main one and ``<exchange>.delay.out``) with exactly the
code's routing keys. A binding the broker has and the code no longer declares is *stale*:
messages still arrive through it. ``--prune`` removes stale bindings.

How the broker is read:

* the management API (HTTP: ``--management-url``, else ``WORKERKIT_MANAGEMENT_URL``, else port
  15672 on the AMQP host with the same credentials, trusted only if it serves this broker: see
  :mod:`workerkit.management`) sees arguments and bindings exactly;
* without it, AMQP alone can only tell whether a queue exists and whether its arguments are
  equivalent to the code's (a re-declaration the broker refuses, naming the first argument that
  differs). AMQP has no way to list bindings: stale and missing bindings are *not checked*, and
  the report says so;
* an in-memory broker (``MemoryBroker``) is read directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

from . import management
from .errors import TopologyError
from .settings import Settings
from .topology import QueueSpec, Topology
from .transport.base import Transport
from .transport.memory import MemoryBroker
from .worker import Worker

__all__ = ["Drift", "Report", "check", "prune"]

Binding = tuple[str, str]  # (exchange, routing key)


@dataclass(frozen=True)
class Drift:
    """One difference; ``kind`` is missing-queue, argument, missing-binding or stale-binding."""

    kind: str
    queue: str
    detail: str
    binding: Binding | None = None

    def line(self) -> str:
        sign = {"stale-binding": "-", "missing-binding": "+", "missing-queue": "+"}.get(
            self.kind, "~"
        )
        return f"{sign} {self.kind} {self.queue}: {self.detail}"


@dataclass
class Report:
    method: str  # "through the management API", "over AMQP alone..." or "on the memory broker"
    checked: list[str] = field(default_factory=list)  # queue names
    drifts: list[Drift] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)  # what this method cannot see

    @property
    def drifted(self) -> bool:
        return bool(self.drifts)

    def lines(self) -> list[str]:
        out = [f"checked {len(self.checked)} queue(s) {self.method}"]
        out += [d.line() for d in self.drifts]
        out += [f"? not checked: {what}" for what in self.not_checked]
        out.append("drift found" if self.drifts else "no drift")
        return out

    @property
    def sees_stale(self) -> bool:
        return not self.not_checked

    @property
    def stale(self) -> list[Drift]:
        return [d for d in self.drifts if d.kind == "stale-binding"]


class BrokerView(Protocol):
    """What the check reads from a broker."""

    method: str
    sees_bindings: bool

    async def arguments(self, spec: QueueSpec) -> dict[str, Any] | str | None:
        """The queue's arguments (or a sentence about the first difference); None if missing."""
        ...

    async def bindings(self, queue: str) -> set[Binding]:
        """Every binding of ``queue`` except the default exchange's."""
        ...


def expected(settings: Settings, workers: Iterable[type[Worker]]) -> list[QueueSpec]:
    topo = Topology(settings)
    return [spec for worker in workers for spec in topo.worker_queues(worker)]


async def check(settings: Settings, workers: Sequence[type[Worker]], view: BrokerView) -> Report:
    """Compare the queues ``workers`` declare with what ``view`` reads from the broker."""
    topo = Topology(settings)
    ours = {topo.exchange, topo.delay_out}
    report = Report(method=view.method)
    for spec in expected(settings, workers):
        report.checked.append(spec.name)
        current = await view.arguments(spec)
        if current is None:
            report.drifts.append(Drift("missing-queue", spec.name, "not declared on the broker"))
            continue
        if isinstance(current, str):
            report.drifts.append(Drift("argument", spec.name, current))
        else:
            report.drifts += _argument_drifts(spec, current)
        if not view.sees_bindings:
            continue
        have = {b for b in await view.bindings(spec.name) if b[0] in ours}
        want = set(spec.bindings)
        for exchange, key in sorted(want - have):
            report.drifts.append(
                Drift("missing-binding", spec.name, f"{exchange} {key!r}", (exchange, key))
            )
        for exchange, key in sorted(have - want):
            report.drifts.append(
                Drift(
                    "stale-binding",
                    spec.name,
                    f"{exchange} {key!r} (the code no longer declares it)",
                    (exchange, key),
                )
            )
    if not view.sees_bindings:
        report.not_checked.append(
            "bindings (AMQP cannot list them: stale or missing bindings need the management API)"
        )
    return report


def _argument_drifts(spec: QueueSpec, current: dict[str, Any]) -> list[Drift]:
    drifts = []
    for arg in sorted(set(spec.arguments) | set(current)):
        want, have = spec.arguments.get(arg), current.get(arg)
        if want != have:
            drifts.append(
                Drift("argument", spec.name, f"{arg}: code {_shown(want)}, broker {_shown(have)}")
            )
    return drifts


def _shown(value: Any) -> str:
    return "(none)" if value is None else repr(value)


async def prune(
    settings: Settings, stale: Sequence[Drift], transport: Transport | None = None
) -> int:
    """Remove the stale bindings of a report; returns how many."""
    if not stale:
        return 0
    connection = await _connect(settings, transport)
    try:
        channel = await connection.channel()
        for drift in stale:
            assert drift.binding is not None
            exchange, key = drift.binding
            await channel.unbind_queue(drift.queue, exchange, key)
    finally:
        await connection.close()
    return len(stale)


async def _connect(settings: Settings, transport: Transport | None) -> Any:
    from .transport import default_transport

    return await (transport or default_transport()).connect(
        settings, name="workerkit-topology", on_lost=lambda _e: None
    )


# -- ways of reading the broker ---------------------------------------------------------------


class ManagementView:
    """Reads queues and bindings from RabbitMQ's management API (exact)."""

    method = "through the management API"
    sees_bindings = True

    def __init__(self, where: management.Endpoint, client: Any = None) -> None:
        self._where = where
        self._client = client or management.client(where)

    async def reachable(self) -> str | None:
        """None when the API answers and is this broker's own, else why not."""
        return await management.unusable(self._client, self._where)

    async def _get(self, path: str) -> Any:
        response = await self._client.get(self._where.api(path))
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise TopologyError(f"management API {path}: HTTP {response.status_code}")
        return response.json()

    async def arguments(self, spec: QueueSpec) -> dict[str, Any] | str | None:
        found = await self._get(f"/queues/{self._where.vhost_path}/{quote(spec.name, safe='')}")
        return None if found is None else dict(found.get("arguments") or {})

    async def bindings(self, queue: str) -> set[Binding]:
        path = f"/queues/{self._where.vhost_path}/{quote(queue, safe='')}/bindings"
        found = await self._get(path) or []
        return {(b["source"], b["routing_key"]) for b in found if b.get("source")}

    async def close(self) -> None:
        await self._client.aclose()


class AmqpView:
    """What AMQP alone can tell: whether a queue exists and whether the broker accepts the code's
    arguments for it (the broker names the first argument that differs). No bindings."""

    method = "over AMQP alone (no management API)"
    sees_bindings = False

    def __init__(self, settings: Settings, transport: Transport | None = None) -> None:
        self._settings, self._transport = settings, transport

    async def arguments(self, spec: QueueSpec) -> dict[str, Any] | str | None:
        connection = await _connect(self._settings, self._transport)
        try:
            # A channel per step: a refused declaration closes it.
            try:
                await (await connection.channel()).queue_state(spec.name)
            except TopologyError:
                return None  # passive: never creates the queue
            try:
                await (await connection.channel()).declare_queue(spec)
            except TopologyError as exc:
                return str(exc)
            return dict(spec.arguments)  # equivalent, as far as the broker compares
        finally:
            await connection.close()

    async def bindings(self, queue: str) -> set[Binding]:  # pragma: no cover - never asked
        raise NotImplementedError


class MemoryView:
    """Reads a :class:`MemoryBroker` directly (exact)."""

    method = "on the memory broker"
    sees_bindings = True

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    async def arguments(self, spec: QueueSpec) -> dict[str, Any] | str | None:
        queue = self._broker.queues.get(spec.name)
        return None if queue is None else dict(queue.arguments)

    async def bindings(self, queue: str) -> set[Binding]:
        return {
            (exchange.name, b.routing_key)
            for exchange in self._broker.exchanges.values()
            for b in exchange.bindings
            if not b.to_exchange and b.destination == queue
        }


async def view_for(
    settings: Settings, given: str | None, transport: Transport | None
) -> tuple[BrokerView, str | None]:
    """The best view available, and why the management API was not used (None if it was).
    ``given`` is the --management-url option (:func:`workerkit.management.endpoint`)."""
    if transport is not None:
        broker = getattr(transport, "broker", None)
        if isinstance(broker, MemoryBroker):
            return MemoryView(broker), None
    try:
        view = ManagementView(management.endpoint(settings, given))
    except ImportError:
        return AmqpView(settings, transport), "httpx is not installed"
    why = await view.reachable()
    if why is None:
        return view, None
    await view.close()
    return AmqpView(settings, transport), why


async def run_check(
    settings: Settings,
    workers: Sequence[type[Worker]],
    *,
    management_url: str | None = None,
    transport: Transport | None = None,
) -> tuple[Report, str | None]:
    view, why = await view_for(settings, management_url, transport)
    try:
        return await check(settings, workers, view), why
    finally:
        if isinstance(view, ManagementView):
            await view.close()


def _confirmed(question: str) -> bool:
    """A yes on a terminal; no terminal (a pipe, cron) is a no, not click's bare "Aborted!"."""
    import click

    from .cli import interactive

    return interactive() and click.confirm(question, default=False)


def check_command(
    settings: Settings,
    workers: Sequence[type[Worker]],
    prune_stale: bool,
    yes: bool,
    management_url: str | None,
) -> int:
    """``workerkit topology --check [--prune]``: print the report; the exit code."""
    import asyncio

    import click

    from .cli import reported

    with reported():
        report, why = asyncio.run(run_check(settings, workers, management_url=management_url))
    if why is not None:
        click.echo(f"management API not used ({why}); falling back to AMQP", err=True)
    for line in report.lines():
        click.echo(line)
    if not prune_stale or not report.stale:
        if prune_stale and not report.sees_stale:
            click.echo(
                "--prune: stale bindings cannot be seen without the management API", err=True
            )
        return 1 if report.drifted else 0
    if not yes and not _confirmed(f"remove {len(report.stale)} stale binding(s)?"):
        click.echo(
            f"workerkit: error: not pruned: {len(report.stale)} stale binding(s) kept (answer y"
            " on a terminal, or pass --yes)",
            err=True,
        )
        return 1
    with reported():
        removed = asyncio.run(prune(settings, report.stale))
    click.echo(f"removed {removed} stale binding(s)")
    rest = [d for d in report.drifts if d.kind != "stale-binding"]
    return 1 if rest else 0
