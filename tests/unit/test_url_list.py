"""WORKERKIT_URL as a comma-separated list: parsed in one place, validated per URL, redacted."""

from __future__ import annotations

import collections

import pytest

from workerkit import ConfigurationError, Settings
from workerkit.settings import redact_url, split_urls
from workerkit.transport.pika_asyncio import HostOrder

A = "amqp://alice:s3cret-a@node-a:5672/v"
B = "amqps://bob:s3cret-b@node-b:5671/v"
C = "amqp://carol:s3cret-c@node-c/v"


def test_a_list_is_split_trimmed_and_kept_in_order() -> None:
    settings = Settings(url=f" {A} ,{B},, {C}")
    assert settings.urls == [A, B, C]
    assert split_urls(A) == [A]


def test_every_password_of_a_list_is_redacted() -> None:
    settings = Settings(url=f"{A},{B},{C}")
    text = settings.redacted_url + repr(settings) + str(settings.model_dump())
    for secret in ("s3cret-a", "s3cret-b", "s3cret-c"):
        assert secret not in text
    assert redact_url(f"{A},{B}") == "amqp://***@node-a:5672/v,amqps://***@node-b:5671/v"


def test_a_raw_comma_in_a_password_never_leaks_half_of_it() -> None:
    """Found by the URL property test: split at every ',' the list redaction left 'S3CR3T,'."""
    assert redact_url("amqp://0:S3CR3T,@broker:5672/v") == "amqp://***@broker:5672/v"
    mixed = f"amqp://u:se,cret@node-x/v, {B}"
    assert redact_url(mixed) == "amqp://***@node-x/v,amqps://***@node-b:5671/v"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (f"{A},http://x/", "URL 2 of 2 must start with amqp://"),
        (f"amqp://bob@b/,{A}", "URL 1 of 2 names a user but no password"),
        (f"{A},{B},amqp://h:port/", "URL 3 of 3 has a port that is not a number"),
        (" , ", "WORKERKIT_URL: is empty"),
        (f"{A},amqp://h:99999/", "URL 2 of 2 has a port (99999) outside 1-65535"),
        (f"{A},amqp://ho st/", "URL 2 of 2 has white space in its host"),
    ],
)
def test_a_bad_url_in_a_list_is_named_by_position_without_secrets(url: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(url=url)
    assert words in str(info.value)
    assert "s3cret" not in str(info.value)


def test_host_order_is_shuffled_per_process_and_spreads_clients() -> None:
    urls = [f"amqp://u:p@node-{i}/" for i in range(3)]
    firsts = collections.Counter(HostOrder(urls).candidates()[0] for _ in range(600))
    assert set(firsts) == set(urls)
    assert min(firsts.values()) > 120  # about 200 each
    assert HostOrder.of(urls) is HostOrder.of(urls)  # one order per process


def test_a_lost_connection_moves_the_next_connect_to_the_next_host() -> None:
    order = HostOrder([A, B, C])
    first, second, third = order.candidates()
    assert order.connected(first) is False
    order.lost(first)
    assert order.candidates() == [second, third, first]
    order.lost(first)  # the process's second connection to that host: no second move
    assert order.candidates() == [second, third, first]
    assert order.connected(third) is True  # second did not answer
    assert order.candidates() == [third, first, second]


def test_a_raw_comma_in_a_password_is_part_of_the_password_not_a_separator() -> None:
    url = "amqp://alice:s3,cret@node-a/v"
    assert Settings(url=f"{url},{B}").urls == [url, B]


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:s3cret@node-a,node-b/",
        # With ports, the second host read as part of the first one's port.
        "amqp://guest:s3cret@127.0.0.1:39623,127.0.0.1:5672",
        # With slashes, the second host read as the first one's virtual host ",127.0.0.1:5672/".
        "amqp://guest:s3cret@127.0.0.1:39623/,127.0.0.1:5672/",
        "amqp://guest:s3cret@node-a/,node-b",
    ],
)
def test_hosts_listed_without_a_scheme_each_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="each URL of a list starts with amqp://") as info:
        Settings(url=url)
    assert "s3cret" not in str(info.value)


def test_a_comma_in_a_virtual_host_name_is_percent_encoded() -> None:
    assert Settings(url="amqp://guest:guest@node-a/team%2Cone").urls == [
        "amqp://guest:guest@node-a/team%2Cone"
    ]
