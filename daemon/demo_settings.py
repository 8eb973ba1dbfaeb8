"""What `orderbus demo` takes and what it makes of the settings file: one machine, one broker, one sandbox.

`demo_layout` loads the settings the way `orderbus run` does (the TOML file, then ``ORDERBUS_*`` variables), puts
the demo's port options on top, and checks that they describe this machine: Kafka on loopback, every enabled sink
at the one local sandbox, a webhook secret for the generator. `sandbox_auth` turns a sink's credentials into what
the sandbox system must demand, so the credentials are configured once, in the settings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from daemon import kafka_local
from daemon.settings import (
    ApiKeyAuthSettings,
    BasicAuthSettings,
    BearerAuthSettings,
    OAuth2Settings,
    Settings,
    SinkSettings,
    load_settings,
)
from topics.catalogue import SINKS
from topics.errors import ConfigError

DEMO_CONFIG: Final = kafka_local.REPO_ROOT / "deploy" / "dev" / "orderbus.toml"
DEMO_FAULTS: Final = kafka_local.REPO_ROOT / "deploy" / "dev" / "sandbox-faults.json"
RUN_DIR: Final = kafka_local.REPO_ROOT / ".run"
LOCAL_HOSTS: Final = ("127.0.0.1", "localhost")
# An OAuth2 token the sandbox issues lives this long.
_TOKEN_LIFETIME = 3600


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``orderbus demo`` takes; a port left None comes from the config file."""

    config: Path = DEMO_CONFIG
    faults: Path = DEMO_FAULTS
    kafka_dir: Path = RUN_DIR / "kafka"
    log_dir: Path = RUN_DIR  # orderbus.log (the daemon's JSON log) and sandbox.log
    kafka_port: int | None = None
    sandbox_port: int | None = None
    ingest_port: int | None = None
    rate: float = 20.0
    duration: float | None = None  # stop by itself after the generator has sent orders for this long
    catch_up: float = 15.0  # at the stop, how long the sinks may take to finish what was sent

    def __post_init__(self) -> None:
        for name in ("rate", "duration", "catch_up"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(f"--{name.replace('_', '-')}: expected a number > 0, got {value}")


@dataclass(frozen=True, slots=True)
class DemoLayout:
    """The validated settings and what the demo derives from them."""

    settings: Settings
    kafka_port: int
    sandbox_port: int
    secret: str

    @property
    def ingest_url(self) -> str:
        return self.settings.ingest_url()

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"


def demo_layout(options: DemoOptions, env: Mapping[str, str] | None = None) -> DemoLayout:
    """Load the demo's settings (the file, ``ORDERBUS_*`` variables, then the port options) and check that they
    describe this machine: Kafka on loopback, every enabled sink at the one local sandbox, a webhook secret."""
    overrides: dict[str, str] = {}
    if options.kafka_port is not None:
        overrides["ORDERBUS_KAFKA__BOOTSTRAP_SERVERS"] = f"127.0.0.1:{options.kafka_port}"
    if options.ingest_port is not None:
        overrides["ORDERBUS_INGEST__PORT"] = str(options.ingest_port)
    if options.sandbox_port is not None:
        for name in SINKS:
            overrides[f"ORDERBUS_SINKS__{name.upper()}__BASE_URL"] = f"http://127.0.0.1:{options.sandbox_port}/{name}"
    settings = load_settings(options.config, env={**(os.environ if env is None else env), **overrides})
    bootstrap = settings.kafka.bootstrap_servers
    host, _, port = bootstrap.partition(",")[0].rpartition(":")
    if host not in LOCAL_HOSTS or "," in bootstrap:
        raise ConfigError(f"kafka.bootstrap_servers: the demo starts one local broker, got {bootstrap!r}")
    if not settings.ingest.webhook_secrets:
        raise ConfigError("ingest.webhook_secrets: the demo's generator signs its webhooks; configure a secret")
    if not settings.enabled_sinks():
        raise ConfigError("sinks: the demo needs at least one enabled sink")
    return DemoLayout(
        settings, int(port), _sandbox_port(settings), settings.ingest.webhook_secrets[0].get_secret_value()
    )


def _sandbox_port(settings: Settings) -> int:
    ports = set()
    for name, sink in settings.enabled_sinks().items():
        url = urlsplit(sink.base_url)
        if url.scheme != "http" or url.hostname not in LOCAL_HOSTS or url.path.rstrip("/") != f"/{name}":
            raise ConfigError(
                f"sinks.{name}.base_url: the demo delivers to its local sandbox, http://127.0.0.1:PORT/{name}; "
                f"got {sink.base_url!r} (to deliver elsewhere, use `orderbus run`)"
            )
        ports.add(url.port or 80)
    if len(ports) > 1:
        raise ConfigError(f"sinks.*.base_url: the demo runs one sandbox, on one port; got ports {sorted(ports)}")
    return ports.pop()


def sandbox_auth(sink: SinkSettings) -> str | None:
    """The sandbox's auth spec for the credentials a sink sends (`daemon.sandbox.faults.Auth`), or None."""
    auth = sink.auth
    match auth:
        case BearerAuthSettings():
            return f"bearer:{auth.token.get_secret_value()}"
        case BasicAuthSettings():
            return f"basic:{auth.username}:{auth.password.get_secret_value()}"
        case ApiKeyAuthSettings():
            return f"header:{auth.header}:{auth.key.get_secret_value()}"
        case OAuth2Settings():
            return f"oauth2:{auth.client_id}:{auth.client_secret.get_secret_value()}:{_TOKEN_LIFETIME}"
    return None
