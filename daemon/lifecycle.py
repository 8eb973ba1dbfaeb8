"""The daemon's lifecycle: open everything in dependency order, serve until asked to stop, close in reverse.

One `AsyncExitStack` owns every resource (SQLite → Kafka producer → ingest → HTTP server), so a failure while
starting closes what was already open, and a clean stop closes everything in reverse order. Signal handlers only
set the stop event (see `daemon.cli`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AsyncExitStack

from aiohttp import web

from daemon.app import build_app
from daemon.ingest import Ingest, IngestConfig
from daemon.ingest_keys import SqliteIngestKeyStore
from daemon.kafka_options import client_options
from daemon.publisher import KafkaPublisher
from daemon.settings import Settings
from daemon.signature import WebhookVerifier
from topics.catalogue import orders_topic
from topics.errors import ConfigError

log = logging.getLogger(__name__)

INGEST_KEYS_FILE = "ingest-keys.sqlite"
_PRUNE_INTERVAL = 3600.0


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the daemon until `stop` is set."""
    async with AsyncExitStack() as stack:
        readiness: dict[str, str] = {}
        ingest: Ingest | None = None
        publisher: KafkaPublisher | None = None
        if settings.ingest.enabled:
            ingest, publisher = await _open_ingest(settings, stack)
        app = build_app(
            ingest=ingest,
            readiness=lambda: _reasons(publisher, readiness),
            max_body_bytes=settings.ingest.max_body_bytes,
        )
        runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.ingest.host, settings.ingest.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"ingest.host/ingest.port: cannot listen on {settings.ingest.host}:{settings.ingest.port}: "
                f"{exc.strerror}"
            ) from None
        log.info("listening on http://%s:%d", settings.ingest.host, settings.ingest.port)
        await stop.wait()
        log.info("stopping")


async def _open_ingest(settings: Settings, stack: AsyncExitStack) -> tuple[Ingest, KafkaPublisher]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    keys = SqliteIngestKeyStore(settings.state_dir / INGEST_KEYS_FILE)
    await keys.open()
    stack.push_async_callback(keys.close)
    retention = settings.ingest.idempotency_retention_hours * 3600
    pruner = asyncio.create_task(_prune_forever(keys, retention), name="ingest-key-pruner")
    stack.push_async_callback(_cancel, pruner)

    publisher = KafkaPublisher(
        orders_topic(settings.topics.prefix),
        client_options(settings.kafka),
        request_timeout=settings.kafka.request_timeout,
    )
    await publisher.start()
    stack.push_async_callback(publisher.close)

    secrets = [secret.get_secret_value() for secret in settings.ingest.webhook_secrets]
    if not secrets:
        log.warning("ingest.webhook_secrets is empty: unsigned webhooks are accepted")
    ingest = Ingest(
        publisher,
        keys,
        IngestConfig(
            max_body_bytes=settings.ingest.max_body_bytes,
            publish_timeout=settings.ingest.publish_timeout,
            retry_after=settings.ingest.retry_after,
            source=settings.ingest.source,
        ),
        verifier=WebhookVerifier(secrets, tolerance=settings.ingest.signature_tolerance) if secrets else None,
    )
    stack.push_async_callback(ingest.close)
    return ingest, publisher


def _reasons(publisher: KafkaPublisher | None, extra: dict[str, str]) -> dict[str, str]:
    reasons = dict(extra)
    if publisher is not None and not publisher.available:
        reasons["ingest"] = "kafka is unreachable: the ingest cannot publish"
    return reasons


async def _prune_forever(keys: SqliteIngestKeyStore, retention: float) -> None:
    while True:
        removed = await keys.prune(time.time() - retention)
        if removed:
            log.info("pruned %d ingest idempotency keys", removed)
        await asyncio.sleep(_PRUNE_INTERVAL)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
