"""Worker classes are validated when they are defined: every mistake fails at import, named."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from workerkit import ConfigurationError, Message, Worker


def qname() -> str:
    return f"unit.worker.{uuid.uuid4().hex[:8]}"


class Order(BaseModel):
    order_id: int


def test_worker_attributes_are_checked_and_kept() -> None:
    name = qname()
    cls: type[Worker] = type(
        "Good",
        (Worker,),
        {
            "queue": name,
            "bindings": ["orders.placed", "orders.*", "audit.#"],
            "prefetch": 50,
            "concurrency": 10,
            "MAX_ITEMS": 5,
            "handle": _async_model_handler,
        },
    )
    assert cls.bindings == ("orders.placed", "orders.*", "audit.#")  # normalised to a tuple
    assert Worker.registry[name] is cls
    assert cls._handler.body_type is Order
    assert cls._handler.is_async
    assert not cls._handler.wants_message


async def _async_model_handler(self: Any, order: Order) -> None: ...


def make(**attrs: Any) -> type[Worker]:
    attrs.setdefault("queue", qname())
    attrs.setdefault("handle", _async_model_handler)
    return type("Probe", (Worker,), attrs)


def test_missing_queue() -> None:
    with pytest.raises(ConfigurationError, match=r"Probe.*set the class attribute queue"):
        type("Probe", (Worker,), {"handle": _async_model_handler})


@pytest.mark.parametrize("bad", ["", "has space", "a..b", ".lead", "x" * 201, "ünï", 5])
def test_bad_queue_names(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="queue name"):
        make(queue=bad)


@pytest.mark.parametrize("reserved", ["amq.foo", "workerkit.delay", "orders.dlq"])
def test_reserved_queue_names(reserved: str) -> None:
    with pytest.raises(ConfigurationError, match="reserved"):
        make(queue=reserved)


def test_unknown_attribute_suggests_the_right_name() -> None:
    expected = r"unknown attribute 'prefech'.*did you mean 'prefetch'"
    with pytest.raises(ConfigurationError, match=expected):
        make(prefech=10)


def test_unknown_attribute_without_close_match() -> None:
    with pytest.raises(ConfigurationError, match="unknown attribute 'zzzz'") as info:
        make(zzzz=1)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "bindings",
    [
        "orders.placed",  # a string, not a tuple: would bind each character
        ("",),
        ("orders..placed",),
        ("orders.pla*ced",),
        ("has space",),
        (7,),
        ("k" * 256,),
    ],
)
def test_bad_bindings(bindings: Any) -> None:
    with pytest.raises(ConfigurationError, match="binding"):
        make(bindings=bindings)


@pytest.mark.parametrize(
    ("attr", "value"),
    [
        ("prefetch", 0),
        ("prefetch", 70000),
        ("prefetch", True),
        ("concurrency", 0),
        ("concurrency", 2.5),
        ("delivery_limit", 0),
        ("handler_timeout", 0),
        ("handler_timeout", "10"),
        ("queue_type", "stream"),
        ("retry", {"max_attempts": 3}),
    ],
)
def test_bad_settings_attributes(attr: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=attr):
        make(**{attr: value})


def test_missing_handler() -> None:
    with pytest.raises(ConfigurationError, match="define handle"):
        type("Probe", (Worker,), {"queue": qname()})


async def _no_body(self: Any) -> None: ...
async def _three(self: Any, a: bytes, b: Message, c: int) -> None: ...
async def _kwonly(self: Any, *, body: bytes) -> None: ...
async def _varargs(self: Any, *bodies: bytes) -> None: ...


@pytest.mark.parametrize("handler", [_no_body, _three, _kwonly, _varargs])
def test_bad_handler_signatures(handler: Any) -> None:
    with pytest.raises(ConfigurationError, match="handle must take"):
        make(handle=handler)


async def _second_not_message(self: Any, body: bytes, extra: dict[str, Any]) -> None: ...


def test_second_parameter_must_be_a_message() -> None:
    with pytest.raises(ConfigurationError, match="second parameter of handle must be a Message"):
        make(handle=_second_not_message)


async def _with_message(self: Any, body: dict[str, Any], message: Message) -> None: ...
def _sync_str(self: Any, body: str) -> None: ...
def _unannotated(self, body):  # type: ignore[no-untyped-def]
    return None


def test_handler_variants() -> None:
    with_message = make(handle=_with_message)._handler
    assert with_message.wants_message and with_message.is_async
    assert with_message.body_type == dict[str, Any]
    sync = make(handle=_sync_str)._handler
    assert not sync.is_async and sync.body_type is str
    assert make(handle=_unannotated)._handler.body_type is bytes  # raw body by default


def test_unresolvable_annotation_is_a_configuration_error() -> None:
    async def handle(self: Any, body: NotDefinedAnywhere) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(ConfigurationError, match="cannot resolve handle annotations"):
        make(handle=handle)


def test_abstract_base_is_not_validated_but_its_subclasses_are() -> None:
    class Base(Worker):
        abstract = True
        prefetch = 5

        async def handle(self, body: bytes) -> None: ...

    assert Base.queue_type == "quorum"  # defined without a queue: no error
    name = qname()
    child: type[Base] = type("Child", (Base,), {"queue": name})
    assert child.prefetch == 5
    assert Worker.registry[name] is child
    assert Base not in Worker.registry.values()
    with pytest.raises(ConfigurationError, match="queue name"):
        type("Orphan", (Base,), {})


def test_two_classes_cannot_share_a_queue() -> None:
    name = qname()
    type("First", (Worker,), {"queue": name, "handle": _async_model_handler})
    with pytest.raises(ConfigurationError, match="already used by"):
        type("Second", (Worker,), {"queue": name, "handle": _async_model_handler})


def test_error_names_the_class() -> None:
    with pytest.raises(ConfigurationError) as info:
        make(prefetch=0)
    assert str(info.value).startswith(f"{__name__}.Probe: prefetch")


class Opaque:  # no schema: pydantic cannot build a validator for it
    pass


def test_an_annotation_pydantic_cannot_decode_fails_at_definition() -> None:
    async def handle(self: Worker, body: Opaque) -> None: ...

    with pytest.raises(ConfigurationError, match=r"Probe: cannot decode bodies as .*Opaque"):
        type("Probe", (Worker,), {"queue": "u.opaque-body", "handle": handle})
