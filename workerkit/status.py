"""``workerkit status``: depth, consumers, dead letters and rates of every workerkit queue.

Two sources, best first:

* RabbitMQ's management HTTP API (``WORKERKIT_MANAGEMENT_URL``, default ``http://<broker
  host>:15672/`` with the broker URL's credentials), through httpx: every queue of the vhost,
  with unacked counts and publish/deliver rates. A default (derived) address is used only if
  it serves this broker (:mod:`workerkit.management`), as ``workerkit topology --check`` does.
* Else passive queue declares over AMQP: ready depth and consumers of the queues of the given
  modules (AMQP cannot list queues), no unacked counts, no rates; :attr:`Status.source` says
  ``amqp`` and :attr:`Status.management_error` why the API was not used.

A workerkit queue is one with a ``<queue>.dlq`` next to it (or a queue of the given workers).
The delay layout's queues (``<exchange>.delay.NN``) are shared by every queue, so the messages
waiting in them (retries and scheduled messages) are one total, :attr:`Status.delay_waiting`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import click
import orjson

from . import management
from .errors import ConfigurationError, WorkerkitError
from .settings import Settings
from .topology import LEVELS, Topology
from .transport.base import Channel, Connection
from .worker import Worker

if TYPE_CHECKING:
    import httpx

__all__ = [
    "QueueStatus",
    "Status",
    "collect",
    "format_status",
    "status_command",
]

# Version of the --json document; raised only when a field changes meaning or goes away.
JSON_VERSION = 1


@dataclass
class QueueStatus:
    """One work queue. ``None``: not known from this source (or the queue does not exist)."""

    queue: str
    exists: bool
    ready: int | None
    unacked: int | None
    consumers: int | None
    dlq: int | None
    publish_rate: float | None  # messages/s published to the queue (management only)
    deliver_rate: float | None  # messages/s delivered to consumers (management only)


@dataclass
class Status:
    source: str  # "management" or "amqp"
    queues: list[QueueStatus]
    delay_waiting: int | None  # messages in the delay layout: retries and scheduled messages
    management_url: str  # without credentials
    management_error: str | None = None  # why the API was not used (source "amqp")
    version: int = field(default=JSON_VERSION)

    @property
    def dead_letters(self) -> int:
        return sum(q.dlq or 0 for q in self.queues)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document (docs/observability.md lists its fields)."""
        return {
            "version": self.version,
            "source": self.source,
            "management_url": self.management_url,
            "management_error": self.management_error,
            "queues": [asdict(queue) for queue in self.queues],
            "delay_waiting": self.delay_waiting,
            "dead_letters": self.dead_letters,
        }


async def collect(settings: Settings, workers: Sequence[type[Worker]] = ()) -> Status:
    """The status of the workers' queues (every workerkit queue when ``workers`` is empty)."""
    import httpx  # here, not at import: `workerkit run` never needs it

    where = management.endpoint(settings)
    async with management.client(where) as http:
        error = await management.unusable(http, where)
        if error is None:
            try:
                listed = await _from_management(http, where)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                error = management.describe(exc)
            else:
                return _management_status(settings, listed, workers, where.base)
    if not workers:
        raise ConfigurationError(
            f"the management API at {where.base} is not usable ({error}); without it workerkit"
            " cannot list queues: name the worker modules (workerkit status MODULE...), or set"
            " WORKERKIT_MANAGEMENT_URL"
        )
    return await _from_amqp(settings, workers, where.base, error)


# -- management API ----------------------------------------------------------------------------

_COLUMNS = ",".join(
    (
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
        "message_stats.publish_details.rate",
        "message_stats.deliver_get_details.rate",
    )
)


async def _from_management(
    http: httpx.AsyncClient, where: management.Endpoint
) -> dict[str, dict[str, Any]]:
    url = where.api(f"/queues/{where.vhost_path}")
    reply = await http.get(url, params={"columns": _COLUMNS})
    reply.raise_for_status()
    rows = reply.json()
    if not isinstance(rows, list):
        raise ValueError(f"unexpected answer from {url}")
    return {row["name"]: row for row in rows}


def _rate(row: dict[str, Any], key: str) -> float:
    details = row.get("message_stats", {}).get(key, {})
    return float(details.get("rate", 0.0))


def _management_status(
    settings: Settings,
    rows: dict[str, dict[str, Any]],
    workers: Sequence[type[Worker]],
    base: str,
) -> Status:
    topology = Topology(settings)
    delay_prefix = f"{topology.exchange}.delay."
    if workers:
        names = [w.queue for w in workers]
    else:
        names = sorted(
            name for name in rows if f"{name}.dlq" in rows and not name.startswith(delay_prefix)
        )
    queues = []
    for name in names:
        row, dead = rows.get(name), rows.get(f"{name}.dlq")
        if row is None:
            queues.append(QueueStatus(name, False, None, None, None, None, None, None))
            continue
        queues.append(
            QueueStatus(
                queue=name,
                exists=True,
                ready=int(row.get("messages_ready") or 0),
                unacked=int(row.get("messages_unacknowledged") or 0),
                consumers=int(row.get("consumers") or 0),
                dlq=int(dead.get("messages_ready") or 0) if dead is not None else None,
                publish_rate=_rate(row, "publish_details"),
                deliver_rate=_rate(row, "deliver_get_details"),
            )
        )
    levels = [rows.get(topology.level_name(level)) for level in range(LEVELS)]
    found = [row for row in levels if row is not None]
    waiting = (
        sum(
            int(r.get("messages_ready") or 0) + int(r.get("messages_unacknowledged") or 0)
            for r in found
        )
        if found
        else None
    )
    return Status("management", queues, waiting, base)


# -- AMQP fallback -----------------------------------------------------------------------------


async def _from_amqp(
    settings: Settings, workers: Sequence[type[Worker]], base: str, error: str
) -> Status:
    from .transport import default_transport

    connection = await default_transport().connect(
        settings, name="workerkit-status", on_lost=lambda _exc: None
    )
    try:
        probe = _Probe(connection)
        queues = []
        for worker in workers:
            state = await probe.state(worker.queue)
            dead = await probe.state(Topology.dlq_name(worker.queue))
            queues.append(
                QueueStatus(
                    queue=worker.queue,
                    exists=state is not None,
                    ready=state[0] if state else None,
                    unacked=None,
                    consumers=state[1] if state else None,
                    dlq=dead[0] if dead else None,
                    publish_rate=None,
                    deliver_rate=None,
                )
            )
        topology = Topology(settings)
        waiting: int | None = None
        for level in range(LEVELS):
            state = await probe.state(topology.level_name(level))
            if state is not None:
                waiting = (waiting or 0) + state[0]
    finally:
        with contextlib.suppress(WorkerkitError):
            await connection.close()
    return Status("amqp", queues, waiting, base, management_error=error)


class _Probe:
    """Passive declares; a missing queue closes the channel, so a new one is opened then."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._channel: Channel | None = None

    async def state(self, queue: str) -> tuple[int, int] | None:
        if self._channel is None or not self._channel.is_open:
            self._channel = await self._connection.channel()
        try:
            return await self._channel.queue_state(queue)
        except WorkerkitError:
            if not self._connection.is_open or self._channel.is_open:
                raise  # not a missing queue (that closes the channel, not the connection)
            return None


# -- the command -------------------------------------------------------------------------------


def format_status(status: Status) -> list[str]:
    """The table and its footer, as ``workerkit status`` prints them."""
    from .cli import format_table

    def num(value: int | None) -> str:
        return "-" if value is None else str(value)

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [
        (
            q.queue,
            num(q.ready),
            num(q.unacked),
            num(q.consumers),
            num(q.dlq),
            rate(q.publish_rate),
            rate(q.deliver_rate),
        )
        if q.exists
        else (q.queue, "missing", "-", "-", num(q.dlq), "-", "-")
        for q in status.queues
    ]
    header = ("QUEUE", "READY", "UNACKED", "CONSUMERS", "DLQ", "PUBLISH/S", "DELIVER/S")
    lines = format_table(header, rows) if rows else ["no workerkit queues on this vhost"]
    if status.delay_waiting is None:
        lines.append("delay layout: not declared (WORKERKIT_EXCHANGE's; nothing waiting in it)")
    else:
        lines.append(
            f"delay layout: {status.delay_waiting} message(s) waiting (retries and scheduled"
            " messages)"
        )
    if status.source == "management":
        lines.append(f"source: management API at {status.management_url}")
    else:
        lines.append(
            f"source: AMQP passive declares (management API at {status.management_url}:"
            f" {status.management_error}): no unacked counts, no rates"
        )
    return lines


@click.command(name="status")
@click.argument("targets", nargs=-1, metavar="[MODULE...]")
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON document (see docs/observability.md)."
)
@click.option("--watch", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(0.5),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@click.option("--check", is_flag=True, help="Exit 1 when a dead-letter queue is not empty.")
@click.option("--url", metavar="URL", default=None, help="Broker URL (default: WORKERKIT_URL).")
def status_command(
    targets: tuple[str, ...],
    as_json: bool,
    watch: bool,
    interval: float,
    check: bool,
    url: str | None,
) -> None:
    """Depth, unacked, consumers, DLQ depth and rates of workerkit queues.

    Every workerkit queue on the vhost, or those of the workers in MODULE (module or
    module:Class). Uses the management API when reachable, else AMQP (no rates).
    """
    from .cli import EXIT_FAILED, CliError, load_targets, reported, run_async, settings_from

    if watch and check:
        raise click.UsageError("--check and --watch do not go together")
    settings = settings_from(url)
    with reported():
        workers = load_targets(targets) if targets else []
    if watch:
        with reported():
            _watch(settings, workers, interval, as_json)
        return
    result = run_async(lambda: collect(settings, workers))
    if as_json:
        click.echo(orjson.dumps(result.to_json()).decode())
    else:
        for line in format_status(result):
            click.echo(line)
    if check and result.dead_letters:
        full = ", ".join(f"{q.queue}.dlq ({q.dlq})" for q in result.queues if q.dlq)
        raise CliError(f"{result.dead_letters} dead letter(s): {full}", EXIT_FAILED)


def _watch(
    settings: Settings, workers: Sequence[type[Worker]], interval: float, as_json: bool
) -> None:
    """Refresh until Ctrl-C: in place on a terminal (rich), one document per line with --json."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    async def forever(show: Any) -> None:
        while True:
            started = time.monotonic()
            try:
                show(await collect(settings, workers), None)
            except WorkerkitError as exc:  # the broker may come and go while we watch
                show(None, exc)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    if as_json:

        def emit(status: Status | None, error: Exception | None) -> None:
            doc = status.to_json() if status else {"version": JSON_VERSION, "error": str(error)}
            click.echo(orjson.dumps(doc).decode())
            sys.stdout.flush()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(forever(emit))
        return

    def screen(status: Status | None, error: Exception | None) -> str:
        stamp = time.strftime("%H:%M:%S")
        body = format_status(status) if status else [f"error: {error}"]
        return "\n".join(
            [f"workerkit status at {stamp} (every {interval:g}s, Ctrl-C stops)", *body]
        )

    console = Console()
    if not console.is_terminal:
        # A pipe or a file (a log, `| tee`): rich's live display shows nothing until it stops;
        # each refresh is printed whole instead, with a blank line between them.
        def append(status: Status | None, error: Exception | None) -> None:
            click.echo(screen(status, error) + "\n")
            sys.stdout.flush()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(forever(append))
        return
    with Live(Text("collecting..."), console=console, auto_refresh=False) as live:

        def render(status: Status | None, error: Exception | None) -> None:
            live.update(Text(screen(status, error)), refresh=True)

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(forever(render))
