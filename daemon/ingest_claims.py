"""What a claim of an idempotency key gets (see `daemon.ingest_keys`): the key is ours, the first answer again,
another body under the key, or the key in flight right now.

They come back pickled from the key store's process, so they are not slotted: see `daemon.ingest_keys_sql`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Busy", "Claim", "Claimed", "Conflict", "Replay"]


@dataclass(frozen=True)
class Claimed:
    """The key is ours: publish, then `complete` (or `release` if publishing failed)."""


@dataclass(frozen=True)
class Replay:
    """The same body was answered before; answer exactly this again and publish nothing."""

    status: int
    body: bytes


@dataclass(frozen=True)
class Conflict:
    """The key was first used with a different body."""


@dataclass(frozen=True)
class Busy:
    """The same key is in flight in this process (a concurrent duplicate); nothing is known yet."""


Claim = Claimed | Replay | Conflict | Busy
