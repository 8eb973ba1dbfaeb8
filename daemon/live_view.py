"""The live terminal view of `orderbus demo`: one row per sink, redrawn once a second, and the summary at the end.

Everything shown is a count, a rate or a state read from the daemon's metrics registry (`consumers.metrics`) and
the generator's counters (`daemon.generator.GeneratorStats`), labelled by sink name only: no order content, so
no personal data, can reach the terminal.

On a terminal the frame is redrawn in place with plain ANSI escapes (cursor up, erase line; no curses); anywhere
else (a pipe, a CI log) each refresh is one plain line.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TextIO

from prometheus_client import CollectorRegistry

from daemon.generator import GeneratorStats

# Sample name (with the outcome or reason label, if any) -> `SinkState` field. Lag is summed over partitions.
_FIELDS: Final = {
    "orderbus_retries_total:throttled": "throttled_retries",
    "orderbus_deliveries_total:delivered": "delivered",
    "orderbus_deliveries_total:duplicate": "duplicates",
    "orderbus_deliveries_total:dead_lettered": "dead_lettered",
    "orderbus_parked_keys": "retrying",
    "orderbus_in_flight_requests": "in_flight",
    "orderbus_consumer_lag": "lag",
    "orderbus_throttled_seconds_total": "throttled_seconds",
    "orderbus_last_retry_after_seconds": "retry_after",
    "orderbus_circuit_state": "circuit",
    "orderbus_auth_paused": "auth_paused",
    "orderbus_assigned_partitions": "assigned",
}
_BOLD, _RESET, _UP, _ERASE = "\x1b[1m", "\x1b[0m", "\x1b[{n}F", "\x1b[K"


@dataclass(frozen=True, slots=True)
class SinkState:
    """One sink's counters and gauges at one moment."""

    delivered: float = 0.0
    duplicates: float = 0.0
    dead_lettered: float = 0.0
    retrying: float = 0.0  # order keys parked until their next attempt
    in_flight: float = 0.0
    lag: float = 0.0
    throttled_retries: float = 0.0  # attempts answered 429, to be retried
    throttled_seconds: float = 0.0  # counted when a hold ends
    retry_after: float = 0.0
    circuit: float = 0.0  # 0 closed, 1 half-open, 2 open
    auth_paused: float = 0.0
    assigned: float = 0.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every sink's state and the generator's counts at monotonic time `at`."""

    at: float
    sinks: Mapping[str, SinkState]
    generator: GeneratorStats


def read_sinks(registry: CollectorRegistry, sinks: Iterable[str]) -> dict[str, SinkState]:
    """The state of each of `sinks`, in one pass over the registry."""
    values: dict[str, dict[str, float]] = {sink: {} for sink in sinks}
    for family in registry.collect():
        for sample in family.samples:
            sink = sample.labels.get("sink")
            label = sample.labels.get("outcome") or sample.labels.get("reason")
            field = _FIELDS.get(f"{sample.name}:{label}" if label else sample.name)
            if field is None or sink not in values:
                continue
            values[sink][field] = values[sink].get(field, 0.0) + sample.value
    return {sink: SinkState(**fields) for sink, fields in values.items()}


def snapshot(registry: CollectorRegistry, sinks: Iterable[str], generator: GeneratorStats, at: float) -> Snapshot:
    return Snapshot(at, read_sinks(registry, sinks), dataclasses.replace(generator))


def state_of(previous: SinkState | None, current: SinkState) -> str:
    """The one thing to know about a sink right now, most urgent first."""
    if current.auth_paused:
        return "paused: credentials refused (401/403)"
    if current.circuit >= 2:
        return "circuit open: the system keeps failing"
    if previous is not None and (
        current.throttled_retries > previous.throttled_retries or current.throttled_seconds > previous.throttled_seconds
    ):
        # A hold shows when its 429 arrives and when it ends: the frames between change nothing.
        return f"throttled: Retry-After {current.retry_after:g} s"
    if current.circuit >= 1:
        return "circuit half-open: probing"
    if not current.assigned:
        return "joining its consumer group"
    if current.retrying:
        return "retrying"
    return "ok"


def _per_second(previous: float, current: float, seconds: float) -> float:
    return max(0.0, current - previous) / seconds if seconds > 0 else 0.0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _orders_line(previous: Snapshot | None, current: Snapshot) -> str:
    stats = current.generator
    seconds = current.at - previous.at if previous else 0.0
    rate = _per_second(previous.generator.accepted, stats.accepted, seconds) if previous else 0.0
    line = (
        f"orders sent {stats.accepted} ({rate:.1f}/s): {stats.created} new, {stats.updated} updates, "
        f"{stats.cancelled} cancels; {stats.repeats_replayed} webhook repeats answered from the idempotency store"
    )
    if stats.retries or stats.refused:
        line += f"; {stats.retries} sent again, {stats.refused} refused"
    return line


_HEADER: Final = f"{'sink':<12}{'delivered':>10}{'rate/s':>8}{'retrying':>10}{'dead-lettered':>15}{'lag':>7}  state"


_HEADER_LINE: Final = 3  # of a frame


def render_frame(previous: Snapshot | None, current: Snapshot, elapsed: float, status: str = "") -> list[str]:
    """The lines of one frame: a title with `status`, the generator, then a table with one row per sink."""
    seconds = current.at - previous.at if previous else 0.0
    title = " · ".join(part for part in ("orderbus demo", _clock(elapsed), status) if part)
    lines = [title, _orders_line(previous, current), "", _HEADER]
    for name, sink in current.sinks.items():
        before = previous.sinks.get(name) if previous else None
        rate = _per_second(before.delivered, sink.delivered, seconds) if before else 0.0
        lines.append(
            f"{name:<12}{sink.delivered:>10.0f}{rate:>8.1f}{sink.retrying:>10.0f}{sink.dead_lettered:>15.0f}"
            f"{sink.lag:>7.0f}  {state_of(before, sink)}"
        )
    return lines


def render_line(previous: Snapshot | None, current: Snapshot, elapsed: float, status: str = "") -> str:
    """One frame as one line, for logs and pipes."""
    seconds = current.at - previous.at if previous else 0.0
    parts = [f"{_clock(elapsed)} sent {current.generator.accepted}"]
    for name, sink in current.sinks.items():
        before = previous.sinks.get(name) if previous else None
        rate = _per_second(before.delivered, sink.delivered, seconds) if before else 0.0
        parts.append(
            f"{name} delivered {sink.delivered:.0f} ({rate:.1f}/s) retrying {sink.retrying:.0f} "
            f"dead {sink.dead_lettered:.0f} lag {sink.lag:.0f} {state_of(before, sink)}"
        )
    if status:
        parts.append(status)
    return " | ".join(parts)


class LiveView:
    """Writes frames to `out`: redrawn in place on a terminal, one line per frame elsewhere."""

    def __init__(self, out: TextIO, *, tty: bool | None = None) -> None:
        self._out = out
        self._tty = out.isatty() if tty is None else tty
        self._drawn = 0  # lines of the last frame on screen
        self._previous: Snapshot | None = None

    def show(self, current: Snapshot, elapsed: float, status: str = "") -> None:
        if self._tty:
            width = shutil.get_terminal_size().columns
            # Cut to the width: a wrapped line would throw the next redraw off by a line.
            frame = render_frame(self._previous, current, elapsed, status)
            lines = [line if len(line) < width else line[: width - 1] for line in frame]
            lines[_HEADER_LINE] = f"{_BOLD}{lines[_HEADER_LINE]}{_RESET}"
            up = _UP.format(n=self._drawn) if self._drawn else ""
            self._out.write(up + "".join(f"{line}{_ERASE}\n" for line in lines))
            self._drawn = len(lines)
        else:
            self._out.write(render_line(self._previous, current, elapsed, status) + "\n")
        self._out.flush()
        self._previous = current


@dataclass(frozen=True, slots=True)
class SinkSummary:
    """One sink at the end of a demo. None: not known (the sandbox or Kafka did not answer)."""

    delivered: int
    dead_lettered: int
    dedup_skipped: int  # records found already applied: the dedup table, or a create's 409 (outcome "duplicate")
    downstream_replays: int | None  # repeated requests the system's idempotency keys answered without applying
    applied: int | None  # effects in the system's own ledger
    left: int | None  # records of the orders topic this sink has not committed yet
    first_delivery: float | None  # seconds from the demo's start to the system's first applied effect


@dataclass(frozen=True, slots=True)
class Summary:
    seconds: float
    generator: GeneratorStats
    sinks: Mapping[str, SinkSummary]
    hints: Sequence[str] = ()


def _known(value: float | None, unit: str = "") -> str:
    return "?" if value is None else f"{value:.1f}{unit}" if unit else str(value)


def render_summary(summary: Summary) -> list[str]:
    """What the demo did, per sink, and where to look next."""
    stats = summary.generator
    lines = [
        f"orderbus demo: stopped after {_clock(summary.seconds)}.",
        f"  orders sent: {stats.created} new, {stats.updated} updates, {stats.cancelled} cancels = {stats.accepted} "
        f"events ({stats.requests} requests)",
        f"  webhook repeats: {stats.repeats}, {stats.repeats_replayed} of them answered from the idempotency store, "
        "nothing published again",
        f"  {'sink':<12}{'delivered':>10}{'applied there':>15}{'dead-lettered':>15}{'duplicates avoided':>20}"
        f"{'left in Kafka':>15}{'first delivery':>16}",
    ]
    for name, sink in summary.sinks.items():
        avoided = sink.dedup_skipped + (sink.downstream_replays or 0)
        lines.append(
            f"  {name:<12}{sink.delivered:>10}{_known(sink.applied):>15}{sink.dead_lettered:>15}{avoided:>20}"
            f"{_known(sink.left):>15}{_known(sink.first_delivery, ' s'):>16}"
        )
    skipped = sum(sink.dedup_skipped for sink in summary.sinks.values())
    replays = sum(sink.downstream_replays or 0 for sink in summary.sinks.values())
    lines += [
        f"  duplicates avoided: {replays} requests repeated after a lost answer, absorbed by the systems' "
        "idempotency keys;",
        f"                      {skipped} records found already applied (orderbus's dedup table, or a create's "
        "409) and skipped",
    ]
    lines.extend(summary.hints)
    return lines
