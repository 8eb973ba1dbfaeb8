"""Data retention: the state files in `state_dir`, and pruning them by hand (`orderbus dedup prune`).

The daemon prunes by itself every hour: delivery states after `sinks.<name>.dedup_retention_hours`, ingest
idempotency keys after `ingest.idempotency_retention_hours`. A record redelivered after its state was pruned
is sent again with the same Idempotency-Key, which the downstream answers from its own memory of the key.
Pruning by hand is safe while the daemon runs: SQLite serialises the writers of a file, each store prunes in short
transactions (the daemon's writes wait for one of them, not for the whole prune), and a retention given by
hand is held to the least the settings allow (`MIN_DEDUP_RETENTION_HOURS`, `MIN_INGEST_KEY_RETENTION_HOURS`).
The ingest keys keep that least even when a shorter one is given for the delivery states: a prune by hand runs a
key store of its own, to which the running daemon's claims in flight belong to another owner, and the store
deletes those once they are older than the cutoff; a webhook request holds its claim for about
`ingest.publish_timeout` (10 s by default, 24 h at most).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Final

from pydantic import BaseModel

from consumers.dedup import SqliteDedupStore
from daemon.ingest_keys import SqliteIngestKeyStore
from daemon.settings import IngestSettings, Settings, SinkSettings
from topics.errors import ConfigError

INGEST_KEYS_FILE = "ingest-keys.sqlite"


def _least(model: type[BaseModel], field: str) -> float:
    """The lower bound (``ge``) `daemon.settings` puts on a retention."""
    bounds = [getattr(rule, "ge", None) for rule in model.model_fields[field].metadata]
    return float(next(bound for bound in bounds if isinstance(bound, int | float)))


MIN_DEDUP_RETENTION_HOURS: Final = _least(SinkSettings, "dedup_retention_hours")
MIN_INGEST_KEY_RETENTION_HOURS: Final = _least(IngestSettings, "idempotency_retention_hours")


def dedup_path(state_dir: Path, sink: str) -> Path:
    """One SQLite file per sink: its delivery states, downstream ids and blocked orders."""
    return state_dir / f"dedup-{sink}.sqlite"


def ingest_keys_path(state_dir: Path) -> Path:
    return state_dir / INGEST_KEYS_FILE


def check_older_than_hours(hours: float) -> float:
    """`hours` if it is a retention the delivery states may have; else a `ConfigError` saying the least."""
    if not (math.isfinite(hours) and hours >= MIN_DEDUP_RETENTION_HOURS):
        raise ConfigError(
            f"--older-than-hours: a number of hours, at least {MIN_DEDUP_RETENTION_HOURS:g} (the least "
            f"dedup_retention_hours may be), got {hours:g}"
        )
    return hours


async def prune(
    settings: Settings, *, older_than_hours: float | None = None, now: float | None = None
) -> dict[str, int]:
    """Prune every state file that exists, as of `now` (unix seconds, default: the wall clock); `older_than_hours`
    overrides the configured retentions (`check_older_than_hours`), but the ingest keys are kept for at least
    `MIN_INGEST_KEY_RETENTION_HOURS` (see the module docstring)."""
    if older_than_hours is not None:
        check_older_than_hours(older_than_hours)
    now = time.time() if now is None else now
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
        hours = max(hours, MIN_INGEST_KEY_RETENTION_HOURS)
        key_store = SqliteIngestKeyStore(keys)
        await key_store.open()
        try:
            removed["ingest-keys"] = await key_store.prune(now - hours * 3600)
        finally:
            await key_store.close()
    return removed
