"""One sink's engine with its real parts: its own consumer group, its dedup file, its HTTP connection pool.

`open_sink` is an async context manager that opens them in dependency order (SQLite → HTTP pool → consumer
joined to its group → engine) and closes them in reverse; the caller runs `engine.run(stop)` inside it. Leaving
the consumer (`stop()`) leaves the group after the engine drained and committed.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka.errors import KafkaError

from consumers.clock import Clock, SystemClock
from consumers.deadletter import DeadLetterWriter
from consumers.dedup import SqliteDedupStore
from consumers.delivery import Reply, TransportFailure, attempt
from consumers.engine import EngineConfig, SinkEngine
from consumers.kafka_io import KafkaConsumerPort, Rebalance, sink_consumer
from consumers.metrics import EngineMetrics
from consumers.sink import HttpRequest, Sink
from topics.errors import BrokerError


@dataclass(frozen=True)
class HttpConfig:
    """How the sink's HTTP client connects: per-request timeout and TLS verification."""

    timeout: float = 10.0
    tls_verify: bool = True
    ca_bundle: Path | None = None


@contextlib.asynccontextmanager
async def open_sink(
    sink: Sink,
    *,
    client_options: Mapping[str, Any],
    topic: str,
    prefix: str,
    dedup_path: Path,
    dead_letters: DeadLetterWriter,
    metrics: EngineMetrics,
    config: EngineConfig,
    http: HttpConfig,
    auth_headers: Mapping[str, str] | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[SinkEngine]:
    async with contextlib.AsyncExitStack() as stack:
        store = SqliteDedupStore(dedup_path)
        await store.open()
        stack.push_async_callback(store.close)

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=config.max_in_flight, ssl=_ssl(http)),
            raise_for_status=False,
        )
        stack.push_async_callback(session.close)
        headers = dict(auth_headers or {})

        async def deliver(request: HttpRequest, key: str) -> Reply | TransportFailure:
            return await attempt(session, request, idempotency_key=key, auth_headers=headers, timeout=http.timeout)

        consumer = sink_consumer(client_options, sink.name, prefix=prefix)
        stack.push_async_callback(consumer.stop)  # safe on a consumer that never started
        engine = SinkEngine(
            sink, KafkaConsumerPort(consumer), deliver, store, dead_letters, metrics, clock or SystemClock(), config
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            raise BrokerError(f"sink {sink.name}: cannot join the consumer group: {exc!r}") from exc
        consumer.subscribe([topic], listener=Rebalance(engine))
        yield engine


def _ssl(http: HttpConfig) -> ssl.SSLContext | bool:
    if not http.tls_verify:
        return False
    return ssl.create_default_context(cafile=str(http.ca_bundle) if http.ca_bundle else None)
