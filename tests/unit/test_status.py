"""`orderbus status`: what the daemon's status document says about the ingest, and how the command shows it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from daemon.ingest_keys import SqliteIngestKeyStore
from daemon.lifecycle import _reasons, _status
from daemon.publisher import KafkaPublisher
from daemon.status import render_status

EXITED = "ingest key store /var/lib/orderbus/ingest-keys.sqlite: its process exited (code -9)"


def test_a_failing_key_store_is_in_the_status_document_and_on_the_ingest_line(tmp_path: Path) -> None:
    keys = SqliteIngestKeyStore(tmp_path / "ingest-keys.sqlite")  # its state only; nothing is opened
    keys.failing = EXITED  # as a batch that failed leaves it (tests/unit/test_ingest_keys_process.py)
    document = _status(KafkaPublisher("orders", {}), keys, {}, CollectorRegistry())
    assert document["ingest"] == {"kafka_available": False, "key_store_error": EXITED}
    assert render_status(document).splitlines()[-2:] == [
        f"ingest: KAFKA UNREACHABLE; KEY STORE FAILING: {EXITED}",
        "NOT READY ingest: kafka is unreachable: the ingest cannot publish",
    ]


async def test_a_failing_key_store_makes_the_ingest_not_ready(tmp_path: Path) -> None:
    keys = SqliteIngestKeyStore(tmp_path / "ingest-keys.sqlite")  # never opened: its recheck fails quietly
    keys.failing = EXITED
    publisher = KafkaPublisher("orders", {})
    publisher._available = True  # as its health check leaves it when the broker answers
    assert _reasons(publisher, {}, keys) == {"ingest": f"the idempotency key store is failing: {EXITED}"}
    await asyncio.sleep(0)  # the recheck it asked for (tests/unit/test_ingest_keys_process.py) ends
    keys.failing = None  # a batch was written again
    assert _reasons(publisher, {}, keys) == {}


def test_the_ingest_line_says_publishing_when_kafka_answers_and_the_key_store_writes() -> None:
    document = {"sinks": {}, "ingest": {"kafka_available": True, "key_store_error": None}}
    assert render_status(document).splitlines()[-1] == "ingest: publishing"


def test_a_daemon_without_the_ingest_shows_no_ingest_line() -> None:
    assert "ingest" not in render_status({"sinks": {}, "ingest": None})
