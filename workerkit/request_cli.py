"""``workerkit request KEY BODY``: send a request, print the reply (registered in ``cli.py``).

Exit codes (the CLI's, plus one of its own): 0 the reply was printed; 1 the worker gave up on the
request (RemoteError: rejected, exhausted or invalid; its type, message and reason on stderr) or
the request could not be published (unroutable, unconfirmed, a broker unreachable for the whole
``--timeout``); 2 bad usage or settings; 4 credentials refused, or the connection was lost while
waiting for the reply; 5 the request was confirmed but no reply came within ``--timeout``.
"""

from __future__ import annotations

import sys

import click
import orjson

from .cli import (
    EXIT_CONFIG,
    CliError,
    parse_headers,
    read_body,
    reported,
    settings_from,
    url_option,
)
from .errors import RemoteError, RequestTimeout

__all__ = ["EXIT_NO_REPLY", "request_command"]

EXIT_NO_REPLY = 5


@click.command("request")
@click.argument("routing_key")
@click.argument("body")
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    help="Seconds to wait for the reply, publishing included (default: WORKERKIT_PUBLISH_TIMEOUT).",
)
@click.option("--raw", is_flag=True, help="Print the reply body as it came (no JSON formatting).")
@click.option("--header", "-H", "headers", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@url_option
def request_command(
    routing_key: str,
    body: str,
    timeout: float | None,
    raw: bool,
    headers: tuple[str, ...],
    url: str | None,
) -> None:
    """Send BODY (JSON if it parses, else text; '-' reads stdin) as a request and print the reply.

    The reply is printed as indented JSON (text as is, binary to stdout unchanged); --raw prints
    the body exactly as the worker sent it. An empty reply prints nothing. Exit codes: 0 replied,
    1 the worker gave up (RemoteError) or the request was not published (unroutable, broker
    unreachable), 4 credentials refused or connection lost while waiting, 5 no reply in time.
    """
    from .message import Message, decoder_for
    from .publisher import Publisher

    settings = settings_from(url)
    payload = read_body(body)
    parsed_headers = parse_headers(headers)
    with reported(), Publisher(settings=settings) as publisher:
        try:
            value = publisher.request(
                routing_key,
                payload,
                timeout=timeout,
                headers=parsed_headers or None,
                reply_type=Message if raw else None,
            )
            if isinstance(value, Message):  # --raw: the body as sent (decompressed), or nothing
                value = decoder_for(bytes, settings.max_body_size)(value) or None
        except RemoteError as exc:
            raise CliError(f"the worker gave up on the request: {exc}") from None
        except RequestTimeout as exc:
            raise CliError(str(exc), EXIT_NO_REPLY) from None
        except ValueError as exc:  # bad routing key or a reserved header name
            raise CliError(str(exc), EXIT_CONFIG) from None
    _print(value)


def _print(value: object) -> None:
    if value is None:
        return
    if isinstance(value, bytes):
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
        return
    if isinstance(value, str):
        click.echo(value)
        return
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
