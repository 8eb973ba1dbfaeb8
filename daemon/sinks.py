"""From settings to sinks: which module serves which system, and the engine knobs of each."""

from __future__ import annotations

from consumers.backoff import Backoff
from consumers.engine import EngineConfig
from consumers.policy import DEFAULT_POLICY
from consumers.sink import RestSink, Sink
from daemon.settings import SinkSettings


def build_sink(name: str, settings: SinkSettings) -> Sink:
    policy = DEFAULT_POLICY.with_overrides(settings.response_policy, setting=f"sinks.{name}.response_policy")
    return RestSink(name, settings.base_url, policy)


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
