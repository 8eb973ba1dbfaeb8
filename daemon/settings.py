"""The one settings model of orderbus: a TOML file, then ``ORDERBUS_*`` environment variables on top.

Environment variables name a key as ``ORDERBUS_<SECTION>__<KEY>`` (``ORDERBUS_INGEST__PORT=8081``) or
``ORDERBUS_<KEY>`` for top-level keys (``ORDERBUS_LOG_LEVEL=DEBUG``), and deeper with more ``__``
(``ORDERBUS_SINKS__CRM__RATE=20``). ``<NAME>_FILE`` reads the value from a file
instead, which is how systemd credentials (``LoadCredential=``) and container secrets are handed over:
``ORDERBUS_INGEST__WEBHOOK_SECRETS_FILE=$CREDENTIALS_DIRECTORY/webhook-secret`` (one secret per line).

Everything is validated at start; a bad value stops start-up with a `ConfigError` that names the key and the
problem. Secrets are `SecretStr`: masked whenever the settings are printed or logged.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from consumers.http_client import ascii_host
from consumers.masking import mask_url
from consumers.policy import DEFAULT_POLICY, Action
from consumers.sink import UrlTemplates
from daemon.signature import secret_key
from topics.catalogue import SINKS
from topics.envelope import SOURCE_PATTERN
from topics.errors import ConfigError

ENV_PREFIX = "ORDERBUS_"

Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86_400)]


class _Section(BaseModel):
    # No number is infinite or NaN: `inf` hours of retention passed every bound and failed later, in a traceback.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _ca_file(path: Path) -> Path:
    """A CA bundle that can be read and loaded, checked now: at start-up its error was a traceback (exit 1)."""
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise ValueError(f"{path} is not a PEM CA bundle ({exc.reason or exc})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return path


CaFile = Annotated[Path, AfterValidator(_ca_file)]
_SASL = ("SASL_PLAINTEXT", "SASL_SSL")


def _lone_half(section: BaseModel, cert: str, key: str) -> tuple[str, str] | None:
    """(the one given, the one missing) of a certificate's and a key's settings when only one is set, else None."""
    given = [name for name in (cert, key) if getattr(section, name) is not None]
    if len(given) != 1:
        return None
    return (given[0], key if given[0] == cert else cert)


class KafkaSettings(_Section):
    """How to reach the Kafka cluster."""

    bootstrap_servers: str = Field("127.0.0.1:9092", min_length=1)
    client_id: str = Field("orderbus", min_length=1, max_length=64)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: CaFile | None = None
    # A client certificate and its unencrypted key (PEM), for brokers that ask for one (ssl.client.auth=required:
    # Aiven, MSK or Strimzi with TLS authentication). Read where a Kafka client is built (`run`, `config check`,
    # the Kafka commands), not at every load: `orderbus status` on a systemd host needs no credential.
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    request_timeout: Seconds = 10.0
    # Static membership of the sinks' groups (`consumers.membership`): a name per instance, the same at every start
    # (a host name, a StatefulSet pod's name), so a restart keeps its partitions and its delivery states with them.
    # Kafka's rules for it: up to 249 of letters, digits, ".", "_" and "-".
    group_instance_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,249}$")
    # Seconds a member may be silent before its partitions move: the time a restart must fit in with a
    # group_instance_id (45 s by default then, else 6 s). Within the broker's default bounds
    # (group.min.session.timeout.ms, group.max.session.timeout.ms).
    session_timeout: float | None = Field(None, ge=6, le=1800)

    @model_validator(mode="after")
    def _protocol_settings(self) -> KafkaSettings:
        # Every mechanism orderbus offers (PLAIN, SCRAM) needs all three; settings the protocol ignores are
        # refused rather than silently dropped.
        given = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, name)]
        if self.security_protocol in _SASL:
            missing = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password") if name not in given]
            if missing:
                raise ValueError(f"security_protocol {self.security_protocol} needs {', '.join(missing)}")
        elif given:
            raise ValueError(
                f"{', '.join(given)} set, but security_protocol is {self.security_protocol}: "
                "SASL needs SASL_SSL or SASL_PLAINTEXT"
            )
        tls = [name for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(self, name) is not None]
        if tls and self.security_protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(
                f"{', '.join(tls)} set, but security_protocol is {self.security_protocol}: TLS needs SSL or SASL_SSL"
            )
        if (lone := _lone_half(self, "ssl_certfile", "ssl_keyfile")) is not None:
            raise ValueError(f"{lone[0]} set without {lone[1]}: a client certificate needs both (PEM files)")
        return self

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port_list(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                which = f"; {server.strip()!r} is not" if "," in value else ""  # the whole value is shown after
                raise ValueError(f"expected host:port[,host:port...]{which}")
        return value


class TopicSettings(_Section):
    """Partitions, replication and retention of the topic catalogue (names live in `topics.catalogue`)."""

    prefix: str = Field("", pattern=r"^[A-Za-z0-9._-]{0,100}$")
    orders_partitions: int = Field(12, ge=1, le=1000)
    dlq_partitions: int = Field(3, ge=1, le=1000)
    replication_factor: int = Field(1, ge=1, le=10)
    min_insync_replicas: int = Field(1, ge=1, le=10)
    orders_retention_hours: float = Field(168, gt=0)
    dlq_retention_hours: float = Field(720, gt=0)
    # How long a sink's state topic keeps an order's downstream id and blocks (`consumers.order_state`).
    state_retention_hours: float = Field(2160, gt=0)


class IngestSettings(_Section):
    """The webhook endpoint ``POST /v1/orders``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8080
    max_body_bytes: int = Field(1_048_576, ge=1024, le=16 * 1_048_576)
    # The bodies of the requests under way, together (`daemon.ingest`): at least one body of max_body_bytes.
    body_buffer_bytes: int = Field(64 * 1_048_576, ge=1024, le=16 * 1024 * 1_048_576)
    webhook_secrets: tuple[SecretStr, ...] = ()
    # Without secrets the ingest refuses to start, unless this says that only trusted senders can reach it.
    allow_unsigned: bool = False
    signature_tolerance: Seconds = 300.0
    body_timeout: Seconds = 30.0  # a body not in within this is 408: a stalled client holds nothing longer
    # Connections open at once on the webhook's listener (`daemon.connection_gate`); fewer than 16 would leave a load
    # balancer's health checks fighting the senders for them.
    max_connections: int = Field(1024, ge=16, le=1_000_000)
    publish_timeout: Seconds = 10.0
    retry_after: int = Field(5, ge=1, le=3600)
    idempotency_retention_hours: float = Field(48, ge=24)
    # The envelope's own rule: a source it would refuse failed every request with a 500 (the webhook's slug).
    source: str = Field("webhook", pattern=SOURCE_PATTERN)
    # HTTPS on this listener (`daemon.tls_listener`): a PEM certificate chain and its unencrypted key, read at start
    # and again at each reload; neither for plain HTTP behind a TLS proxy. Named as `kafka.ssl_cafile` is: a
    # ``*_FILE`` variable holds a setting's value, not its path.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _lines(cls, value: Any) -> Any:
        # A *_FILE credential holds one secret per line.
        if isinstance(value, str):
            return tuple(line.strip() for line in value.splitlines() if line.strip())
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _usable_secrets(cls, secrets: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        # Checked here, not first by the verifier at start: `config check` must find what `run` would refuse.
        for index, secret in enumerate(secrets):
            try:
                secret_key(secret.get_secret_value(), f"secret {index + 1} of {len(secrets)}")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return secrets

    @model_validator(mode="after")
    def _one_body_fits(self) -> IngestSettings:
        if self.body_buffer_bytes < self.max_body_bytes:
            raise ValueError(
                f"body_buffer_bytes: {self.body_buffer_bytes} is less than max_body_bytes ({self.max_body_bytes}): "
                "a body of the largest size allowed could never be taken"
            )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> IngestSettings:
        if (lone := _lone_half(self, "tls_certfile", "tls_keyfile")) is not None:
            raise ValueError(f"{lone[1]}: HTTPS needs it beside {lone[0]} (or neither, for plain HTTP)")
        return self

    @property
    def scheme(self) -> str:
        return "http" if self.tls_certfile is None else "https"

    def require_signatures(self) -> None:
        """`ConfigError` for an enabled ingest without secrets unless `allow_unsigned` says so: checked by `run` and
        `config check`, not by every command that reads the settings (an operator's shell cannot read the
        credentials). Failing open was the old way: an empty credential file, or a container started without the
        variable, left anyone who could reach the port free to post orders, with a warning in the log."""
        if self.enabled and not self.webhook_secrets and not self.allow_unsigned:
            raise ConfigError(
                "ingest.webhook_secrets: none given, so anyone who can reach the port could post orders; give the "
                "signing secret (ingest.webhook_secrets, or ORDERBUS_INGEST__WEBHOOK_SECRETS_FILE), set "
                "ingest.allow_unsigned = true where only trusted senders reach it, or ingest.enabled = false"
            )


class AdminSettings(_Section):
    """A listener of its own for ``/metrics`` and ``/status`` (with ``/healthz`` and ``/readyz``), when `port` is set.

    Without it they are served on the ingest's port, beside the webhook: whoever can post an order can then read
    the counters and the sinks' states too. With it, the ingest's port serves the webhook, ``/openapi.json``,
    ``/healthz`` and ``/readyz`` only, and this one is for Prometheus and the operator's commands.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] | None = None  # not 0: a port chosen at random, no one finds it


def _secret_text(value: Any) -> Any:
    # A numeric key in TOML (key = 123456) is still a key; converting here also keeps it out of error messages.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Secret = Annotated[SecretStr, BeforeValidator(_secret_text)]
HeaderName = Annotated[str, Field(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")]
# Headers orderbus sets itself on every request; a credential must not replace them.
_RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "idempotency-key", "x-event-id"})


def _usable_url(value: str) -> str:
    """A URL the sinks' HTTP client will send to: no user info (it would refuse every request), a valid host.

    Messages name the problem, never the URL: it may hold a password.
    """
    try:
        parts = urlsplit(value)
    except ValueError:  # urllib's reason: "Invalid IPv6 URL" for an unclosed bracket
        raise ValueError("not a usable URL: an IPv6 host goes in brackets, [::1]") from None
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise ValueError("not a usable URL: the port must be a number from 0 to 65535") from None
    if "@" in parts.netloc:
        raise ValueError(
            "a URL must not hold user info (user:password@): give credentials in the sink's auth settings "
            '(auth.type = "basic", "bearer", ...)'
        )
    ascii_host(parts.hostname or "")  # the sinks' HTTP client's own check: an InvalidRequestError is a ValueError
    return value


HttpUrl = Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$"), AfterValidator(_usable_url)]


def _base(value: str) -> str:
    """A base URL the sinks append paths to (``{base_url}/orders``): a query or fragment would swallow them."""
    parts = urlsplit(value)
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValueError("a base URL takes no query (?...) or fragment (#...): the paths are appended to it")
    return value


BaseUrl = Annotated[HttpUrl, AfterValidator(_base)]


class _AuthSection(_Section):
    """A credential scheme. Secrets are checked here, after parsing, so no error message ever quotes one."""

    def _require(self, name: str, secret: SecretStr, *, in_header: bool = False) -> None:
        value = secret.get_secret_value()
        if not value:
            raise ValueError(f"{name} must not be empty")
        if in_header and any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
            raise ValueError(f"{name} must not contain control characters (a line break, a tab)")


class NoAuthSettings(_AuthSection):
    """No credentials."""

    type: Literal["none"] = "none"


class BearerAuthSettings(_AuthSection):
    """``Authorization: Bearer <token>`` with a fixed token."""

    type: Literal["bearer"]
    token: Secret

    @model_validator(mode="after")
    def _secrets(self) -> BearerAuthSettings:
        self._require("token", self.token, in_header=True)
        return self


class BasicAuthSettings(_AuthSection):
    """``Authorization: Basic`` with a user name and a password."""

    type: Literal["basic"]
    username: str = Field(min_length=1, max_length=256, pattern=r"^[^:\x00-\x1f\x7f]+$")
    password: Secret

    @model_validator(mode="after")
    def _secrets(self) -> BasicAuthSettings:
        self._require("password", self.password)
        return self


class ApiKeyAuthSettings(_AuthSection):
    """An API key in a header of the system's choosing."""

    type: Literal["api_key"]
    header: HeaderName = "X-Api-Key"
    key: Secret

    @field_validator("header")
    @classmethod
    def _not_ours(cls, value: str) -> str:
        if value.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{value} is a header orderbus sets itself; name the API key header of the system")
        return value

    @model_validator(mode="after")
    def _secrets(self) -> ApiKeyAuthSettings:
        self._require("key", self.key, in_header=True)
        return self


class OAuth2Settings(_AuthSection):
    """OAuth2 client credentials: bearer tokens from `token_url`, renewed `refresh_margin` s before they expire."""

    type: Literal["oauth2"]
    token_url: HttpUrl
    client_id: str = Field(min_length=1, max_length=256)
    client_secret: Secret
    scope: str | None = Field(None, min_length=1, max_length=1024)
    refresh_margin: float = Field(30.0, ge=0, le=3600)
    client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"

    @model_validator(mode="after")
    def _secrets(self) -> OAuth2Settings:
        self._require("client_secret", self.client_secret)
        return self


_SECRETS = frozenset({"token", "password", "key", "client_secret"})  # the auth keys a *_FILE variable may hold
AuthSettings = Annotated[
    NoAuthSettings | BearerAuthSettings | BasicAuthSettings | ApiKeyAuthSettings | OAuth2Settings,
    Field(discriminator="type"),
]
# The union's tags, which pydantic puts in an error's location (``sinks.crm.auth.bearer.token``).
_TAG = re.compile(r"[A-Za-z0-9_-]{1,32}")  # an auth type shown in an error: a word, never a secret
_AUTH_TYPES = frozenset(
    get_args(scheme.model_fields["type"].annotation)[0] for scheme in get_args(get_args(AuthSettings)[0])
)
_DEFAULT_URLS = UrlTemplates()


class UrlSettings(_Section):
    """Where a system's orders live: templates with ``{base_url}``, ``{id}`` (by_id) and ``{order_number}``.

    ``create`` takes the POST; ``by_id`` the PUT and DELETE of an order whose downstream id is known (what the
    create answered); ``by_number`` those of an order without one.
    """

    create: str = _DEFAULT_URLS.create
    by_id: str = _DEFAULT_URLS.by_id
    by_number: str = _DEFAULT_URLS.by_number

    @model_validator(mode="after")
    def _templates(self) -> UrlSettings:
        try:
            self.templates()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None  # it shows each template masked (`consumers.masking`)
        for name in ("create", "by_id", "by_number"):
            example = getattr(self, name).format(base_url="http://example.invalid", id="1", order_number="SO-1")
            try:
                _usable_url(example)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self

    def templates(self) -> UrlTemplates:
        return UrlTemplates(create=self.create, by_id=self.by_id, by_number=self.by_number)


# `orderbus reconcile`'s requests a second to a sink without a `rate` (a reconcile is never unlimited).
RECONCILE_RATE: Final = 20.0


class SinkSettings(_Section):
    """One downstream system: where it is, how hard orderbus may push it, and what its answers mean.

    Credentials are the ``auth`` table, chosen by its ``type``: none (the default), bearer, basic, api_key or
    oauth2. Give secrets as files, as systemd credentials are: ``ORDERBUS_SINKS__CRM__AUTH__TYPE=bearer`` and
    ``ORDERBUS_SINKS__CRM__AUTH__TOKEN_FILE=$CREDENTIALS_DIRECTORY/crm-token``. ``request_timeout`` bounds each
    HTTP exchange with the system (and with its token endpoint); certificates are verified unless ``tls_verify``
    is false, against ``ca_bundle`` when the system uses a private CA. ``id_field`` names the id in the answer
    to a create, which the order's updates and cancels then use.
    """

    enabled: bool = False
    paused: bool = Field(
        False,
        description="hold the sink (a downstream's maintenance window): nothing is sent, retries included, and its "
        "orders wait in Kafka until it is set back to false; applied at a reload",
    )
    base_url: BaseUrl = "http://127.0.0.1:8090"
    max_in_flight: int = Field(256, ge=1, le=4096)
    max_buffered: int = Field(1000, ge=1, le=1_000_000)
    rate: float | None = Field(None, gt=0, description="requests per second; none: unlimited")
    burst: int | None = Field(None, ge=1)
    request_timeout: Seconds = 10.0
    commit_interval: Seconds = 1.0
    shutdown_grace: Seconds = 10.0
    backoff_base: Seconds = 0.5
    backoff_cap: Seconds = 60.0
    max_attempts: int = Field(12, ge=1, le=1000)
    max_elapsed: Seconds = 3600.0
    retry_after_cap: Seconds = 300.0
    circuit_failure_ratio: float = Field(0.5, gt=0, le=1)
    circuit_window: int = Field(20, ge=1, le=10_000)
    circuit_min_calls: int = Field(10, ge=1)
    circuit_open_for: Seconds = 30.0
    auth_pause: Seconds = 60.0
    response_policy: dict[str, Action] = {}
    tls_verify: bool = True
    ca_bundle: CaFile | None = None
    dedup_retention_hours: float = Field(
        168,
        ge=1,
        description="delivery states older than this are pruned; redeliveries after that rely on the "
        "downstream's idempotency keys",
    )
    auth: AuthSettings = NoAuthSettings()
    urls: UrlSettings = UrlSettings()
    id_field: str = Field("id", pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
    skip_unreadable: list[str] = Field(
        [],
        description="records the Kafka client cannot read that this sink goes on without, each dead-lettered in "
        "its place: TOPIC:PARTITION@OFFSET or TOPIC:PARTITION@FIRST-LAST, as `orderbus status` names a held one",
    )

    @field_validator("skip_unreadable")
    @classmethod
    def _skip_positions(cls, value: list[str]) -> list[str]:
        for position in value:
            _skip_range(position)
        return value

    def skips(self) -> dict[tuple[str, int], list[tuple[int, int]]]:
        """`skip_unreadable` by partition: (first, last) offsets, both included."""
        skips: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for position in self.skip_unreadable:
            topic, partition, first, last = _skip_range(position)
            skips.setdefault((topic, partition), []).append((first, last))
        return skips

    @field_validator("response_policy")
    @classmethod
    def _policy_keys(cls, value: dict[str, Action]) -> dict[str, Action]:
        # The keys ("404", "4xx") are parsed where the policy is built; parse them now, not when the sink starts.
        try:
            DEFAULT_POLICY.with_overrides(value, setting="response_policy")
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("response_policy: ")) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SinkSettings:
        if self.circuit_min_calls > self.circuit_window:
            raise ValueError(
                f"circuit_min_calls ({self.circuit_min_calls}) cannot exceed circuit_window ({self.circuit_window})"
            )
        if self.backoff_base > self.backoff_cap:
            raise ValueError(f"backoff_base ({self.backoff_base}) cannot exceed backoff_cap ({self.backoff_cap})")
        return self


_SKIP = re.compile(r"([A-Za-z0-9._-]{1,249}):([0-9]{1,9})@([0-9]{1,19})(?:-([0-9]{1,19}))?")


def _skip_range(position: str) -> tuple[str, int, int, int]:
    """``orders:2@1234`` or ``orders:2@1234-1240`` as (topic, partition, first, last); a `ValueError` names the
    form."""
    match = _SKIP.fullmatch(position)
    if match is None:
        raise ValueError(
            f"{position!r} is not TOPIC:PARTITION@OFFSET or TOPIC:PARTITION@FIRST-LAST (e.g. orders:2@1234: "
            "`orderbus status` says `orders:2 at 1234` of a held partition)"
        )
    topic, partition, first = match.group(1), int(match.group(2)), int(match.group(3))
    last = first if match.group(4) is None else int(match.group(4))
    if last < first:
        raise ValueError(f"{position!r}: the last offset is before the first")
    return topic, partition, first, last


def _default_sinks() -> dict[str, SinkSettings]:
    return {name: SinkSettings() for name in SINKS}


class Settings(_Section):
    """Everything orderbus reads at start."""

    state_dir: Path = Path("state")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    ingest: IngestSettings = IngestSettings()
    admin: AdminSettings = AdminSettings()
    sinks: dict[str, SinkSettings] = Field(default_factory=_default_sinks)

    @field_validator("sinks")
    @classmethod
    def _known_sinks(cls, value: dict[str, SinkSettings]) -> dict[str, SinkSettings]:
        unknown = sorted(set(value) - set(SINKS))
        if unknown:
            raise ValueError(f"unknown sink {unknown[0]!r}; the sinks are {', '.join(SINKS)}")
        return {**_default_sinks(), **value}

    @model_validator(mode="after")
    def _listeners_apart(self) -> Settings:
        admin, ingest = self.admin, self.ingest
        overlap = admin.host == ingest.host or admin.host in _ANY_HOST or ingest.host in _ANY_HOST
        if admin.port is not None and admin.port == ingest.port and overlap:
            raise ValueError(f"admin.port: {admin.port} is ingest.port too; the admin listener needs a port of its own")
        return self

    def enabled_sinks(self) -> dict[str, SinkSettings]:
        return {name: sink for name, sink in self.sinks.items() if sink.enabled}

    def weaknesses(self) -> list[str]:
        """What these settings leave open on the wire, in words (allowed, said at start and by `config check`)."""
        said = []
        if self.kafka.security_protocol == "SASL_PLAINTEXT" and self.kafka.sasl_mechanism == "PLAIN":
            said.append("kafka: SASL PLAIN over PLAINTEXT sends the Kafka password unencrypted; use SASL_SSL")
        for name, sink in self.enabled_sinks().items():
            if not sink.tls_verify:
                said.append(
                    f"sinks.{name}.tls_verify = false: neither the system's certificate nor its token endpoint's is "
                    "checked, so anyone on the path can read the orders and the credentials"
                )
            if not isinstance(sink.auth, NoAuthSettings) and urlsplit(sink.base_url).scheme == "http":
                said.append(f"sinks.{name}.base_url is plain http: its credentials and the orders travel unencrypted")
            if isinstance(sink.auth, OAuth2Settings) and urlsplit(sink.auth.token_url).scheme == "http":
                said.append(f"sinks.{name}.auth.token_url is plain http: the client secret travels unencrypted")
        return said

    def ingest_url(self) -> str:
        """Where a client on this host reaches the webhook's listener (https with ``ingest.tls_certfile``)."""
        return _local_url(self.ingest.host, self.ingest.port, self.ingest.scheme)

    def admin_url(self) -> str:
        """Where this daemon serves ``/status`` and ``/metrics``: the admin listener when it has one, else the
        webhook's."""
        if self.admin.port is None:
            return self.ingest_url()
        return _local_url(self.admin.host, self.admin.port)

    def admin_certificate(self) -> Path | None:
        """The certificate `admin_url`'s listener shows: the webhook's (``ingest.tls_certfile``) when that listener
        serves ``/status`` too; None for the admin listener's plain HTTP."""
        return self.ingest.tls_certfile if self.admin.port is None else None

    def masked(self) -> dict[str, Any]:
        """The effective settings as JSON values, secrets shown as ``**********``, and a URL's user info, query
        and fragment as ``***`` (``token_url = "https://login.example/token?client_secret=..."``)."""
        masked: dict[str, Any] = _masked_values(self.model_dump(mode="json"))
        return masked

    def masked_json(self) -> str:
        """`masked`, as `config check` prints it."""
        return json.dumps(self.masked(), indent=2)


# A listener's host that means every interface.
_ANY_HOST: Final = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - compared, not bound


def _local_url(host: str, port: int, scheme: str = "http") -> str:
    """The URL a client on this host asks a listener on host:port at: a wildcard host on 127.0.0.1, an IPv6 one in
    brackets."""
    host = "127.0.0.1" if host in _ANY_HOST else host
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


# The keys `Settings.admin_url` and `Settings.admin_certificate` read: where the daemon listens, and how.
_LISTENER_KEYS: Final = {"ingest": ("host", "port", "tls_certfile", "tls_keyfile"), "admin": ("host", "port")}


def only_listeners(data: dict[str, Any]) -> None:
    """A `load_settings` `complete`: leave of the raw settings document only the keys `Settings.admin_url` and
    `Settings.admin_certificate` read (a section that is not a table stays, for validation to name)."""
    kept: dict[str, Any] = {}
    for section, keys in _LISTENER_KEYS.items():
        if isinstance(values := data.get(section), dict):
            kept[section] = {key: values[key] for key in keys if key in values}
        elif section in data:
            kept[section] = values
    data.clear()
    data.update(kept)


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    complete: Callable[[dict[str, Any]], None] | None = None,
) -> Settings:
    """Read `path` (TOML, optional), apply ``ORDERBUS_*`` variables from `env`, let `complete` fill in what it
    may (the raw document, before validation), validate.

    Raises `ConfigError` naming the key (or variable, or file) and the problem.
    """
    data: dict[str, Any] = _read_toml(path) if path is not None else {}
    origins = _apply_env(data, os.environ if env is None else env)
    if complete is not None:
        complete(data)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, origins)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}), as TOML must be") from None


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Apply the ORDERBUS_* variables to `data`; return which variable set which dotted key."""
    origins: dict[str, str] = {}
    top_level = set(Settings.model_fields)
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        from_file = key.endswith("_file")
        key = key.removesuffix("_file")
        if from_file and name.removesuffix("_FILE") in env:
            # Which of the two wins was the sorting of their names: said, not guessed.
            raise ConfigError(f"environment variables {name.removesuffix('_FILE')} and {name}: set one of them")
        path = key.split("__")
        if len(path) == 1:
            if (meant := _one_underscore_too_few(key)) is not None:  # said before its file is read
                raise ConfigError(
                    f"environment variable {name}: no setting {key}; a section and its key are joined by two "
                    f"underscores: {ENV_PREFIX}{meant.upper()}{'_FILE' if from_file else ''}"
                )
            if key not in top_level:
                continue  # ORDERBUS_* variables of other tools (e.g. ORDERBUS_KAFKA_CACHE) are not settings
        value = _read_secret_file(name, raw) if from_file else raw
        if len(path) == 1:
            data[key] = value
            origins[key] = name
            continue
        if path[0] not in top_level or not all(path):
            raise ConfigError(f"environment variable {name}: no setting {'.'.join(path)}")
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"environment variable {name}: {part} is not a section")
        target[path[-1]] = _env_value(value)
        origins[".".join(path)] = name
    return origins


def _one_underscore_too_few(key: str) -> str | None:
    """``ingest_port`` → ``ingest__port``: a section's key written with one underscore, which would otherwise be
    taken for another tool's variable and ignored; None for a name that is no setting that way either."""
    for section, info in Settings.model_fields.items():
        model = info.annotation
        field = key.removeprefix(f"{section}_")
        if field != key and isinstance(model, type) and issubclass(model, BaseModel) and field in model.model_fields:
            return f"{section}__{field}"
    for sink in SINKS:
        rest = key.removeprefix(f"sinks_{sink}_")
        if rest == key:
            continue
        for field in SinkSettings.model_fields:  # `auth_token`: a key of the sink's auth table
            if rest == field or rest.startswith(f"{field}_"):
                return f"sinks__{sink}__{field}{rest.removeprefix(field).replace('_', '__', 1)}"
    return None


def _read_secret_file(name: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"environment variable {name}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"environment variable {name}: {path} is not UTF-8 text (byte {exc.start})") from None


def _env_value(value: str) -> Any:
    # Lists and tables come as JSON ('["a", "b"]'); everything else is a string pydantic converts.
    if value.startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _masked_values(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _masked_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_masked_values(item) for item in value]
    return mask_url(value) if isinstance(value, str) else value


def _setting_path(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """`loc` without pydantic's tag of the auth union (``sinks.crm.auth.bearer.token``): not a key one can set."""
    return tuple(part for i, part in enumerate(loc) if not (i and loc[i - 1] == "auth" and part in _AUTH_TYPES))


def _credential(loc: tuple[int | str, ...]) -> bool:
    """Whether `loc` is in a credentials section, whose values a settings error never shows: a sink's ``auth`` (a
    sink's name may hold a dot: by position, not by the joined key), ``kafka.sasl_*``, ``ingest.webhook_secrets``."""
    first, second, third = [*(str(part) for part in loc[:3]), "", "", ""][:3]
    return (
        (first == "sinks" and third == "auth")
        or (first == "kafka" and second.startswith("sasl_"))
        or (first, second) == ("ingest", "webhook_secrets")
    )


def _describe(exc: ValidationError, path: Path | None, origins: Mapping[str, str]) -> str:
    where = f" in {path}" if path is not None else ""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in _setting_path(error["loc"])) or "(root)"
        # The variables that set the key, or something inside it (ORDERBUS_SINKS__CRM__AUTH__TOKEN, for an error of
        # the whole sinks.crm.auth section).
        setters = sorted(
            var for dotted, var in origins.items() if key.startswith(dotted) or dotted.startswith(f"{key}.")
        )
        source = f" (set by {', '.join(setters)})" if setters else ""
        if error["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown setting{source}")
            continue
        if error["type"] in ("union_tag_not_found", "union_tag_invalid"):  # the auth section's `type`
            tag = str((error.get("ctx") or {}).get("tag"))
            shown = repr(tag) if _TAG.fullmatch(tag) else "it"  # a typo such as "Bearer <token>" is not echoed
            invalid = error["type"] == "union_tag_invalid"
            which = f"{shown} is not one of" if invalid else "missing: name the scheme, one of"
            problems.append(f"{key}.type: {which} {', '.join(sorted(_AUTH_TYPES))}{source}")
            continue
        shown = error.get("input")
        # Never echo what might be a secret: a key named so, and anything in a credentials section, where a secret
        # typed into the wrong field ("X-Api-Key: <key>" as a header name, "user:password" as a user) would be shown.
        secret = any(word in key for word in ("secret", "password", "token", "key")) or _credential(error["loc"])
        if isinstance(shown, str):
            shown = mask_url(shown)
        bad = "" if secret or isinstance(shown, dict | list) else f" (got {shown!r})"
        hint = ""
        if error["type"] == "missing" and key.rpartition(".")[2] in _SECRETS:  # where a secret can come from
            hint = f" (in the file, or {ENV_PREFIX}{key.upper().replace('.', '__')}_FILE)"
        problems.append(f"{key}: {error['msg'].removeprefix('Value error, ')}{bad}{hint}{source}")
    return f"invalid settings{where}: " + "; ".join(problems)
