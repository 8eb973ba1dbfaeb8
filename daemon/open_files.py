"""The process's limit of open files, against what the settings let the daemon open at once.

The webhook listener holds up to ``ingest.max_connections`` connections (`daemon.connection_gate`), each sink up to
its ``max_in_flight`` connections to its downstream system, and besides those the daemon keeps `RESERVE`
descriptors: its Kafka clients' connections (one per broker and client, and the coordinators'), the SQLite files
(three each with their write-ahead log), the key store's process's pipes, the admin listener's connections and the
log. Past the limit every open fails alike, whichever part asked: a flood of webhook connections would have made
the sinks' connections fail too, which the listener's limit exists to prevent.

So at start a soft limit below the need is raised to it (a shell's 1024 is common; the hard limit is usually far
higher), and a hard limit below it is a `ConfigError` naming the settings, rather than a failure under load.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Final

from daemon.settings import Settings
from topics.errors import ConfigError

RESERVE: Final = 256

Limits = tuple[int, int]


def needed(settings: Settings) -> int:
    """Descriptors the daemon may hold at once under `settings` (see the module docstring)."""
    listener = settings.ingest.max_connections if settings.ingest.enabled else 0
    return listener + sum(sink.max_in_flight for sink in settings.enabled_sinks().values()) + RESERVE


def ensure(
    need: int,
    *,
    get: Callable[[int], Limits] = resource.getrlimit,
    set_limits: Callable[[int, Limits], None] = resource.setrlimit,
) -> Limits | None:
    """Raise the soft limit of open files to `need` if it is lower: the limits before, if raised; `ConfigError` if the
    hard limit is lower than `need`."""
    soft, hard = get(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(
            f"ingest.max_connections, sinks.*.max_in_flight: the daemon may hold {need} files and connections at "
            f"once (the listener's limit, each sink's, and {RESERVE} for Kafka, SQLite and logs), but this process "
            f"may open {hard} (ulimit -Hn; LimitNOFILE= under systemd, --ulimit nofile= in a container): raise "
            "that, or lower the settings"
        )
    set_limits(resource.RLIMIT_NOFILE, (need, hard))
    return soft, hard
