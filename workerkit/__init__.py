"""workerkit: RabbitMQ workers you can trust.

Declarative :class:`Worker` classes bound to queues, a :class:`Runner` that owns connections, acks,
retries and graceful shutdown, and one :class:`Publisher` (plus :class:`AsyncPublisher`) for every
service. See README.md and DESIGN.md for the contract.
"""

from .errors import (
    AccessRefused,
    ConfigurationError,
    ConnectionFailed,
    DecodeError,
    InvalidMessage,
    MessageTooLarge,
    PublishError,
    PublishNacked,
    PublishTimeout,
    Reject,
    RemoteError,
    RequestTimeout,
    RetryLater,
    TopologyError,
    Unroutable,
    WorkerkitError,
)
from .message import Message
from .publisher import AsyncPublisher, Publisher
from .retry import RetryPolicy
from .runner import Runner, run
from .settings import Settings
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AccessRefused",
    "AsyncPublisher",
    "ConfigurationError",
    "ConnectionFailed",
    "DecodeError",
    "InvalidMessage",
    "Message",
    "MessageTooLarge",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "Publisher",
    "Reject",
    "RemoteError",
    "RequestTimeout",
    "RetryLater",
    "RetryPolicy",
    "Runner",
    "Settings",
    "TopologyError",
    "Unroutable",
    "Worker",
    "WorkerkitError",
    "__version__",
    "run",
]
