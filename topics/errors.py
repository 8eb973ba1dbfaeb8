"""The one error root of orderbus, and its tree.

Every error orderbus raises on purpose derives from `OrderbusError`. Third-party errors (aiokafka, aiohttp,
aiosqlite, pydantic, httptools) are mapped to these at one boundary each, so callers never catch a library's exception::

    OrderbusError
    ├── ConfigError                 a setting is missing or invalid; names the key and the problem
    ├── NotYetError                 what a start needs is not there yet (a port held, a topic not granted): exit 1
    ├── ContractError               a payload breaks the order contract; carries field errors
    ├── BrokerError                 Kafka could not be reached or refused a request
    │   ├── BrokerUnavailable       (daemon.publisher) known unreachable: nothing was handed to the producer
    │   └── PublishError            a record was not acknowledged (acks=all)
    │       ├── PublishPending      (daemon.publisher) not acknowledged in time; the outcome comes later
    │       └── PublishRefused      (daemon.publisher) refused for an authorization (an ACL); nothing was stored
    ├── LocalKafkaError             the local broker tooling failed (jars, format, start, stop)
    ├── StoreError                  a SQLite state file could not be read or written
    │   └── NotClaimedError         (daemon.ingest_keys) completing an idempotency key this process does not hold
    ├── OffsetError                 (consumers.offsets) an offset tracked or committed out of order: a bug
    ├── AuthError                   (consumers.auth) a downstream's credentials could not be used
    │   ├── CredentialsRefused      the token endpoint refused our client
    │   └── TokenUnavailable        the token endpoint could not be reached or gave no usable token
    ├── SignatureError              (daemon.signature) a webhook signature is missing, stale or wrong
    ├── HttpClientError             one request of consumers.http_client got no usable answer
    │   ├── HttpConnectionError     no complete answer: connect, DNS or TLS failed, the peer reset or closed, or we did
    │   ├── HttpProtocolError       the peer's answer is not HTTP/1.1 we accept (malformed, an upgrade, a huge head)
    │   └── InvalidRequestError     refused before sending: a URL or a header we will not put on the wire (a ValueError)
    ├── NotifyError                 (daemon.sdnotify) $NOTIFY_SOCKET is unusable
    ├── StatusError                 (daemon.status) a running daemon's status could not be read
    ├── SelectionError              (daemon.dlq) a replay named a dead letter that is not there, or matched none
    └── SandboxError                (daemon.sandbox) the sandbox downstream could not start or answer

Each subclass lives next to the code that raises it (the module in brackets); this tree is the map. The HTTP
client's errors (no module named) live here instead: the deliveries and the token fetch catch them without importing
the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class OrderbusError(Exception):
    """Root of every error orderbus raises on purpose."""


class ConfigError(OrderbusError):
    """A setting is missing or invalid. The message names the key and the problem."""


class NotYetError(OrderbusError):
    """Something the daemon needs at start is not there yet, though its settings may be right: its port is held by
    another process, or its address is not up on this host yet (a boot race). Exit 1, which systemd retries, where a
    `ConfigError` (exit 2) would leave the daemon down after the cause has passed."""


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


class RefusedError(BrokerError):
    """The brokers refuse this daemon's principal what it asked (an ACL it lacks); the message names what."""


class PublishError(BrokerError):
    """A record was not acknowledged by the broker with acks=all within the publish timeout."""


class LocalKafkaError(OrderbusError):
    """The local Apache Kafka tooling failed: resolving jars, formatting storage, starting or stopping."""


class StoreError(OrderbusError):
    """A SQLite state file could not be opened, read or written."""


class SharedStateError(StoreError):
    """A sink's state topic did not take or give its order state (`consumers.order_state`): a store error, since the
    flush it belongs to is not durable, that Kafka caused."""


class HttpClientError(OrderbusError):
    """One request of `consumers.http_client.HttpClient` got no usable answer; the message names the origin."""


class HttpConnectionError(HttpClientError):
    """No complete answer arrived: connecting (DNS, TCP, TLS) failed, the peer reset or closed the connection before
    the answer was whole, or the client was closed under the request. The request may or may not have been applied.
    """


class HttpProtocolError(HttpClientError):
    """The peer answered with bytes that are not an HTTP/1.1 answer we accept: malformed, conflicting framing (both
    Content-Length and Transfer-Encoding), an upgrade we did not ask for, or a head over the size limit. The request
    may or may not have been applied; the connection is closed.
    """


class InvalidRequestError(HttpClientError, ValueError):
    """A request we refuse to send, so nothing reached the network: a URL that is not http(s), carries user info or
    has no usable host, or a header whose name is not a token, is one the client sets itself, or whose value holds
    CR, LF or NUL (which would let a value inject headers).

    Not a `ConfigError`: the bad value may come from data at run time (a downstream id in a path, a token from a
    token endpoint), and retrying the same request can never succeed, so a caller treats it as permanent. It is a
    ValueError too, because that is what it is to code that knows nothing of orderbus.
    """
