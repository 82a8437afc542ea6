"""The dev stack's files agree with each other and with the code: compose parses, every service
runs something that imports, every file it mounts or reads exists, and the broker user in the
workers' URL is the one definitions.json creates, with that password."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from stack_files import dashboard_exprs, env_file

from workerkit import Worker
from workerkit.cli import load_targets
from workerkit.settings import Settings
from workerkit.supervisor import KILL_MARGIN

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # Targets resolve from the working directory, as `workerkit run` does in the container.
    monkeypatch.chdir(ROOT)


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    if isinstance(command, str):
        return command.split()
    if command[:2] == ["sh", "-c"]:
        script: str = command[2]
        return script.split()
    return list(command)


def _workerkit_targets(words: list[str], verb: str) -> list[list[str]]:
    """Targets of every ``workerkit VERB target... [--option value]`` in a command line."""
    found = []
    for i, word in enumerate(words[:-1]):
        if word == "workerkit" and words[i + 1] == verb:
            targets = []
            for arg in words[i + 2 :]:
                if arg.startswith("-") or arg in ("&&", ";", "||"):
                    break
                targets.append(arg)
            found.append(targets)
    return found


INFRA = {"rabbitmq", "prometheus", "grafana"}


def _app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The default stack's app services (the `cluster` profile is checked on its own below)."""
    return {
        name: s
        for name, s in compose["services"].items()
        if name not in INFRA and not s.get("profiles")
    }


def _worker_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: s
        for name, s in _app_services(compose).items()
        if _workerkit_targets(_command(s), "run")
    }


def test_broker_is_a_current_rabbitmq_4_with_management_and_a_health_check(
    compose: dict[str, Any],
) -> None:
    broker = compose["services"]["rabbitmq"]
    # 4.3: the newest release workerkit is tested on (docs/brokers.md); 3.10 is out of support.
    assert broker["image"] == "rabbitmq:4.3-management"
    test = broker["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "rabbitmq-diagnostics"
    assert {"ping", "check_port_connectivity"} & set(test)
    assert "15672:15672" in broker["ports"]


def test_every_app_service_waits_for_a_healthy_broker(compose: dict[str, Any]) -> None:
    services = _app_services(compose)
    assert {"receipts", "thumbnails", "audit", "webapp", "producer"} <= set(services)
    for name, service in services.items():
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name


def test_each_example_worker_has_its_own_service_with_a_real_worker_class(
    compose: dict[str, Any],
) -> None:
    run_targets: list[str] = []
    for name, service in _app_services(compose).items():
        for targets in _workerkit_targets(_command(service), "run"):
            assert len(targets) == 1, f"{name}: one worker per process"
            workers = load_targets(targets)
            assert len(workers) == 1 and issubclass(workers[0], Worker), name
            assert not workers[0].__dict__.get("abstract", False)
            run_targets.extend(targets)
    assert sorted(run_targets) == [
        "workers.audit:AuditLog",
        "workers.pricing:Pricing",
        "workers.receipts:SendReceipt",
        "workers.thumbnails:MakeThumbnail",
    ]


def test_the_producer_declares_every_worker_queue_before_publishing(
    compose: dict[str, Any],
) -> None:
    words = _command(compose["services"]["producer"])
    (targets,) = _workerkit_targets(words, "topology")
    declared = {w.queue for w in load_targets(targets)}
    run = [
        t for s in _app_services(compose).values() for t in _workerkit_targets(_command(s), "run")
    ]
    assert {w.queue for targets in run for w in load_targets(targets)} <= declared
    assert words.index("topology") < words.index("workers.produce")


def test_python_modules_run_by_services_exist_and_have_main(compose: dict[str, Any]) -> None:
    modules = []
    for service in _app_services(compose).values():
        words = _command(service)
        modules += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m"]
    assert sorted(modules) == ["workers.produce", "workers.webapp"]
    for module in modules:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        assert re.search(r"^def main\(", Path(spec.origin).read_text(), re.M), module


def test_env_files_exist_and_hold_valid_settings(compose: dict[str, Any]) -> None:
    for name, service in _app_services(compose).items():
        for listed in service["env_file"]:
            path = ROOT / listed
            assert path.is_file(), f"{name}: {listed} is missing"
            pairs = env_file(path)
            workerkit_keys = {k: v for k, v in pairs.items() if k.startswith("WORKERKIT_")}
            fields = {k.removeprefix("WORKERKIT_").lower(): v for k, v in workerkit_keys.items()}
            assert set(fields) <= set(Settings.model_fields), listed
            if workerkit_keys:
                # Every value must parse: the same validation the container would run.
                Settings(**fields)
                assert workerkit_keys == pairs, f"{listed}: keep app settings out of it"


def test_mounted_config_files_exist(compose: dict[str, Any]) -> None:
    mounts = [v for s in compose["services"].values() for v in s.get("volumes", [])]
    host_paths = [m.split(":")[0] for m in mounts if m.startswith("./")]
    assert len(host_paths) >= 3
    for host_path in host_paths:
        assert (ROOT / host_path).is_file(), host_path


def _check_rabbit_sha256(password: str, password_hash: str) -> bool:
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def test_broker_user_in_the_url_exists_with_that_password_and_permissions(
    compose: dict[str, Any],
) -> None:
    url = urlsplit(env_file(ROOT / "config/compose.env")["WORKERKIT_URL"])
    assert url.hostname == "rabbitmq"
    definitions = json.loads((ROOT / "config/definitions.json").read_text())
    (user,) = [u for u in definitions["users"] if u["name"] == url.username]
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert _check_rabbit_sha256(url.password or "", user["password_hash"])
    vhost = url.path.removeprefix("/") or "/"
    (grant,) = [
        p for p in definitions["permissions"] if p["user"] == user["name"] and p["vhost"] == vhost
    ]
    assert grant["configure"] == grant["write"] == grant["read"] == ".*"
    assert not definitions["queues"], "workerkit declares its own queues, with its arguments"


def test_rabbitmq_conf_matches_the_mounts_and_the_workers_settings(
    compose: dict[str, Any],
) -> None:
    conf = dict(
        (key.strip(), value.strip())
        for key, _, value in (
            line.partition("=")
            for line in (ROOT / "config/rabbitmq.conf").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        )
    )
    mounts = compose["services"]["rabbitmq"]["volumes"]
    assert f"./config/definitions.json:{conf['load_definitions']}:ro" in mounts
    env = env_file(ROOT / "config/compose.env")
    assert int(conf["consumer_timeout"]) == 1000 * int(env["WORKERKIT_BROKER_CONSUMER_TIMEOUT"])
    plugins = (ROOT / "config/enabled_plugins").read_text()
    assert re.fullmatch(r"\[[a-z_,]+\]\.\n", plugins) and "rabbitmq_management" in plugins


# -- observability: probes, Prometheus, Grafana ------------------------------------------------


def _health_port(service: dict[str, Any]) -> int:
    words = _command(service)
    return int(words[words.index("--health-port") + 1])


def test_worker_containers_are_healthy_only_when_ready(compose: dict[str, Any]) -> None:
    workers = _worker_services(compose)
    assert len(workers) == 4
    for name, service in workers.items():
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        assert f"http://127.0.0.1:{_health_port(service)}/ready" in test[3], name
        compile(test[3], name, "exec")  # the probe is valid Python


def test_prometheus_scrapes_every_worker_and_the_broker(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    (mount,) = prometheus["volumes"]
    assert mount == "./config/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    config = yaml.safe_load((ROOT / "config/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    workers = _worker_services(compose)
    (targets,) = [c["targets"] for c in jobs["workerkit"]["static_configs"]]
    assert sorted(targets) == sorted(f"{n}:{_health_port(s)}" for n, s in workers.items())
    assert jobs["workerkit"]["metrics_path"] == "/metrics"
    assert jobs["rabbitmq"]["static_configs"] == [{"targets": ["rabbitmq:15692"]}]
    assert jobs["rabbitmq"]["metrics_path"] == "/metrics/per-object"
    assert "15692:15692" in compose["services"]["rabbitmq"]["ports"]
    assert "rabbitmq_prometheus" in (ROOT / "config/enabled_plugins").read_text()


def test_grafana_loads_the_dashboard_from_prometheus(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(m.rsplit(":", 1)[0].split(":", 1) for m in grafana["volumes"])
    dashboards = yaml.safe_load((ROOT / "config/grafana-dashboards.yml").read_text())
    (provider,) = dashboards["providers"]
    folder = provider["options"]["path"]
    assert mounts["./config/grafana-dashboard.json"].startswith(folder + "/")
    sources = yaml.safe_load((ROOT / "config/grafana-datasources.yml").read_text())
    (source,) = sources["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    titles = " ".join(
        p["title"]
        for p in json.loads((ROOT / "config/grafana-dashboard.json").read_text())["panels"]
    ).lower()
    for topic in ("throughput", "failures", "lag", "dlq depth"):
        assert topic in titles


def test_dashboard_queries_name_metrics_workerkit_exports() -> None:
    from prometheus_client import REGISTRY, generate_latest

    from workerkit.decision import Outcome
    from workerkit.message import Message
    from workerkit.metrics import Metrics
    from workerkit.stats import Timings
    from workerkit.worker import Worker

    class Stats:  # what a runtime hands to on_worker_stats
        queue, in_flight, outcomes, timings = "dash", 0, dict.fromkeys(Outcome, 0), Timings()

    class Dash(Worker):
        queue = "dash"

        async def handle(self, body: dict[str, Any]) -> None:
            pass

    metrics = Metrics()  # one delivery and one publish, so every series is in the exposition
    stats = Stats()
    metrics.on_worker_stats(Dash(), stats)
    stats.timings.observe(Message(b"x", queue="dash", timestamp=1), 0.01, 2.0)
    metrics.on_reconnected(0.1)
    exposition = generate_latest(REGISTRY).decode()
    exported = set(re.findall(r"^(workerkit_[a-z_]+)", exposition, re.M))
    used = {name for expr in dashboard_exprs() for name in re.findall(r"workerkit_[a-z_]+", expr)}
    assert used and used <= exported, used - exported


def test_workers_get_time_to_drain_before_docker_kills_them(compose: dict[str, Any]) -> None:
    grace = float(env_file(ROOT / "config/compose.env")["WORKERKIT_SHUTDOWN_GRACE"])
    for name, service in _app_services(compose).items():
        assert float(service["stop_grace_period"].removesuffix("s")) > grace, name


def test_image_contains_the_package_and_the_examples() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY workerkit ./workerkit" in dockerfile
    assert "COPY workers ./workers" in dockerfile


# -- the `cluster` profile ---------------------------------------------------------------------


def _profile(compose: dict[str, Any], profile: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if profile in s.get("profiles", [])}


def test_cluster_profile_has_three_nodes_of_one_cluster_with_one_cookie(
    compose: dict[str, Any],
) -> None:
    services = _profile(compose, "cluster")
    nodes = {n: s for n, s in services.items() if s.get("image", "").startswith("rabbitmq:")}
    assert sorted(nodes) == ["rabbit1", "rabbit2", "rabbit3"]
    conf = (ROOT / "config/cluster/rabbitmq.conf").read_text()
    listed = set(re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+ = (\S+)$", conf, re.M))
    assert listed == {f"rabbit@{s['hostname']}" for s in nodes.values()}
    assert len({s["environment"]["RABBITMQ_ERLANG_COOKIE"] for s in nodes.values()}) == 1
    for name, node in nodes.items():
        mounts = node["volumes"]
        assert "./config/cluster/rabbitmq.conf:/etc/rabbitmq/rabbitmq.conf:ro" in mounts, name
        assert any(m.endswith(":/var/lib/rabbitmq") and m.startswith(name) for m in mounts), name
        assert node["healthcheck"]["test"][1] == "rabbitmq-diagnostics", name
    # The cluster config is the dev config plus cluster formation: nothing else drifts.
    base = (ROOT / "config/rabbitmq.conf").read_text().splitlines()[1:]
    assert all(line in conf.splitlines() for line in base if line.strip())


def test_cluster_workers_get_every_node_and_wait_for_all_of_them(compose: dict[str, Any]) -> None:
    services = _profile(compose, "cluster")
    apps = {n: s for n, s in services.items() if not s.get("image", "").startswith("rabbitmq:")}
    assert {"cluster-receipts", "cluster-producer"} <= set(apps)
    definitions = json.loads((ROOT / "config/definitions.json").read_text())
    passwords = {u["name"]: u["password_hash"] for u in definitions["users"]}
    for name, service in apps.items():
        assert set(service["depends_on"]) == {"rabbit1", "rabbit2", "rabbit3"}, name
        assert all(d["condition"] == "service_healthy" for d in service["depends_on"].values())
        env = env_file(ROOT / service["env_file"][0])
        settings = Settings(**{k.removeprefix("WORKERKIT_").lower(): v for k, v in env.items()})
        hosts = [urlsplit(u) for u in settings.urls]
        assert sorted(h.hostname or "" for h in hosts) == ["rabbit1", "rabbit2", "rabbit3"]
        for host in hosts:
            assert _check_rabbit_sha256(host.password or "", passwords[host.username or ""])
        for targets in _workerkit_targets(_command(service), "run"):
            assert load_targets(targets), name
        # A supervised group (WORKERKIT_PROCESSES > 1) may take the supervisor's margin too.
        budget = settings.shutdown_grace + (KILL_MARGIN if settings.processes > 1 else 0)
        assert float(service["stop_grace_period"].removesuffix("s")) > budget, name
    assert (
        Settings(
            **{"processes": env_file(ROOT / "config/cluster/cluster.env")["WORKERKIT_PROCESSES"]}
        ).processes
        > 1
    )
