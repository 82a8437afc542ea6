"""``workerkit asyncapi MODULE...``: the message contract of a set of workers as an AsyncAPI 3.0
document.

What it describes (all derived from the Worker classes and the settings, nothing hand-written):

* one server (the broker of ``WORKERKIT_URL``, password left out);
* per routing key a channel on the topic exchange (a worker's queue name and each binding), and
  per worker a channel for its queue and one for its dead-letter queue ``<queue>.dlq``;
* a ``send`` operation per routing key (what publishers may send) and a ``receive`` operation
  per worker (its handler), each with the AMQP bindings (0.3.0);
* per worker a message whose payload schema is its handler's annotation: a pydantic model's JSON
  schema (nested models under ``components/schemas``), or the schema of ``dict``/``list``/``str``/
  ``bytes``; the headers workerkit adds on retry and dead-lettering;
* the retry and dead-letter layout under ``x-workerkit`` (retry policy, delivery limit, DLQ,
  delay levels), an AsyncAPI specification extension.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, TypeAdapter

from . import __version__
from .message import Header, Message
from .retry import RetryPolicy
from .settings import Settings
from .topology import LEVELS, UNIT_MS, Topology
from .worker import Worker

__all__ = ["document"]

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING = "0.3.0"
_REF = "#/components/schemas/{model}"
_ID = re.compile(r"[^A-Za-z0-9_.\-]")


def document(
    settings: Settings, workers: Sequence[type[Worker]], *, title: str = "workerkit workers"
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document (a JSON-ready dict) of ``workers`` on ``settings``' broker."""
    topo = Topology(settings)
    vhost = _vhost(settings)
    exchange = {
        "name": topo.exchange,
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": vhost,
    }
    schemas: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for worker in workers:
        message_id = _id(worker.__name__)
        messages[message_id] = _message(worker, schemas)
        ref = {"$ref": f"#/components/messages/{message_id}"}
        keys = (worker.queue, *(k for k in worker.bindings if k != worker.queue))
        for key in keys:
            channel_id = _id(f"route.{key}")
            channel = channels.setdefault(
                channel_id,
                {
                    "address": key,
                    "description": f"Routing key {key!r} on the topic exchange {topo.exchange!r}.",
                    "messages": {},
                    "bindings": {
                        "amqp": {
                            "is": "routingKey",
                            "exchange": exchange,
                            "bindingVersion": AMQP_BINDING,
                        }
                    },
                },
            )
            channel["messages"][message_id] = ref
            operations.setdefault(
                _id(f"publish.{key}"),
                {
                    "action": "send",
                    "summary": f"publish({key!r}, body): confirmed, persistent, mandatory",
                    "channel": {"$ref": f"#/channels/{channel_id}"},
                    "messages": [],
                    "bindings": {
                        "amqp": {
                            "deliveryMode": 2,
                            "mandatory": True,
                            "bindingVersion": AMQP_BINDING,
                        }
                    },
                },
            )["messages"].append({"$ref": f"#/channels/{channel_id}/messages/{message_id}"})
        queue_id, dlq_id = _id(f"queue.{worker.queue}"), _id(f"dlq.{worker.queue}")
        channels[queue_id] = _queue_channel(worker.queue, vhost, message_id, ref, worker)
        channels[dlq_id] = _queue_channel(topo.dlq_name(worker.queue), vhost, message_id, ref)
        channels[dlq_id]["description"] = (
            f"Dead-letter queue of {worker.queue!r}: rejected, invalid and exhausted messages, "
            "with the reason and error in headers; kept until replayed or purged."
        )
        operations[_id(f"{worker.__name__}.handle")] = {
            "action": "receive",
            "summary": worker.describe(),
            "description": (worker.__doc__ or "").strip() or None,
            "channel": {"$ref": f"#/channels/{queue_id}"},
            "messages": [{"$ref": f"#/channels/{queue_id}/messages/{message_id}"}],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
            "x-workerkit": _layout(worker, topo, settings),
        }
        if operations[_id(f"{worker.__name__}.handle")]["description"] is None:
            del operations[_id(f"{worker.__name__}.handle")]["description"]
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": __version__,
            "description": "Generated by `workerkit asyncapi` from the Worker classes.",
        },
        "defaultContentType": "application/json",
        "servers": {"broker": _server(settings)},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
        "x-workerkit": {
            "exchange": topo.exchange,
            "delayLayout": {
                "levels": LEVELS,
                "unitMs": UNIT_MS,
                "queues": f"{topo.level_name(0)} .. {topo.level_name(LEVELS - 1)}",
                "out": topo.delay_out,
                "unroutable": topo.unroutable,
            },
        },
    }


def _queue_channel(
    name: str,
    vhost: str,
    message_id: str,
    ref: dict[str, str],
    worker: type[Worker] | None = None,
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": name,
        "messages": {message_id: ref},
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {
                    "name": name,
                    "durable": True,
                    "exclusive": False,
                    "autoDelete": False,
                    "vhost": vhost,
                },
                "bindingVersion": AMQP_BINDING,
            }
        },
    }
    if worker is not None:
        channel["description"] = f"{worker.queue_type} queue consumed by {worker.describe()}."
    return channel


def _message(worker: type[Worker], schemas: dict[str, Any]) -> dict[str, Any]:
    body_type = worker._handler.body_type
    content_type, payload = _payload(body_type, schemas)
    title = body_type.__name__ if isinstance(body_type, type) else str(body_type)
    return {
        "name": _id(worker.__name__),
        "title": title,
        "contentType": content_type,
        "payload": payload,
        "headers": {
            "type": "object",
            "description": "Headers workerkit adds on retries and dead-lettering.",
            "properties": {
                Header.ATTEMPT: {"type": "integer", "minimum": 1},
                Header.REASON: {
                    "type": "string",
                    "enum": ["rejected", "invalid", "exhausted", "delivery-limit"],
                },
                Header.ERROR_TYPE: {"type": "string"},
                Header.ERROR_MESSAGE: {"type": "string"},
                Header.TRACEBACK: {"type": "string"},
            },
        },
    }


def _payload(body_type: Any, schemas: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if body_type in (bytes, Message):
        return "application/octet-stream", {"type": "string", "format": "binary"}
    if body_type is str:
        return "text/plain", {"type": "string"}
    schema = TypeAdapter(body_type).json_schema(ref_template=_REF)
    schemas.update(schema.pop("$defs", {}))
    if isinstance(body_type, type) and issubclass(body_type, BaseModel):
        schemas[body_type.__name__] = schema
        return "application/json", {"$ref": _REF.format(model=body_type.__name__)}
    return "application/json", schema


def _layout(worker: type[Worker], topo: Topology, settings: Settings) -> dict[str, Any]:
    policy = worker.retry or RetryPolicy(
        max_attempts=settings.retry_max_attempts,
        delay=settings.retry_delay,
        backoff=settings.retry_backoff,
        max_delay=settings.retry_max_delay,
    )
    queues = {spec.name: spec for spec in topo.worker_queues(worker)}
    work = queues[worker.queue]
    return {
        "queue": worker.queue,
        "queueType": worker.queue_type,
        "arguments": work.arguments,
        "bindings": [{"exchange": e, "routingKey": k} for e, k in work.bindings],
        "deadLetterQueue": topo.dlq_name(worker.queue),
        "retry": {
            "maxAttempts": policy.max_attempts,
            "delay": policy.delay,
            "backoff": policy.backoff,
            "maxDelay": policy.max_delay,
            "jitter": policy.jitter,
            "via": (
                f"{topo.level_name(0)} .. {topo.level_name(LEVELS - 1)} (broker-side delay"
                " levels, entered at the level of the delay's highest bit)"
            ),
        },
        "deliveryLimit": worker.delivery_limit or settings.delivery_limit,
    }


def _server(settings: Settings) -> dict[str, Any]:
    parts = urlsplit(settings.url.get_secret_value())
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return {
        "host": f"{host}:{port}",
        "protocol": parts.scheme,
        "protocolVersion": "0.9.1",
        "pathname": "/" + _vhost(settings).lstrip("/") if _vhost(settings) != "/" else "/",
        "description": f"RabbitMQ, virtual host {_vhost(settings)!r}",
    }


def _vhost(settings: Settings) -> str:
    path = urlsplit(settings.url.get_secret_value()).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _id(text: str) -> str:
    """A key usable in the document's maps (AsyncAPI allows letters, digits, ``_.-``)."""
    return _ID.sub("_", text.replace("#", "hash").replace("*", "star"))


def render(doc: dict[str, Any], *, yaml: bool = False) -> str:
    if not yaml:
        import json

        return json.dumps(doc, indent=2)
    try:
        import yaml as pyyaml
    except ImportError:  # pragma: no cover - the test extra installs it
        from .errors import ConfigurationError

        raise ConfigurationError("--yaml needs PyYAML: pip install pyyaml") from None

    class Plain(pyyaml.SafeDumper):
        """No &id001 anchors and *id001 aliases for objects the document shares: spelled out,
        as in the JSON, so the YAML reads (and diffs) the same way."""

        def ignore_aliases(self, data: Any) -> bool:
            return True

    return str(pyyaml.dump(doc, Dumper=Plain, sort_keys=False))
