"""Data retention: the state files in `state_dir`, and pruning them by hand (`orderbus dedup prune`).

The daemon prunes by itself every hour: delivery states after `sinks.<name>.dedup_retention_hours`, ingest
idempotency keys after `ingest.idempotency_retention_hours`. A record redelivered after its state was pruned
is sent again with the same Idempotency-Key, which the downstream answers from its own memory of the key.
Pruning by hand is safe while the daemon runs: SQLite serialises the writers of a file.
"""

from __future__ import annotations

import time
from pathlib import Path

from consumers.dedup import SqliteDedupStore
from daemon.ingest_keys import SqliteIngestKeyStore
from daemon.settings import Settings

INGEST_KEYS_FILE = "ingest-keys.sqlite"


def dedup_path(state_dir: Path, sink: str) -> Path:
    """One SQLite file per sink: its delivery states, downstream ids and blocked orders."""
    return state_dir / f"dedup-{sink}.sqlite"


def ingest_keys_path(state_dir: Path) -> Path:
    return state_dir / INGEST_KEYS_FILE


async def prune(settings: Settings, *, older_than_hours: float | None = None) -> dict[str, int]:
    """Prune every state file that exists; `older_than_hours` overrides the configured retentions."""
    now = time.time()
    removed: dict[str, int] = {}
    for name, sink in settings.sinks.items():
        path = dedup_path(settings.state_dir, name)
        if not path.exists():
            continue
        hours = sink.dedup_retention_hours if older_than_hours is None else older_than_hours
        async with SqliteDedupStore(path) as store:
            removed[f"dedup-{name}"] = await store.prune(now - hours * 3600)
    keys = ingest_keys_path(settings.state_dir)
    if keys.exists():
        hours = settings.ingest.idempotency_retention_hours if older_than_hours is None else older_than_hours
        key_store = SqliteIngestKeyStore(keys)
        await key_store.open()
        try:
            removed["ingest-keys"] = await key_store.prune(now - hours * 3600)
        finally:
            await key_store.close()
    return removed
