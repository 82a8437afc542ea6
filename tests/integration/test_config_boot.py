"""The broker configuration of the dev stack (config/), booted for real on a private node of
the version under test: the workers' user, the management UI, consumer_timeout and the
Prometheus series the dashboard queries."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import urllib.request
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pika
import pytest
from stack_files import ROOT, dashboard_exprs, env_file

if TYPE_CHECKING:
    from broker import PrivateBroker


def _config_node() -> tuple[PrivateBroker, int]:
    """A private node of the version under test booted from config/ (ports moved to free ones,
    nothing else): tests/reliability/broker.py's PrivateBroker with this repo's files, and the
    port its Prometheus endpoint moved to."""
    from broker import PrivateBroker, free_port  # tests/conftest.py put it on sys.path

    http_port, prometheus_port = free_port(), free_port()

    def config(node: Any) -> list[str]:
        overrides = {
            "listeners.tcp.default": f"127.0.0.1:{node.port}",
            "management.tcp.port": str(http_port),
            "load_definitions": node.inner(node.base / "definitions.json"),
        }
        lines = []
        for line in (ROOT / "config/rabbitmq.conf").read_text().splitlines():
            key = line.partition("=")[0].strip()
            lines.append(f"{key} = {overrides.pop(key)}" if key in overrides else line)
        assert not overrides, f"config/rabbitmq.conf lacks {sorted(overrides)}"
        return [*lines, "management.tcp.ip = 127.0.0.1", f"prometheus.tcp.port = {prometheus_port}"]

    node = PrivateBroker(
        config=config,
        plugins=(ROOT / "config/enabled_plugins").read_text().strip(),
        files=[ROOT / "config/definitions.json"],
    )
    node.http_port = http_port
    # Readiness is checked with the workers' user: definitions.json replaces guest.
    url = urlsplit(env_file(ROOT / "config/compose.env")["WORKERKIT_URL"])
    node.url = f"amqp://{url.username}:{url.password}@127.0.0.1:{node.port}/"
    return node, prometheus_port


@pytest.mark.integration
@pytest.mark.skipif(
    (
        (os.environ.get("WORKERKIT_TEST_BROKER", "3.10") in ("", "3.10"))
        and shutil.which("rabbitmq-server") is None
    )
    or os.geteuid() != 0,
    reason="booting a private RabbitMQ node needs rabbitmq-server and root (Docker users: compose)",
)
def test_rabbitmq_boots_from_config_with_the_dev_user_and_management() -> None:
    node, prometheus_port = _config_node()
    try:
        node.start()
        url = urlsplit(env_file(ROOT / "config/compose.env")["WORKERKIT_URL"])
        user, password = url.username or "", url.password or ""
        # The workers' credentials work: definitions.json was loaded and its hash is right.
        params = pika.URLParameters(f"amqp://{user}:{password}@127.0.0.1:{node.port}/")
        pika.BlockingConnection(params).close()
        # The management UI answers that user: enabled_plugins and the administrator tag work.
        request = urllib.request.Request(f"http://127.0.0.1:{node.http_port}/api/whoami")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert json.loads(reply.read())["name"] == user
        # rabbitmq.conf took effect, with the consumer_timeout the workers are told about.
        expected = 1000 * int(
            env_file(ROOT / "config/compose.env")["WORKERKIT_BROKER_CONSUMER_TIMEOUT"]
        )
        result = node.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
        assert result.stdout.strip() == f"{{ok,{expected}}}", result.stdout + result.stderr
        # The broker's per-object Prometheus endpoint has the series the dashboard queries.
        connection = pika.BlockingConnection(params)
        connection.channel().queue_declare("dash.dlq", durable=True)
        connection.close()
        scrape = f"http://127.0.0.1:{prometheus_port}/metrics/per-object"
        with urllib.request.urlopen(scrape, timeout=10) as reply:
            exposition = reply.read().decode()
        assert 'queue="dash.dlq"' in exposition
        used = {n for e in dashboard_exprs() for n in re.findall(r"rabbitmq_[a-z_]+", e)}
        exported = set(re.findall(r"^(rabbitmq_[a-z_]+)", exposition, re.M))
        assert used and used <= exported, used - exported
    finally:
        node.stop()
