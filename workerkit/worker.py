"""The Worker base class: validated when a subclass is defined, registered for the CLI."""

from __future__ import annotations

import difflib
import hashlib
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .errors import ConfigurationError
from .idempotency import IdempotencyStore
from .message import Message, decoder_for
from .middleware import Middleware, check_middleware
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
        "middleware",
        "abstract",
        "idempotent",
        "idempotency_store",
        "idempotency_ttl",
        "max_priority",
        "message_ttl",
        "max_length",
        "overflow",
        "single_active_consumer",
        "arguments",
        "batch_size",
        "batch_timeout",
    }
)
# Queue arguments workerkit writes itself (from the attributes named here, or always).
_MANAGED_ARGUMENTS = {
    "x-queue-type": "queue_type",
    "x-dead-letter-exchange": "(workerkit's dead-letter layout)",
    "x-dead-letter-routing-key": "(workerkit's dead-letter layout)",
    "x-dead-letter-strategy": "(workerkit's dead-letter layout)",
    "x-delivery-limit": "delivery_limit",
    "x-max-priority": "max_priority",
    "x-message-ttl": "message_ttl",
    "x-max-length": "max_length",
    "x-overflow": "overflow",
    "x-single-active-consumer": "single_active_consumer",
}
_OVERFLOW = ("reject-publish", "drop-head", "reject-publish-dlx")
DEFAULT_IDEMPOTENCY_TTL = 7 * 24 * 3600.0


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
    * ``middleware`` - a tuple of :class:`~workerkit.middleware.Middleware` instances around
      this worker's handler (after the runner's own).
    * ``idempotent`` - run the handler at most once per :meth:`idempotency_key` (the message
      id by default), with claims kept in ``idempotency_store`` and committed keys remembered
      ``idempotency_ttl`` seconds (see ``workerkit.idempotency``).
    * Queue options (RabbitMQ arguments): ``max_priority`` (classic queues), ``message_ttl``
      (seconds; expired messages go to the DLQ with reason ``expired``), ``max_length`` and
      ``overflow`` (``reject-publish`` makes a full queue refuse publishes),
      ``single_active_consumer``, and ``arguments`` for any other ``x-`` argument.
    * ``batch_size`` / ``batch_timeout`` - ``handle`` receives a list of up to ``batch_size``
      decoded bodies (``list[Order]``), collected for at most ``batch_timeout`` seconds; each
      message is acked, retried or dead-lettered on its own (see ``workerkit.batch``).

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
    middleware: ClassVar[tuple[Middleware, ...]] = ()
    idempotent: ClassVar[bool] = False
    idempotency_store: ClassVar[IdempotencyStore | None] = None
    idempotency_ttl: ClassVar[float] = DEFAULT_IDEMPOTENCY_TTL
    max_priority: ClassVar[int | None] = None
    message_ttl: ClassVar[float | None] = None
    max_length: ClassVar[int | None] = None
    overflow: ClassVar[str | None] = None
    single_active_consumer: ClassVar[bool] = False
    arguments: ClassVar[Mapping[str, Any]] = {}
    batch_size: ClassVar[int | None] = None
    batch_timeout: ClassVar[float] = 1.0
    abstract: ClassVar[bool] = True

    _handler: ClassVar[Handler]
    _queue_arguments: ClassVar[dict[str, Any]] = {}
    registry: ClassVar[dict[str, type[Worker]]] = {}

    # Declared, not defined: each subclass's handle takes its own body type, which an inherited
    # signature would make a type error (Liskov) in users' code.
    handle: Callable[..., Any]

    async def setup(self) -> None:
        """Called once before consuming starts (open pools, clients...)."""

    async def teardown(self) -> None:
        """Called once after the last handler finished on shutdown."""

    def idempotency_key(self, body: Any, message: Message) -> str:
        """The key an ``idempotent`` worker runs its handler at most once for: the message id
        (a hash of the body when a publisher set none). Override to choose another."""
        if message.message_id:
            return message.message_id
        return "h-" + hashlib.sha256(message.body).hexdigest()

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
        cls.middleware = check_middleware(cls.middleware, name)
        _check_idempotency(cls, name)
        _check_batch(cls, name)
        cls._queue_arguments = _queue_arguments(cls, name)
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


def _check_idempotency(cls: type[Worker], name: str) -> None:
    if not isinstance(cls.idempotent, bool):
        raise ConfigurationError(f"{name}: idempotent must be True or False")
    store = cls.idempotency_store
    if store is not None and not isinstance(store, IdempotencyStore):
        raise ConfigurationError(
            f"{name}: idempotency_store must be an IdempotencyStore (MemoryStore, RedisStore)"
        )
    if cls.idempotent and store is None:
        raise ConfigurationError(
            f"{name}: idempotent = True needs idempotency_store = RedisStore(url) (or"
            " MemoryStore() in tests)"
        )
    ttl = cls.idempotency_ttl
    if not _positive(ttl):
        raise ConfigurationError(f"{name}: idempotency_ttl must be a positive number of seconds")


def _check_batch(cls: type[Worker], name: str) -> None:
    size = cls.batch_size
    if size is None:
        return
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 10000:
        raise ConfigurationError(f"{name}: batch_size must be an int in [1, 10000]")
    if not _positive(cls.batch_timeout):
        raise ConfigurationError(f"{name}: batch_timeout must be a positive number of seconds")
    if cls.prefetch is not None and cls.prefetch < size:
        raise ConfigurationError(
            f"{name}: prefetch {cls.prefetch} is below batch_size {size}: a batch could never fill"
        )
    if cls.idempotent:
        raise ConfigurationError(f"{name}: idempotent workers cannot take batches (yet)")


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf")
    )


def _queue_arguments(cls: type[Worker], name: str) -> dict[str, Any]:
    """The RabbitMQ arguments the queue options ask for (checked here, declared by topology)."""
    args: dict[str, Any] = {}
    for option in (_priority, _ttl, _length, _overflow, _single_active, _extra):
        args.update(option(cls, name))
    return args


def _priority(cls: type[Worker], name: str) -> dict[str, Any]:
    if cls.max_priority is None:
        return {}
    if not isinstance(cls.max_priority, int) or not 1 <= cls.max_priority <= 255:
        raise ConfigurationError(f"{name}: max_priority must be an int in [1, 255]")
    if cls.queue_type == "quorum":
        raise ConfigurationError(
            f"{name}: max_priority needs queue_type = 'classic' (quorum queues take no"
            " x-max-priority; RabbitMQ 4.0+ gives them two priority levels without it)"
        )
    return {"x-max-priority": cls.max_priority}


def _ttl(cls: type[Worker], name: str) -> dict[str, Any]:
    if cls.message_ttl is None:
        return {}
    if not _positive(cls.message_ttl) or cls.message_ttl * 1000 > 2**32 - 1:
        raise ConfigurationError(f"{name}: message_ttl must be seconds in (0, 4294967]")
    return {"x-message-ttl": max(1, round(cls.message_ttl * 1000))}


def _length(cls: type[Worker], name: str) -> dict[str, Any]:
    length = cls.max_length
    if length is None:
        return {}
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ConfigurationError(f"{name}: max_length must be an int >= 1")
    return {"x-max-length": length}


def _overflow(cls: type[Worker], name: str) -> dict[str, Any]:
    if cls.overflow is None:
        return {}
    if cls.overflow not in _OVERFLOW:
        raise ConfigurationError(f"{name}: overflow must be one of {', '.join(_OVERFLOW)}")
    if cls.queue_type == "quorum" and cls.overflow != "reject-publish":
        raise ConfigurationError(
            f"{name}: a quorum queue's overflow is always 'reject-publish' (its at-least-once"
            " dead-lettering needs it); use queue_type = 'classic' for another"
        )
    return {"x-overflow": cls.overflow}


def _single_active(cls: type[Worker], name: str) -> dict[str, Any]:
    if not isinstance(cls.single_active_consumer, bool):
        raise ConfigurationError(f"{name}: single_active_consumer must be True or False")
    return {"x-single-active-consumer": True} if cls.single_active_consumer else {}


def _extra(cls: type[Worker], name: str) -> dict[str, Any]:
    if not isinstance(cls.arguments, Mapping):
        raise ConfigurationError(f"{name}: arguments must be a dict of 'x-...' queue arguments")
    for key in cls.arguments:
        if not isinstance(key, str) or not key.startswith("x-"):
            raise ConfigurationError(f"{name}: queue argument {key!r} must start with 'x-'")
        if key in _MANAGED_ARGUMENTS:
            raise ConfigurationError(
                f"{name}: queue argument {key!r} is set by workerkit: use {_MANAGED_ARGUMENTS[key]}"
            )
    return dict(cls.arguments)


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
    batch = cls.batch_size is not None
    message_type: Any = Message
    if batch:
        # handle(self, orders: list[Order], messages: list[Message]): decode each as Order.
        if typing.get_origin(body_type) is not list or len(typing.get_args(body_type)) != 1:
            raise ConfigurationError(
                f"{name}: with batch_size, annotate the body as a list: handle(self, items:"
                f" list[Order]) (got {body_type!r})"
            )
        body_type = typing.get_args(body_type)[0]
        message_type = list[Message]
    wants_message = False
    if len(params) == 2:
        if hints.get(params[1].name, message_type) != message_type:
            what = "a list[Message]" if batch else "a Message"
            raise ConfigurationError(f"{name}: the second parameter of handle must be {what}")
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
