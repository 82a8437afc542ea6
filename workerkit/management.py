"""RabbitMQ's management HTTP API: where it is, and whether it is the broker's own.

Shared by ``workerkit status`` and ``workerkit topology --check``. The address is, first found:
the one given on the command line, ``WORKERKIT_MANAGEMENT_URL``, else one *derived* from the
AMQP URL (same host, port 15672, or https on 15671 for ``amqps``) with the AMQP credentials.

A derived address is a guess: with several brokers on one host (or a port-forwarded one),
port 15672 may be another broker's API, whose answers would be silently wrong for ours. So a
derived address is trusted only if ``/api/overview`` lists the AMQP URL's port among its AMQP
listeners; an address the user gave is trusted as given. httpx is imported inside the
functions: ``workerkit run`` never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from .settings import Settings

if TYPE_CHECKING:
    import httpx

__all__ = ["Endpoint", "client", "describe", "endpoint", "unusable"]

TIMEOUT = 5.0  # seconds per HTTP request


@dataclass(frozen=True)
class Endpoint:
    """A management API address. ``amqp_port`` is set when ``base`` was derived from the AMQP
    URL: the API must then list that port to be trusted (:func:`unusable`)."""

    base: str  # scheme://host[:port][/path], no credentials, no /api
    auth: tuple[str, str]
    vhost: str
    amqp_port: int | None = None

    @property
    def derived(self) -> bool:
        return self.amqp_port is not None

    def api(self, path: str) -> str:
        """The URL of ``/api<path>``."""
        return f"{self.base}/api{path}"

    @property
    def vhost_path(self) -> str:
        """The vhost as one URL path segment (``/`` is ``%2F``)."""
        return quote(self.vhost, safe="")


def endpoint(settings: Settings, given: str | None = None) -> Endpoint:
    """The API for ``settings``: ``given`` (a command-line option), else
    ``settings.management_url``, else derived from the AMQP URL (the first of a list: any node
    of a cluster serves the whole cluster's API). Credentials in the address win; else the AMQP
    URL's (guest/guest when it has none)."""
    amqp = urlsplit(settings.urls[0])
    vhost = unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
    auth = (unquote(amqp.username or "guest"), unquote(amqp.password or "guest"))
    if given is None and settings.management_url is not None:
        given = settings.management_url.get_secret_value()
    if given is not None:
        parts = urlsplit(given)
        if parts.username is not None:
            auth = (unquote(parts.username), unquote(parts.password or ""))
        host = parts.hostname or "localhost"
        netloc = f"{host}:{parts.port}" if parts.port else host
        base = urlunsplit((parts.scheme or "http", netloc, parts.path.rstrip("/"), "", ""))
        return Endpoint(base, auth, vhost)
    secure = amqp.scheme == "amqps"
    scheme, port = ("https", 15671) if secure else ("http", 15672)
    base = f"{scheme}://{amqp.hostname or 'localhost'}:{port}"
    return Endpoint(base, auth, vhost, amqp_port=amqp.port or (5671 if secure else 5672))


def client(where: Endpoint) -> httpx.AsyncClient:
    import httpx

    return httpx.AsyncClient(auth=where.auth, timeout=TIMEOUT)


async def unusable(http: httpx.AsyncClient, where: Endpoint) -> str | None:
    """None when the API answers ``/api/overview`` and, for a derived address, serves the
    broker of the AMQP URL; else why not, in words (for a "falling back to AMQP" line)."""
    import httpx

    try:
        reply = await http.get(where.api("/overview"))
        reply.raise_for_status()
        overview = reply.json()
        # The AMQP URL's virtual host must be this broker's: else every queue would read as
        # missing (drift, empty status) where AMQP would say the vhost is refused (exit 4).
        vhost = await http.get(where.api(f"/vhosts/{where.vhost_path}"))
        if vhost.status_code == 404:
            return f"it has no virtual host {where.vhost!r}"
        vhost.raise_for_status()
    except (httpx.HTTPError, ValueError) as exc:
        return describe(exc)
    if where.amqp_port is None:
        return None
    return _foreign(overview, where.amqp_port)


def _foreign(overview: Any, amqp_port: int) -> str | None:
    """Why an overview is not the one of the broker listening on ``amqp_port`` (None if it is).

    Only users with the ``monitoring`` or ``administrator`` tag see listeners: without them the
    API cannot be told apart from another broker's, and is not trusted either."""
    listeners = overview.get("listeners") if isinstance(overview, dict) else None
    if not listeners:
        return (
            "the overview lists no listeners (the user needs the monitoring tag), so it cannot"
            f" be told to serve the broker on AMQP port {amqp_port}; set WORKERKIT_MANAGEMENT_URL"
        )
    ports = sorted(
        {
            entry.get("port")
            for entry in listeners
            if isinstance(entry, dict) and "amqp" in str(entry.get("protocol", ""))
        },
        key=str,
    )
    if amqp_port in ports:
        return None
    return (
        f"it serves another broker (AMQP on {ports}, not {amqp_port}); set WORKERKIT_MANAGEMENT_URL"
    )


def describe(exc: BaseException) -> str:
    """An HTTP failure in words."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        if code == 401:
            return "401: the management API refused the credentials"
        return f"HTTP {code}"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused (is the rabbitmq_management plugin enabled?)"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {TIMEOUT:.0f}s"
    return f"{type(exc).__name__}: {exc}"
