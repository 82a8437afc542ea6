"""The Worker base class: validated when a subclass is defined, registered for the CLI."""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .errors import ConfigurationError
from .message import Message, decoder_for
from .retry import RetryPolicy

__all__ = ["Handler", "Worker", "validate_queue_name"]

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_BINDING_WORD = re.compile(r"^([A-Za-z0-9_-]+|\*|#)$")
_SETTINGS_ATTRS = frozenset(
    {
        "queue",
        "bindings",
        "prefetch",
        "concurrency",
        "retry",
        "queue_type",
        "handler_timeout",
        "delivery_limit",
        "abstract",
    }
)


# The delay layout binds a queue as ``r.<28 one-word levels>.<queue>`` and each routing key as
# ``p.<levels>.<key>`` (topology.py): 58 bytes of prefix inside AMQP's 255-byte short string.
MAX_ROUTED_NAME = 255 - 58


def _too_long(name: str) -> bool:
    return len(name.encode("utf-8", "surrogatepass")) > MAX_ROUTED_NAME


def validate_queue_name(name: object, owner: str = "queue") -> str:
    """Return ``name`` if it is a usable workerkit queue name, else raise ConfigurationError."""
    if name is None:
        raise ConfigurationError(f"{owner}: set the class attribute queue = '<queue name>'")
    if not isinstance(name, str) or not _QUEUE_NAME.match(name) or len(name) > 200:
        raise ConfigurationError(
            f"{owner}: queue name {name!r} must be 1-200 characters of letters, digits, "
            "'_', '-' and '.'-separated words"
        )
    if _too_long(name):
        raise ConfigurationError(
            f"{owner}: queue name {name[:40]!r}... is over {MAX_ROUTED_NAME} bytes: its delay"
            " binding would overflow the broker's 255-byte limit"
        )
    if name.startswith("amq.") or name.startswith("workerkit.") or name.endswith(".dlq"):
        raise ConfigurationError(
            f"{owner}: queue name {name!r} is reserved (amq.*, workerkit.*, *.dlq)"
        )
    return name


def _validate_binding(key: object, owner: str) -> str:
    if not isinstance(key, str) or not key or len(key) > 255:
        raise ConfigurationError(f"{owner}: binding {key!r} must be a non-empty string")
    if _too_long(key):
        raise ConfigurationError(
            f"{owner}: binding {key[:40]!r}... is over {MAX_ROUTED_NAME} bytes: its delay"
            " binding would overflow the broker's 255-byte limit"
        )
    if not all(_BINDING_WORD.match(word) for word in key.split(".")):
        raise ConfigurationError(
            f"{owner}: binding {key!r} must be '.'-separated words of letters, digits, '_', '-', "
            "or the wildcards '*' and '#'"
        )
    return key


@dataclass(frozen=True, slots=True)
class Handler:
    """What the runner needs to know about ``handle``, worked out once per class."""

    body_type: Any  # the annotation of the first parameter (Message for the raw envelope)
    wants_message: bool  # a second parameter annotated Message receives the envelope
    is_async: bool


class Worker:
    """Subclass to bind a handler to a queue. Validated when the class is defined.

    Class attributes (all optional except ``queue``; ``None`` means "from Settings"):

    * ``queue`` - the durable queue; also a routing key on the exchange.
    * ``bindings`` - extra routing keys / topic patterns bound on the exchange.
    * ``prefetch`` - broker QoS; ``concurrency`` - handlers in flight at once.
    * ``retry`` - a :class:`RetryPolicy`.
    * ``queue_type`` - ``"quorum"`` (default) or ``"classic"``.
    * ``handler_timeout`` - seconds before a running handler counts as failed.
    * ``delivery_limit`` - deliveries before the broker dead-letters a message that keeps
      killing its worker process.

    Set ``abstract = True`` on a base class shared by several workers.
    """

    queue: ClassVar[str]
    bindings: ClassVar[tuple[str, ...]] = ()
    prefetch: ClassVar[int | None] = None
    concurrency: ClassVar[int | None] = None
    retry: ClassVar[RetryPolicy | None] = None
    queue_type: ClassVar[Literal["quorum", "classic"]] = "quorum"
    handler_timeout: ClassVar[float | None] = None
    delivery_limit: ClassVar[int | None] = None
    abstract: ClassVar[bool] = True

    _handler: ClassVar[Handler]
    registry: ClassVar[dict[str, type[Worker]]] = {}

    # Declared, not defined: each subclass's handle takes its own body type, which an inherited
    # signature would make a type error (Liskov) in users' code.
    handle: Callable[..., Any]

    async def setup(self) -> None:
        """Called once before consuming starts (open pools, clients...)."""

    async def teardown(self) -> None:
        """Called once after the last handler finished on shutdown."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        cls.abstract = False
        name = f"{cls.__module__}.{cls.__qualname__}"
        _check_attributes(cls, name)
        cls.queue = validate_queue_name(getattr(cls, "queue", None), name)
        if isinstance(cls.bindings, str):
            raise ConfigurationError(f"{name}: bindings must be a tuple of strings, not a string")
        cls.bindings = tuple(_validate_binding(key, name) for key in cls.bindings)
        if cls.queue_type not in ("quorum", "classic"):
            raise ConfigurationError(
                f"{name}: queue_type must be 'quorum' or 'classic', got {cls.queue_type!r}"
            )
        for attr, low, high in (
            ("prefetch", 1, 65535),
            ("concurrency", 1, 10000),
            ("delivery_limit", 1, 10**6),
        ):
            value = getattr(cls, attr)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high
            ):
                raise ConfigurationError(f"{name}: {attr} must be an int in [{low}, {high}]")
        timeout = cls.handler_timeout
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise ConfigurationError(f"{name}: handler_timeout must be a positive number")
        if cls.retry is not None and not isinstance(cls.retry, RetryPolicy):
            raise ConfigurationError(f"{name}: retry must be a RetryPolicy")
        cls._handler = _inspect_handler(cls, name)
        previous = Worker.registry.get(cls.queue)
        if previous is not None and previous.__qualname__ != cls.__qualname__:
            raise ConfigurationError(
                f"{name}: queue {cls.queue!r} is already used by "
                f"{previous.__module__}.{previous.__qualname__}"
            )
        Worker.registry[cls.queue] = cls

    @classmethod
    def describe(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__} (queue {cls.queue!r})"


def _check_attributes(cls: type, name: str) -> None:
    base_names = set(dir(Worker))
    for attr, value in vars(cls).items():
        if attr.startswith("_") or attr in _SETTINGS_ATTRS or attr in base_names:
            continue
        if callable(value) or isinstance(value, staticmethod | classmethod | property):
            continue
        if attr.isupper():  # constants are the user's business
            continue
        hint = difflib.get_close_matches(attr, sorted(_SETTINGS_ATTRS), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigurationError(f"{name}: unknown attribute {attr!r}{suggestion}")


def _inspect_handler(cls: type[Worker], name: str) -> Handler:
    handle = getattr(cls, "handle", None)
    if handle is None:
        raise ConfigurationError(f"{name}: define handle(self, body)")
    params = list(inspect.signature(handle).parameters.values())[1:]
    if not 1 <= len(params) <= 2 or any(
        p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params
    ):
        raise ConfigurationError(
            f"{name}: handle must take (self, body) or (self, body, message: Message)"
        )
    try:
        hints = typing.get_type_hints(handle)
    except Exception as exc:  # NameError for an undefined forward reference, among others
        raise ConfigurationError(f"{name}: cannot resolve handle annotations: {exc}") from None
    body_type = hints.get(params[0].name, bytes)
    wants_message = False
    if len(params) == 2:
        if hints.get(params[1].name, Message) is not Message:
            raise ConfigurationError(f"{name}: the second parameter of handle must be a Message")
        wants_message = True
    try:
        # Builds pydantic's validator now, so an unusable annotation fails at import, not at run.
        decoder_for(body_type, 1)
    except Exception as exc:  # pydantic raises several kinds for an unsupported type
        raise ConfigurationError(
            f"{name}: cannot decode bodies as {body_type!r}: {str(exc).splitlines()[0]}"
        ) from None
    return Handler(
        body_type=body_type,
        wants_message=wants_message,
        is_async=inspect.iscoroutinefunction(handle),
    )
