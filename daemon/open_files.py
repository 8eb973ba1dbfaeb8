"""The process's limit of open files, against what the settings let the daemon open at once.

The webhook listener holds up to ``ingest.max_connections`` connections and a few more it is refusing
(`daemon.connection_gate`), each sink up to
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

from daemon.connection_gate import refusals_held
from daemon.settings import Settings
from topics.errors import ConfigError

RESERVE: Final = 256

Limits = tuple[int, int]


def needed(settings: Settings) -> tuple[int, str]:
    """Descriptors the daemon may hold at once under `settings` (see the module docstring), and the settings that
    say so, for a message."""
    parts, said = RESERVE, []
    if settings.ingest.enabled:
        limit = settings.ingest.max_connections
        parts += limit + refusals_held(limit)
        said.append("ingest.max_connections")
    if sinks := settings.enabled_sinks():
        parts += sum(sink.max_in_flight for sink in sinks.values())
        said.append("sinks.*.max_in_flight")
    return parts, ", ".join(said) or "the daemon"


def ensure(
    need: int,
    settings_said: str,
    *,
    get: Callable[[int], Limits] = resource.getrlimit,
    set_limits: Callable[[int, Limits], None] = resource.setrlimit,
) -> Limits | None:
    """Raise the soft limit of open files to `need` if it is lower: the limits before, if raised; `ConfigError`
    naming `settings_said` if the hard limit is lower than `need` (or the system refuses)."""
    soft, hard = get(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    problem = (
        f"{settings_said}: the daemon may hold {need} files and connections at once (the listener's limit and the "
        f"connections it refuses, each sink's, and {RESERVE} for Kafka, SQLite and logs), but this process may open "
        f"{{allowed}} (ulimit -Hn; LimitNOFILE= under systemd, --ulimit nofile= in a container): raise that, or "
        "lower the settings"
    )
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(problem.format(allowed=hard))
    try:
        set_limits(resource.RLIMIT_NOFILE, (need, hard))
    except (ValueError, OSError) as exc:  # a system whose own cap is below the hard limit (macOS: OPEN_MAX)
        raise ConfigError(problem.format(allowed=f"{soft} ({exc})")) from None
    return soft, hard


def restore(limits: Limits) -> None:
    """Put back the limits `ensure` raised (a daemon run inside another process: the tests)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)
