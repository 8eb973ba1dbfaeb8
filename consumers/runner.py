"""One sink's engine with its real parts: its own consumer group, its dedup file, its HTTP connection pool.

`open_sink` is an async context manager that opens them in dependency order (SQLite → HTTP pool and credentials
→ consumer joined to its group → engine) and closes them in reverse; the caller runs `engine.run(stop)` inside
it. Leaving the consumer (`stop()`) leaves the group after the engine drained and committed (a static member,
`consumers.membership`, stays in it until its session times out, so that a restart finds its partitions). Every request
carries the sink's credentials (`consumers.auth`): a 401 renews them once and resends within the same attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from consumers.auth import Auth, NoAuth, authorized_attempt
from consumers.clock import Clock, SystemClock
from consumers.deadletter import DeadLetterWriter
from consumers.deadlines import Deadlines
from consumers.dedup import DedupStore, SqliteDedupStore
from consumers.delivery import Reply, TransportFailure
from consumers.engine import EngineConfig, SinkEngine
from consumers.expiry import Positions
from consumers.http_client import HttpClient
from consumers.identity import USER_AGENT
from consumers.kafka_close import leave_group
from consumers.kafka_io import KafkaConsumerPort, Rebalance, keep_metadata_synchronizer, sink_consumer
from consumers.membership import DYNAMIC, ChurnWatch, Membership
from consumers.metrics import EngineMetrics
from consumers.order_state import SharedStateStore, StateTopic
from consumers.pruning import prune_forever
from consumers.sink import HttpRequest, Sink
from consumers.tasks import cancel_and_wait
from consumers.unreadable import ReadGuard
from topics.catalogue import consumer_group
from topics.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpConfig:
    """How the sink's HTTP client connects: per-request timeout and TLS verification."""

    timeout: float = 10.0
    tls_verify: bool = True
    ca_bundle: Path | None = None

    def ssl_context(self, setting: str = "ca_bundle") -> ssl.SSLContext | bool:
        """Certificates verified (against `ca_bundle` if set, else the system's CAs) unless `tls_verify` is off.

        A bundle that cannot be loaded is a `ConfigError` naming `setting`: the settings checked the file, but it
        may have changed since, and a traceback at start is what systemd restarts for ever."""
        if not self.tls_verify:
            return False
        try:
            return ssl.create_default_context(cafile=str(self.ca_bundle) if self.ca_bundle else None)
        except OSError as exc:  # ssl.SSLError included
            raise ConfigError(f"{setting}: cannot load {self.ca_bundle}: {exc}") from None


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
    auth: Auth | None = None,
    clock: Clock | None = None,
    replay_topic: str | None = None,
    retention: float | None = None,
    membership: Membership = DYNAMIC,
    state: StateTopic | None = None,
) -> AsyncIterator[SinkEngine]:
    """`sink`'s engine, ready to `run`; `auth` (default: none) is closed with it; its consumer a member of the group
    as `membership` says; its downstream ids and blocks shared through `state`, the sink's state topic, if given
    (`consumers.order_state`)."""
    clock = clock or SystemClock()
    async with contextlib.AsyncExitStack() as stack:
        store = SqliteDedupStore(dedup_path)
        await store.open()
        stack.push_async_callback(store.close)
        shared: DedupStore = store if state is None else SharedStateStore(store, state)
        await shared.open()  # the shared store takes back what the file's outbox kept for the state topic
        if retention is not None:
            pruning = prune_forever(store.prune, retention, f"dedup-{sink.name}", clock)
            pruner = asyncio.create_task(pruning, name=f"prune-{sink.name}")
            stack.push_async_callback(cancel_and_wait, pruner)

        tls = http.ssl_context(f"sinks.{sink.name}.ca_bundle")
        client = HttpClient(limit=config.max_in_flight, ssl=tls, user_agent=USER_AGENT)
        stack.push_async_callback(client.close)
        credentials = auth if auth is not None else NoAuth()
        stack.push_async_callback(credentials.aclose)

        deadlines = Deadlines(SystemClock())  # real I/O, real time, whatever clock the engine is given

        async def deliver(request: HttpRequest, key: str) -> Reply | TransportFailure:
            return await authorized_attempt(
                client, request, credentials, idempotency_key=key, timeout=http.timeout, deadlines=deadlines
            )

        consumer = sink_consumer(client_options, sink.name, prefix=prefix, membership=membership)
        # Safe on a consumer that never started; within `LEAVE_TIMEOUT` with the broker gone.
        stack.push_async_callback(leave_group, consumer, f"sink {sink.name}")
        guard = ReadGuard(consumer, sink.name, clock)
        engine = SinkEngine(
            sink,
            KafkaConsumerPort(consumer, guard, Positions(consumer, sink.name)),
            deliver,
            shared,
            dead_letters,
            metrics,
            clock,
            config,
            replay_topic=replay_topic,
            churn=ChurnWatch(membership, consumer_group(sink.name, prefix), clock),
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            raise BrokerError(f"sink {sink.name}: cannot join the consumer group: {exc!r}") from exc
        keep_metadata_synchronizer(consumer._client, f"sink {sink.name}")  # its death once hung commits for good
        # The sink also reads its replay topic: dead letters the operator sends back to this sink only.
        topics = [topic] if replay_topic is None else [topic, replay_topic]
        consumer.subscribe(topics, listener=Rebalance(engine, guard))
        yield engine
