"""The ``workerkit`` command (also ``python -m workerkit``): run, publish, request, topology, dlq.

Errors are one line on stderr, ``workerkit: error: ...``, never a traceback, with an exit code a
script or an orchestrator can act on:

====  ===================================================================
0     success (including a graceful drain after SIGTERM/SIGINT)
1     the operation failed (unroutable or unconfirmed publish, id not found)
2     bad usage or configuration (settings, targets that do not import)
3     topology clash (a queue exists with other arguments, or is missing)
4     cannot connect, or credentials/permissions refused
5     ``request``: no reply within the timeout
====  ===================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import click
import orjson

from . import __version__, dlq
from .errors import (
    ConfigurationError,
    ConnectionFailed,
    TopologyError,
    WorkerkitError,
)
from .log import configure_logging
from .settings import Settings, load_settings
from .transport.base import Transport
from .worker import Worker

__all__ = ["cli", "load_targets", "main"]

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_TOPOLOGY = 3
EXIT_CONNECTION = 4

# How long finished handler threads get to exit on their own before the process stops waiting.


class CliError(click.ClickException):
    """A failure reported as one ``workerkit: error: ...`` line with a meaningful exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        # click declares exit_code a ClassVar, yet reads it per instance; one class, many codes.
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: Any = None) -> None:
        click.echo(f"workerkit: error: {self.format_message()}", err=True)


def exit_code_for(exc: WorkerkitError) -> int:
    if isinstance(exc, ConfigurationError):
        return EXIT_CONFIG
    if isinstance(exc, TopologyError):
        return EXIT_TOPOLOGY
    if isinstance(exc, ConnectionFailed):  # AccessRefused included
        return EXIT_CONNECTION
    return EXIT_FAILED


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn workerkit errors into one-line CLI errors."""
    try:
        yield
    except WorkerkitError as exc:
        raise CliError(str(exc) or type(exc).__name__, exit_code_for(exc)) from None


def settings_from(url: str | None) -> Settings:
    with reported():
        return load_settings(url=url)


def run_async(start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with reported():
        return asyncio.run(start())


# -- targets -----------------------------------------------------------------------------------


def load_targets(targets: Sequence[str]) -> list[type[Worker]]:
    """Worker classes named by ``module:Class`` or ``module`` targets; ConfigurationError if not.

    The current directory is importable, as with ``python -m``.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    workers: list[type[Worker]] = []
    for target in targets:
        workers.extend(_load_target(target))
    return list(dict.fromkeys(workers))


def _load_target(target: str) -> list[type[Worker]]:
    module_name, _, attr = target.partition(":")
    if not module_name or (":" in target and not attr):
        raise ConfigurationError(f"bad target {target!r}: expected 'module' or 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is reported the same way
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigurationError(
            f"cannot import {module_name!r}: {type(exc).__name__}: {detail}".rstrip(": ")
        ) from None
    if not attr:
        found = [
            obj
            for obj in vars(module).values()
            if _is_worker(obj) and obj.__module__ == module.__name__
        ]
        if not found:
            raise ConfigurationError(f"module {module_name!r} defines no Worker subclass")
        return found
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigurationError(f"cannot import {target!r}: {module_name!r} has no {part!r}")
        obj = getattr(obj, part)
    if not _is_worker(obj):
        what = (
            "an abstract Worker"
            if isinstance(obj, type) and issubclass(obj, Worker)
            else (
                f"a {type(obj).__name__}" if not isinstance(obj, type) else f"class {obj.__name__}"
            )
        )
        raise ConfigurationError(f"{target!r} is {what}, not a concrete Worker subclass")
    return [obj]


def _is_worker(obj: object) -> bool:
    return (
        isinstance(obj, type)
        and issubclass(obj, Worker)
        and not obj.__dict__.get("abstract", False)
    )


# -- the command group -------------------------------------------------------------------------

# Typed so that request_cli.py (imported at the bottom, a cycle) sees its type too.
url_option: Callable[[Callable[..., Any]], Callable[..., Any]] = click.option(
    "--url",
    metavar="URL",
    default=None,
    help="Broker URL (default: WORKERKIT_URL, then amqp://guest:guest@localhost:5672/).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="workerkit")
def cli() -> None:
    """workerkit: RabbitMQ workers you can trust."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``workerkit`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="workerkit")


# -- run ---------------------------------------------------------------------------------------


@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@click.option("--concurrency", type=click.IntRange(1, 10000), help="Handlers in flight per worker.")
@click.option("--prefetch", type=click.IntRange(1, 65535), help="Broker QoS per worker.")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
    help="Default: WORKERKIT_LOG_LEVEL (INFO).",
)
@click.option(
    "--log-format", type=click.Choice(["plain", "json"]), help="Default: WORKERKIT_LOG_FORMAT."
)
@url_option
@click.option("--burst", is_flag=True, help="Stop once every queue is empty (batch jobs, tests).")
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    help="Serve /health (liveness), /ready (readiness) and /metrics (Prometheus) on this port.",
)
@click.option("--health-host", default="0.0.0.0", show_default=True, help="Health bind address.")
@click.option(
    "--processes",
    type=click.IntRange(1, 256),
    help="Worker processes under one supervising parent (default: WORKERKIT_PROCESSES, 1).",
)
@click.option("--status-fd", type=int, hidden=True, help="Set by the supervisor for its children.")
@click.option("--child-index", type=int, hidden=True, help="Set by the supervisor: [child=N].")
@click.option(
    "--child-metrics",
    is_flag=True,
    hidden=True,
    help="Set by a supervisor that serves /metrics: record them for it.",
)
def run(
    targets: tuple[str, ...],
    concurrency: int | None,
    prefetch: int | None,
    log_level: str | None,
    log_format: str | None,
    url: str | None,
    burst: bool,
    health_port: int | None,
    health_host: str,
    processes: int | None,
    status_fd: int | None,
    child_index: int | None,
    child_metrics: bool,
) -> None:
    """Run workers until SIGTERM/SIGINT, then drain in-flight handlers and exit 0.

    TARGET is module:Class, or a module to run every Worker defined in it. With --processes N,
    a supervising parent runs N worker processes and restarts any that crash (docs/deploy.md).
    """
    from .runner import Runner, exit_past_stuck_handlers

    settings = settings_from(url)
    configure_logging(
        (log_level or settings.log_level).upper(),
        log_format or settings.log_format,
        child=child_index,
    )
    middleware = []
    # /metrics is served with the probes: by this process, or by the supervisor of its group
    # from what its children record (prometheus_client's multiprocess files).
    if health_port is not None or child_metrics:
        from .metrics import Metrics

        middleware.append(Metrics())
    with reported():
        workers = load_targets(targets)
        runner = Runner(
            workers,
            settings=settings,
            prefetch=prefetch,
            concurrency=concurrency,
            burst=burst,
            middleware=middleware,
        )
    if (processes or settings.processes) > 1:
        from .supervisor import supervise

        options: dict[str, object] = {"--concurrency": concurrency, "--prefetch": prefetch}
        options |= {"--burst": burst, "--log-level": log_level, "--log-format": log_format}
        count = processes or settings.processes
        code = run_async(
            lambda: supervise(targets, options, count, settings, health_host, health_port)
        )
        sys.exit(code)
    run_async(lambda: _run_with_health(runner, health_host, health_port, status_fd))
    exit_past_stuck_handlers()


async def _run_with_health(
    runner: Any, host: str, port: int | None, status_fd: int | None = None
) -> None:
    reporter = None
    if status_fd is not None:
        from .supervisor import report_to_supervisor

        # A terminal's Ctrl-C reaches the whole group; the supervisor relays it as SIGTERM,
        # which alone must start the drain (a second stop request would cut it short).
        signal.signal(signal.SIGINT, signal.SIG_IGN)

        reporter = asyncio.ensure_future(
            report_to_supervisor(
                status_fd, lambda: bool(runner.healthy), runner.stop, runner.is_ready
            )
        )
    try:
        if port is None:
            await runner.run()
            return
        from .metrics import render

        healthy = lambda: bool(runner.healthy)  # noqa: E731
        async with health_endpoint(healthy, host, port, is_ready=runner.is_ready, metrics=render):
            await runner.run()
    finally:
        if reporter is not None:
            reporter.cancel()


@contextlib.asynccontextmanager
async def health_endpoint(
    is_healthy: Callable[[], bool],
    host: str,
    port: int | None,
    *,
    is_ready: Callable[[], bool] | None = None,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
) -> AsyncIterator[None]:
    """Serve /health, /ready and /metrics on host:port for the block (nothing when port is
    None); /ready follows is_healthy unless is_ready is given."""
    if port is None:
        yield
        return
    from .health import serve_health

    try:
        server = await serve_health(is_healthy, host, port, is_ready=is_ready, metrics=metrics)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve health on {host}:{port}: {exc.strerror}") from None
    try:
        yield
    finally:
        await server.close()


# -- publish -----------------------------------------------------------------------------------


def read_body(body: str) -> object:
    """The BODY argument as sent: ``-`` reads stdin, and stdin that is not UTF-8 text (an image,
    a protobuf) goes as bytes, application/octet-stream; else :func:`parse_body`."""
    if body != "-":
        return parse_body(body)
    data = sys.stdin.buffer.read()
    try:
        return parse_body(data.decode("utf-8"))
    except UnicodeDecodeError:
        return data


def parse_body(text: str) -> object:
    """JSON if ``text`` parses as JSON, else the text itself (sent as text/plain)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if isinstance(value, str):  # '"an order"' is a JSON string: as a str it would go as text
        return orjson.Fragment(text.strip().encode())
    return value


def parse_headers(pairs: Sequence[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--header")
        headers[key] = value
    return headers


@cli.command()
@click.argument("routing_key")
@click.argument("body")
@click.option("--header", "-H", "headers", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--delay", type=click.FloatRange(0), help="Deliver after this many seconds.")
@click.option("--message-id", help="Default: a new random id.")
@click.option("--correlation-id")
@url_option
def publish(
    routing_key: str,
    body: str,
    headers: tuple[str, ...],
    delay: float | None,
    message_id: str | None,
    correlation_id: str | None,
    url: str | None,
) -> None:
    """Publish BODY (JSON if it parses, else text; '-' reads stdin) and print its message id.

    Returns once the broker confirmed the message; a routing key no queue is bound to fails.
    """
    from .publisher import Publisher

    settings = settings_from(url)
    payload = read_body(body)
    parsed_headers = parse_headers(headers)
    with reported(), Publisher(settings=settings) as publisher:
        try:
            sent = publisher.publish(
                routing_key,
                payload,
                headers=parsed_headers or None,
                message_id=message_id,
                correlation_id=correlation_id,
                delay=delay,
            )
        except ValueError as exc:  # bad routing key or a reserved header name
            raise CliError(str(exc), EXIT_CONFIG) from None
    click.echo(sent)


# -- topology ----------------------------------------------------------------------------------


@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@url_option
@click.option("--check", is_flag=True, help="Compare with the broker instead; exit 1 on drift.")
@click.option("--prune", is_flag=True, help="With --check: remove stale bindings.")
@click.option("--yes", is_flag=True, help="With --prune: do not ask for confirmation.")
@click.option("--management-url", default=None, help="Management API (default: host:15672).")
def topology(
    targets: tuple[str, ...],
    url: str | None,
    check: bool,
    prune: bool,
    yes: bool,
    management_url: str | None,
) -> None:
    """Declare the exchanges and queues of TARGET workers (idempotent) and list them."""
    settings = settings_from(url)
    if management_url is not None:
        from .settings import check_management_url

        try:
            check_management_url(management_url)
        except ValueError as exc:
            raise CliError(f"--management-url: {exc}", EXIT_CONFIG) from None
    with reported():
        workers = load_targets(targets)
    if check or prune:
        from .drift import check_command

        sys.exit(check_command(settings, workers, prune, yes, management_url))
    run_async(lambda: _declare(settings, workers))
    for line in describe_topology(settings, workers):
        click.echo(line)


async def _declare(
    settings: Settings, workers: Sequence[type[Worker]], transport: Transport | None = None
) -> None:
    from .topology import Topology
    from .transport import default_transport

    connection = await (transport or default_transport()).connect(
        settings, name="workerkit-topology", on_lost=lambda _exc: None
    )
    try:
        topology = Topology(settings)
        await topology.adopt_dead_letter_queues(connection, workers)
        await topology.declare(await connection.channel(), workers)
    finally:
        await connection.close()


def describe_topology(settings: Settings, workers: Sequence[type[Worker]]) -> list[str]:
    """What :meth:`Topology.declare` declares, as readable lines."""
    from .topology import LEVELS, UNIT_MS, Topology

    topo = Topology(settings)
    lines = [
        f"exchange {topo.exchange} (topic, durable)",
        f"delay layout: exchanges and queues {topo.level_name(0)} .. {topo.level_name(LEVELS - 1)}"
        f" ({LEVELS} binary TTL levels of {UNIT_MS} ms units), {topo.delay_out},"
        f" {topo.unroutable}",
    ]
    for worker in workers:
        lines.append(f"worker {worker.__module__}.{worker.__qualname__}")
        for spec in topo.worker_queues(worker):
            lines.append(f"  queue {spec.name}")
            for key, value in spec.arguments.items():
                lines.append(f"    {key} = {value}")
            for exchange, key in spec.bindings:
                lines.append(f"    bound to {exchange} with {_short_key(key)!r}")
    return lines


def _short_key(key: str) -> str:
    # The delay.out bindings carry one '*' per delay level; 28 of them are noise to a reader.
    from .topology import LEVELS

    stars = ".".join(["*"] * LEVELS)
    return key.replace(stars, f"<{LEVELS} delay bits>")


@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@click.option("--yaml", "as_yaml", is_flag=True, help="YAML instead of JSON.")
@click.option("--title", default="workerkit workers", help="The document's info.title.")
def asyncapi(targets: tuple[str, ...], as_yaml: bool, title: str) -> None:
    """Print the AsyncAPI 3.0 document of TARGET workers (no broker needed)."""
    from .asyncapi import document, render

    with reported():
        workers = load_targets(targets)
        click.echo(render(document(settings_from(None), workers, title=title), yaml=as_yaml))


# -- dlq ---------------------------------------------------------------------------------------


@cli.group(name="dlq")
def dlq_group() -> None:
    """Inspect, replay and purge dead-letter queues (QUEUE is the work queue; QUEUE.dlq works)."""


@dlq_group.command(name="count")
@click.argument("queue")
@url_option
def dlq_count(queue: str, url: str | None) -> None:
    """How many messages wait in the DLQ: one number on stdout (for scripts)."""
    settings = settings_from(url)
    click.echo(run_async(lambda: dlq.count(queue, settings=settings)))


@dlq_group.command(name="list")
@click.argument("queue")
@click.option("--limit", type=click.IntRange(1), default=1000, show_default=True)
@url_option
def dlq_list(queue: str, limit: int, url: str | None) -> None:
    """A table of dead messages, oldest first: id, reason, error, attempts, failed at."""
    settings = settings_from(url)
    dead = run_async(lambda: dlq.list_dead(queue, settings=settings, limit=limit))
    if not dead:
        click.echo(f"{dlq.dlq_of(queue)} is empty")
        return
    rows = [
        (
            d.id,
            d.reason,
            _one_line(f"{_short_type(d.error_type)}: {d.error_message or ''}", 60)
            if d.error_type
            else "-",
            str(d.attempts) if d.attempts is not None else "-",
            d.failed_at or "-",
        )
        for d in dead
    ]
    for line in format_table(("ID", "REASON", "ERROR", "ATTEMPTS", "FAILED AT"), rows):
        click.echo(line)
    total = run_async(lambda: dlq.count(queue, settings=settings))
    footer = f"{total} message(s) in {dlq.dlq_of(queue)}"
    click.echo(footer + (f" (showing the first {len(dead)})" if total > len(dead) else ""))


@dlq_group.command(name="show")
@click.argument("queue")
@click.argument("message_id", metavar="ID")
@click.option("--full", is_flag=True, help="Print the whole body, not a preview.")
@url_option
def dlq_show(queue: str, message_id: str, full: bool, url: str | None) -> None:
    """Every header and the body of one dead message."""
    settings = settings_from(url)
    found = run_async(lambda: dlq.show(queue, message_id, settings=settings))
    if not found:
        raise CliError(f"no message with id {message_id!r} in {dlq.dlq_of(queue)}")
    for index, dead in enumerate(found):
        if index:
            click.echo("")
        if len(found) > 1:
            click.echo(f"# copy {index + 1} of {len(found)} with this id")
        for line in format_dead_letter(dead, full=full):
            click.echo(line)


@dlq_group.command(name="replay")
@click.argument("queue")
@click.option("--id", "ids", multiple=True, metavar="ID", help="Repeatable.")
@click.option("--all", "replay_all", is_flag=True, help="Every message in the DLQ.")
@url_option
def dlq_replay(queue: str, ids: tuple[str, ...], replay_all: bool, url: str | None) -> None:
    """Move dead messages back to the work queue as first attempts (confirmed before removal)."""
    if bool(ids) == replay_all:
        raise click.UsageError("give --id ID (repeatable) or --all")
    from .progress import progress_bar

    settings = settings_from(url)
    wanted = None if replay_all else ids
    with progress_bar(f"replaying {dlq.dlq_of(queue)}") as start:
        result = run_async(lambda: dlq.replay(queue, wanted, settings=settings, progress=start))
    target = dlq.work_queue_of(queue)
    click.echo(f"replayed {len(result.replayed)} message(s) to {target}")
    if result.not_found:
        raise CliError(f"not in {dlq.dlq_of(queue)}: {', '.join(result.not_found)}")


@dlq_group.command(name="purge")
@click.argument("queue")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@url_option
def dlq_purge(queue: str, yes: bool, url: str | None) -> None:
    """Delete every message in the DLQ (asks first unless --yes)."""
    settings = settings_from(url)
    name = dlq.dlq_of(queue)
    if not yes:
        waiting = run_async(lambda: dlq.count(queue, settings=settings))
        if waiting == 0:
            click.echo(f"{name} is already empty")
            return
        if not interactive():
            raise CliError(
                f"refusing to purge {waiting} message(s) from {name} without confirmation:"
                " stdin is not a terminal; pass --yes"
            )
        if not click.confirm(f"Delete {waiting} message(s) from {name}? This cannot be undone"):
            raise CliError(f"not purged: {name} keeps its {waiting} message(s)")
    from .progress import spinner

    with spinner(f"purging {name}"):  # one broker operation: nothing to count meanwhile
        purged = run_async(lambda: dlq.purge(queue, settings=settings))
    click.echo(f"purged {purged} message(s) from {name}")


def interactive() -> bool:
    """stdin is a terminal: a question can be asked (a pipe or cron cannot answer one)."""
    return sys.stdin is not None and sys.stdin.isatty()


# -- formatting --------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), *(line(row) for row in rows)]


def format_dead_letter(dead: dlq.DeadLetter, *, full: bool) -> list[str]:
    lines = [
        f"id:           {dead.id}",
        f"reason:       {dead.reason}",
        f"error:        {dead.error_type or '-'}: {dead.error_message or ''}".rstrip(": "),
        f"attempts:     {dead.attempts if dead.attempts is not None else '-'}",
        f"first failed: {dead.first_failure or '-'}",
        f"last failed:  {dead.failed_at or '-'}",
        f"was sent to:  exchange {dead.original_exchange!r}"
        f" routing key {dead.original_routing_key!r}",
        f"content type: {dead.content_type or '-'}",
        "headers:",
    ]
    for key in sorted(dead.headers):
        if key == "workerkit-traceback":
            continue
        lines.append(f"  {key}: {_plain(dead.headers[key])!r}")
    if dead.traceback:
        lines.append("traceback:")
        lines.extend("  " + row for row in dead.traceback.rstrip().splitlines())
    lines.append(f"body ({len(dead.body)} bytes):")
    preview = dead.body_preview(limit=10**9 if full else 2000)
    lines.extend("  " + row for row in preview.splitlines() or [""])
    return lines


def _short_type(qualified: str | None) -> str:
    return (qualified or "").rsplit(".", 1)[-1]


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _plain(value: Any) -> Any:
    """Header values as Python shows them (pika's AMQP long integers print as ``1L``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


# -- commands defined in their own modules ---------------------------------------------------------

from .request_cli import request_command  # noqa: E402
from .status import status_command  # noqa: E402  (it uses the helpers above)

cli.add_command(status_command)
cli.add_command(request_command)
