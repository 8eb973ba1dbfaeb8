"""The one error root of orderbus, and its tree.

Every error orderbus raises on purpose derives from `OrderbusError`. Third-party errors (aiokafka, aiohttp,
aiosqlite, pydantic) are mapped to these at one boundary each, so callers never catch a library's exception::

    OrderbusError
    ├── ConfigError                 a setting is missing or invalid; names the key and the problem
    ├── ContractError               a payload breaks the order contract; carries field errors
    ├── BrokerError                 Kafka could not be reached or refused a request
    │   ├── BrokerUnavailable       (daemon.publisher) known unreachable: nothing was handed to the producer
    │   └── PublishError            a record was not acknowledged (acks=all)
    │       └── PublishPending      (daemon.publisher) not acknowledged in time; the outcome comes later
    ├── LocalKafkaError             the local broker tooling failed (jars, format, start, stop)
    ├── StoreError                  a SQLite state file could not be read or written
    │   └── NotClaimedError         (daemon.ingest_keys) completing an idempotency key this process does not hold
    ├── OffsetError                 (consumers.offsets) an offset tracked or committed out of order: a bug
    ├── AuthError                   (consumers.auth) a downstream's credentials could not be used
    │   ├── CredentialsRefused      the token endpoint refused our client
    │   └── TokenUnavailable        the token endpoint could not be reached or gave no usable token
    ├── SignatureError              (daemon.signature) a webhook signature is missing, stale or wrong
    ├── NotifyError                 (daemon.sdnotify) $NOTIFY_SOCKET is unusable
    ├── StatusError                 (daemon.status) a running daemon's status could not be read
    └── SandboxError                (daemon.sandbox) the sandbox downstream could not start or answer

Each subclass lives next to the code that raises it (the module in brackets); this tree is the map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class OrderbusError(Exception):
    """Root of every error orderbus raises on purpose."""


class ConfigError(OrderbusError):
    """A setting is missing or invalid. The message names the key and the problem."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one field of a payload: `loc` is a dotted path such as ``order.line_items.0.quantity``."""

    loc: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.loc, "message": self.message}


class ContractError(OrderbusError):
    """A payload breaks the order contract (bad JSON, a missing field, totals that do not add up)."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = tuple(errors)
        super().__init__("; ".join(f"{e.loc}: {e.message}" for e in self.errors) or "invalid payload")


class BrokerError(OrderbusError):
    """Kafka could not be reached or refused a request."""


class PublishError(BrokerError):
    """A record was not acknowledged by the broker with acks=all within the publish timeout."""


class LocalKafkaError(OrderbusError):
    """The local Apache Kafka tooling failed: resolving jars, formatting storage, starting or stopping."""


class StoreError(OrderbusError):
    """A SQLite state file could not be opened, read or written."""
