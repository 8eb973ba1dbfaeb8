"""Pruning the state files by hand (`orderbus dedup prune`, `daemon.retention.prune`) beside a running daemon."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from daemon.ingest_keys import Busy, Claimed, Replay, SqliteIngestKeyStore, body_sha256
from daemon.retention import MIN_DEDUP_RETENTION_HOURS, MIN_INGEST_KEY_RETENTION_HOURS, ingest_keys_path, prune
from daemon.settings import Settings, load_settings
from topics.errors import ConfigError

NOW = 1_900_000_000.0
HOUR = 3600.0
BODY = body_sha256(b'{"order": "A-1"}')


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(env={"ORDERBUS_STATE_DIR": str(tmp_path)})


def test_the_least_retentions_are_those_of_the_settings() -> None:
    assert (MIN_DEDUP_RETENTION_HOURS, MIN_INGEST_KEY_RETENTION_HOURS) == (1, 24)


async def test_a_prune_by_hand_keeps_the_running_daemons_claims_in_flight(settings: Settings) -> None:
    # Regression: `dedup prune --older-than-hours 1` (or 0, or -100) ran a key store of its own, whose prune deletes
    # the in-flight claims of other owners older than the cutoff: the running daemon's webhook requests under way.
    async with SqliteIngestKeyStore(ingest_keys_path(settings.state_dir)) as daemon_keys:
        for key, at in (("old", NOW - 30 * HOUR), ("recent", NOW - 2 * HOUR)):
            await daemon_keys.claim(key, BODY, now=at)
            await daemon_keys.complete(key, 202, b"{}", now=at)
        await daemon_keys.claim("in-flight", BODY, now=NOW - 2 * HOUR)
        await daemon_keys.flush()

        assert await prune(settings, older_than_hours=1, now=NOW) == {"ingest-keys": 1}

        assert await daemon_keys.claim("in-flight", BODY, now=NOW) == Busy()  # still the daemon's
        assert await daemon_keys.claim("recent", BODY, now=NOW) == Replay(status=202, body=b"{}")
        assert await daemon_keys.claim("old", BODY, now=NOW) == Claimed()  # past the 24 hours: pruned


@pytest.mark.parametrize("hours", [-100.0, 0.0, 0.5, math.nan, math.inf, -math.inf])
async def test_a_retention_below_the_settings_least_or_not_finite_prunes_nothing(
    settings: Settings, hours: float
) -> None:
    async with SqliteIngestKeyStore(ingest_keys_path(settings.state_dir)) as daemon_keys:
        await daemon_keys.claim("old", BODY, now=NOW - 100 * HOUR)
        await daemon_keys.complete("old", 202, b"{}", now=NOW - 100 * HOUR)
        await daemon_keys.flush()
        with pytest.raises(ConfigError, match=r"--older-than-hours: a number of hours, at least 1 \(the least"):
            await prune(settings, older_than_hours=hours, now=NOW)
        assert await daemon_keys.claim("old", BODY, now=NOW) == Replay(status=202, body=b"{}")
