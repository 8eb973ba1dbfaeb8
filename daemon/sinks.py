"""From settings to sinks: which module serves which system, its credentials, and the engine knobs of each."""

from __future__ import annotations

from typing import Final

from consumers.accounting import AccountingSink
from consumers.auth import (
    ApiKeyHeader,
    Auth,
    BasicAuth,
    BearerToken,
    NoAuth,
    OAuth2Client,
    OAuth2ClientCredentials,
)
from consumers.backoff import Backoff
from consumers.clock import Clock
from consumers.crm import CrmSink
from consumers.engine import EngineConfig
from consumers.policy import DEFAULT_POLICY
from consumers.runner import HttpConfig
from consumers.shipping import ShippingSink
from consumers.sink import RestSink, Sink
from daemon.settings import (
    ApiKeyAuthSettings,
    BasicAuthSettings,
    BearerAuthSettings,
    NoAuthSettings,
    OAuth2Settings,
    SinkSettings,
)
from topics.errors import ConfigError

SINK_MODULES: Final[dict[str, type[RestSink]]] = {
    "crm": CrmSink,
    "accounting": AccountingSink,
    "shipping": ShippingSink,
}


def build_sink(name: str, settings: SinkSettings) -> Sink:
    """The sink module of system `name` (crm, accounting, shipping), with its policy and URL templates."""
    module = SINK_MODULES.get(name)
    if module is None:
        raise ConfigError(f"sinks.{name}: no sink module for {name!r}; the sinks are {', '.join(SINK_MODULES)}")
    policy = DEFAULT_POLICY.with_overrides(settings.response_policy, setting=f"sinks.{name}.response_policy")
    return module(name, settings.base_url, policy, id_field=settings.id_field, urls=settings.urls.templates())


def http_config(settings: SinkSettings) -> HttpConfig:
    return HttpConfig(settings.request_timeout, settings.tls_verify, settings.ca_bundle)


def build_auth(name: str, settings: SinkSettings, *, clock: Clock | None = None) -> Auth:
    """The credentials of sink `name`; an OAuth2 token endpoint is reached with the sink's timeout and TLS."""
    auth = settings.auth
    match auth:
        case NoAuthSettings():
            return NoAuth()
        case BearerAuthSettings():
            return BearerToken(auth.token.get_secret_value())
        case BasicAuthSettings():
            return BasicAuth(auth.username, auth.password.get_secret_value())
        case ApiKeyAuthSettings():
            return ApiKeyHeader(auth.header, auth.key.get_secret_value())
        case OAuth2Settings():
            client = OAuth2Client(
                token_url=auth.token_url,
                client_id=auth.client_id,
                client_secret=auth.client_secret.get_secret_value(),
                scope=auth.scope,
                refresh_margin=auth.refresh_margin,
                client_auth=auth.client_auth,
            )
            return OAuth2ClientCredentials(
                client,
                name=name,
                timeout=settings.request_timeout,
                clock=clock,
                tls=http_config(settings).ssl_context(f"sinks.{name}.ca_bundle"),
            )


def engine_config(settings: SinkSettings) -> EngineConfig:
    return EngineConfig(
        max_in_flight=settings.max_in_flight,
        max_buffered=settings.max_buffered,
        commit_interval=settings.commit_interval,
        shutdown_grace=settings.shutdown_grace,
        rate=settings.rate,
        burst=settings.burst,
        backoff=Backoff(
            base=settings.backoff_base,
            cap=settings.backoff_cap,
            max_attempts=settings.max_attempts,
            max_elapsed=settings.max_elapsed,
        ),
        retry_after_cap=settings.retry_after_cap,
        circuit_failure_ratio=settings.circuit_failure_ratio,
        circuit_window=settings.circuit_window,
        circuit_min_calls=settings.circuit_min_calls,
        circuit_open_for=settings.circuit_open_for,
        auth_pause=settings.auth_pause,
    )
