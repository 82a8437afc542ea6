"""The deployment examples in deploy/ parse and agree with the code: targets import, settings
validate, the kill deadline is above the drain, probes hit the health port, KEDA scales a real
Deployment on the worker's own queue."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from workerkit.cli import load_targets
from workerkit.settings import Settings
from workerkit.supervisor import KILL_MARGIN

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_every_manifest_has_an_api_version_kind_and_name() -> None:
    docs = documents()
    assert {"Deployment", "ScaledObject", "TriggerAuthentication", "Secret"} <= {
        d["kind"] for d in docs
    }
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]


def test_deployments_run_real_workers_with_valid_settings_and_time_to_drain() -> None:
    (deployment,) = of_kind("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    command = container["command"]
    assert command[:2] == ["workerkit", "run"]
    workers = load_targets([command[2]])
    assert len(workers) == 1, "one Deployment per worker"
    env = env_of(container)
    settings = Settings(**{k.removeprefix("WORKERKIT_").lower(): v for k, v in env.items()})
    assert settings.processes > 1
    # SIGKILL must not come before the supervisor's own deadline (grace + its kill margin).
    assert spec["terminationGracePeriodSeconds"] >= settings.shutdown_grace + KILL_MARGIN
    secret = next(e for e in container["env"] if e["name"] == "WORKERKIT_URL")
    assert secret["valueFrom"]["secretKeyRef"]["name"] == "workerkit-broker"
    port = int(command[command.index("--health-port") + 1])
    assert container["ports"][0]["containerPort"] == port
    # The supervisor of WORKERKIT_PROCESSES children serves both (tests/scaleout).
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert container[probe]["httpGet"]["path"] == path
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["name"]
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 120, (
        "liveness must outlast a broker outage: workers reconnect by themselves"
    )
    limits = container["resources"]["limits"]
    assert limits["memory"].endswith("Mi") and limits["cpu"]
    # Worst case per process: prefetch (2 x concurrency) bodies of max size, plus ~60 MiB.
    per_process = 60 + 2 * settings.concurrency * settings.max_body_size / 2**20
    assert int(limits["memory"].removesuffix("Mi")) >= settings.processes * per_process


def test_keda_scales_the_deployment_on_its_workers_queue() -> None:
    (deployment,) = of_kind("Deployment")
    (scaled,) = of_kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    target = deployment["spec"]["template"]["spec"]["containers"][0]["command"][2]
    (worker,) = load_targets([target])
    assert trigger["metadata"]["queueName"] == worker.queue
    assert trigger["metadata"]["mode"] == "QueueLength" and int(trigger["metadata"]["value"]) > 0
    (auth,) = of_kind("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (secret,) = of_kind("Secret")
    keys = {ref["key"] for ref in auth["spec"]["secretTargetRef"]}
    assert keys <= set(secret["stringData"])
    urls = Settings(url=secret["stringData"]["url"]).urls
    assert len(urls) == 3


def test_systemd_unit_drains_before_the_kill_and_does_not_restart_bad_configuration() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "systemd" / "workerkit-receipts.service")
    service = unit["Service"]
    words = shlex.split(service["ExecStart"])
    assert words[0].endswith("/workerkit") and words[1] == "run"
    assert load_targets([words[2]])
    assert int(words[words.index("--processes") + 1]) > 1
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    grace = Settings().shutdown_grace
    assert int(service["TimeoutStopSec"]) >= grace + KILL_MARGIN
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "3", "4"}
