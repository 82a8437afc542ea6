"""workerkit.management: where the management API is and when a derived address is trusted.

The rule is the one `workerkit status` and `workerkit topology --check` share; the brokers'
real APIs are exercised in tests/reliability/test_status_fallback.py and the integration tests.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from workerkit import ConfigurationError, Settings
from workerkit.drift import ManagementView
from workerkit.management import Endpoint, endpoint, unusable


def _settings(url: str, management_url: str | None = None) -> Settings:
    extra = {"management_url": management_url} if management_url else {}
    return Settings(url=url, **extra)


def test_a_derived_address_remembers_the_amqp_port_it_must_serve() -> None:
    where = endpoint(_settings("amqp://u:p%40ss@broker:5673/vh"))
    assert where == Endpoint("http://broker:15672", ("u", "p@ss"), "vh", amqp_port=5673)
    assert where.api("/overview") == "http://broker:15672/api/overview"
    tls = endpoint(_settings("amqps://broker/"))
    assert (tls.base, tls.amqp_port, tls.vhost_path) == ("https://broker:15671", 5671, "%2F")


def test_a_given_address_wins_and_is_trusted_as_given() -> None:
    settings = _settings("amqp://u:p@broker/", "http://admin:secret@mgmt:8080/rabbit/")
    assert endpoint(settings) == Endpoint("http://mgmt:8080/rabbit", ("admin", "secret"), "/")
    # The command-line option (topology --check --management-url) comes before the setting.
    assert endpoint(settings, "http://other:15672").base == "http://other:15672"
    assert endpoint(settings, "http://other:15672").auth == ("u", "p")


def test_a_list_of_broker_urls_derives_the_address_from_the_first() -> None:
    urls = "amqp://u:p@h1:5673/vh,amqp://u:p@h2:5674/vh"
    assert endpoint(_settings(urls)) == Endpoint("http://h1:15672", ("u", "p"), "vh", 5673)
    given = endpoint(_settings(urls, "http://mgmt:15672"))
    assert (given.vhost, given.auth) == ("vh", ("u", "p"))


@pytest.mark.parametrize("bad", ["notaurl", "amqp://h:15672", "http://", "mgmt:15672"])
def test_a_management_url_that_is_no_http_address_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(ConfigurationError, match=r"WORKERKIT_MANAGEMENT_URL.*http://"):
        _settings("amqp://h/", bad)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        # A raw '#' in the password: urlsplit read "s3cret" as the port, and status printed a
        # traceback ending in "Port could not be cast to integer value as 's3cret'".
        ("http://guest:s3cret#PW@127.0.0.1:15672", "percent-encode"),
        ("http://127.0.0.1:abc", "port that is not a number"),
        ("http://127.0.0.1:99999", "outside 1-65535"),
        ("http://user@mgmt:15672", "no password"),
    ],
)
def test_a_management_url_that_does_not_parse_as_it_reads_is_refused(bad: str, words: str) -> None:
    with pytest.raises(ConfigurationError, match="WORKERKIT_MANAGEMENT_URL") as info:
        _settings("amqp://h/", bad)
    assert words in str(info.value) and "s3cret" not in str(info.value)


def test_topology_management_url_option_is_checked_the_same_way() -> None:
    from click.testing import CliRunner

    from workerkit.cli import cli

    bad = "http://guest:s3cret#PW@127.0.0.1:15672"
    result = CliRunner().invoke(
        cli, ["topology", "workers.receipts", "--check", "--management-url", bad]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("workerkit: error: --management-url: ")
    assert "s3cret" not in result.output and "Traceback" not in result.output


def _serving(
    overview: dict[str, Any] | None, status: int = 200, vhosts: tuple[str, ...] = ("/",)
) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        if path.startswith("/api/vhosts/"):
            name = httpx.URL(path).path.removeprefix("/api/vhosts/")
            return httpx.Response(200 if name in vhosts else 404, json={"name": name})
        assert path == "/api/overview"
        return httpx.Response(status, json=overview)

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


def _listeners(*ports: int) -> dict[str, Any]:
    amqp = [{"node": "rabbit@h", "protocol": "amqp", "port": port} for port in ports]
    return {"listeners": [*amqp, {"node": "rabbit@h", "protocol": "http", "port": 15672}]}


OURS = Endpoint("http://127.0.0.1:15672", ("guest", "guest"), "/", amqp_port=41234)


async def test_a_derived_address_is_trusted_only_if_it_lists_our_amqp_port() -> None:
    assert await unusable(_serving(_listeners(5672, 41234)), OURS) is None
    why = await unusable(_serving(_listeners(5672)), OURS)
    assert why is not None
    assert "serves another broker (AMQP on [5672], not 41234)" in why
    assert "WORKERKIT_MANAGEMENT_URL" in why
    # A user without the monitoring tag sees no listeners: the API cannot be told apart.
    why = await unusable(_serving({"management_version": "4.3.6"}), OURS)
    assert why is not None and "monitoring tag" in why


async def test_a_given_address_is_not_second_guessed() -> None:
    given = Endpoint("http://127.0.0.1:15672", ("guest", "guest"), "/")
    assert await unusable(_serving(_listeners(5672)), given) is None


async def test_an_api_without_the_urls_vhost_is_not_used() -> None:
    """Read through it, every queue would be missing: an empty status, false drift."""
    why = await unusable(_serving(_listeners(41234), vhosts=("other",)), OURS)
    assert why == "it has no virtual host '/'"
    vh = Endpoint("http://127.0.0.1:15672", ("guest", "guest"), "a/b")
    assert await unusable(_serving(_listeners(5672), vhosts=("a/b",)), vh) is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [(401, "refused the credentials"), (503, "HTTP 503")],
)
async def test_http_failures_are_said_in_words(status: int, expected: str) -> None:
    why = await unusable(_serving({}, status), OURS)
    assert why is not None and expected in why


async def test_nothing_listening_is_connection_refused() -> None:
    where = Endpoint("http://127.0.0.1:1", ("guest", "guest"), "/", amqp_port=5672)
    async with httpx.AsyncClient() as http:
        why = await unusable(http, where)
    assert why is not None and "connection refused" in why


async def test_topology_check_uses_the_same_rule() -> None:
    view = ManagementView(OURS, _serving(_listeners(5672)))
    why = await view.reachable()
    assert why is not None and "serves another broker" in why
    assert await ManagementView(OURS, _serving(_listeners(41234))).reachable() is None
