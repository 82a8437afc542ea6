"""`workerkit asyncapi`: the example app's document is valid AsyncAPI 3.0 (checked against the
specification's JSON schema, tests/data/), its references resolve, and its payloads are the
handlers' schemas."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from workerkit import Settings, Worker
from workerkit.asyncapi import document

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "tests/data/asyncapi-3.0.0.schema.json").read_text())
EXAMPLE_APP = ["workers.receipts", "workers.audit", "workers.thumbnails"]


def generate(*extra: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "workerkit", "asyncapi", *EXAMPLE_APP, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def example() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(generate())
    return doc


def errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{e.json_path}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_the_example_apps_document_is_valid_asyncapi_3(example: dict[str, Any]) -> None:
    assert example["asyncapi"] == "3.0.0"
    assert errors(example) == []


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["operations"][next(iter(d["operations"]))].update(action="publish"),
        lambda d: d["channels"][next(iter(d["channels"]))]["bindings"]["amqp"].update(
            {"is": "topic"}
        ),
        lambda d: d["servers"]["broker"].update(protocol=5),
        lambda d: d.pop("info"),
    ],
    ids=["v2-action", "amqp-binding", "server", "no-info"],
)
def test_the_schema_check_can_fail(example: dict[str, Any], break_it: Any) -> None:
    broken = copy.deepcopy(example)
    break_it(broken)
    assert errors(broken) != []


def test_every_reference_resolves(example: dict[str, Any]) -> None:
    found = refs(example)
    assert found
    for ref in found:
        resolve(example, ref)


def test_the_layout_is_described(example: dict[str, Any]) -> None:
    from workers.receipts import SendReceipt

    queue = SendReceipt.queue
    assert example["channels"][f"queue.{queue}"]["address"] == queue
    assert example["channels"][f"dlq.{queue}"]["address"] == f"{queue}.dlq"
    handle = example["operations"]["SendReceipt.handle"]
    assert handle["action"] == "receive"
    layout = handle["x-workerkit"]
    assert layout["deadLetterQueue"] == f"{queue}.dlq"
    assert layout["retry"]["maxAttempts"] == SendReceipt.retry.max_attempts
    for key in SendReceipt.bindings:
        assert any(ch["address"] == key for ch in example["channels"].values())


def test_payloads_are_the_handlers_schemas(example: dict[str, Any]) -> None:
    from workers.receipts import SendReceipt

    model = SendReceipt._handler.body_type
    message = example["components"]["messages"]["SendReceipt"]
    payload = resolve(example, message["payload"]["$ref"])
    expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
    assert payload["properties"] == expected["properties"]
    for name in expected.get("$defs", {}):  # nested models are in components/schemas too
        assert example["components"]["schemas"][name] == expected["$defs"][name]
    assert message["contentType"] == "application/json"


def test_annotations_other_than_models() -> None:
    class Raw(Worker):
        queue = "t.asyncapi.raw"
        bindings = ("logs.#",)

        async def handle(self, body: bytes) -> None:
            pass

    class Listing(Worker):
        queue = "t.asyncapi.list"

        async def handle(self, body: list[int]) -> None:
            pass

    doc = document(Settings(exchange="wkt"), [Raw, Listing])
    assert errors(doc) == []
    raw, listing = doc["components"]["messages"]["Raw"], doc["components"]["messages"]["Listing"]
    assert raw["contentType"] == "application/octet-stream"
    assert listing["payload"] == {"items": {"type": "integer"}, "type": "array"}
    assert doc["channels"]["route.logs.hash"]["address"] == "logs.#"


def test_yaml_output_is_the_same_document(example: dict[str, Any]) -> None:
    text = generate("--yaml")
    assert yaml.safe_load(text) == example
    assert "&id" not in text and "*id" not in text  # shared parts spelled out, as in the JSON
