"""The dev stack's files (config/, compose.env, the Grafana dashboard), read the same way by the
unit tests that check them and the integration test that boots a broker from them."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((ROOT / "config/grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
