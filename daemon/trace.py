"""Where an order is (`orderbus trace ORDER`): its events on the orders topic and, per sink, what became of each.

The question the shop's team asks ("did SO-2026-101414 reach accounting?") and the one an operator asks after an
alert, answered from what orderbus keeps, without touching a downstream system:

- the order's records on the orders topic, found in its key's partition (murmur2, as every Kafka client's default
  partitioner and the ingest place them; ``--all-partitions`` for a producer that partitions otherwise);
- per sink, its group's committed offsets there (a record below is handled), its dead letters with their replay
  states (`daemon.dlq`), and the delivery states in this host's SQLite file (delivered, with the downstream's id;
  being delivered; blocked behind a dead letter), read without writing to it, beside the running daemon.

A line names order numbers, event ids and types, positions, HTTP statuses and downstream ids: no personal data.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.partitioner import murmur2

from consumers.blocks import decode_chain
from consumers.deadletter import copy_headers
from consumers.dedup_sql import (
    SELECT_BLOCKING,
    SELECT_DOWNSTREAM_ID,
    check_layout,
    select_blocked,
    select_in,
    select_states,
)
from consumers.delivery_state import DeliveryState
from consumers.sqlite_files import read_only
from consumers.unreadable import describe, passes_through
from consumers.work import RESEND_OF, idempotency_key, key_problem
from daemon.dlq import DeadLetterView, committed_offsets, order_number_in, read_with_replays, source_of
from daemon.kafka_options import client_options
from daemon.retention import dedup_path
from daemon.settings import Settings
from daemon.topic_reader import batches, reading
from topics.admin import partition_ids
from topics.catalogue import consumer_group, orders_topic
from topics.codec import decode
from topics.errors import BrokerError, ConfigError, ContractError, StoreError

__all__ = ["Found", "Resend", "SinkRecord", "TracedEvent", "explain", "key_partition", "trace"]


@dataclass(frozen=True, slots=True)
class TracedEvent:
    """One record of the order on the orders topic: where, when, and which event (or why it is not one)."""

    partition: int
    offset: int
    timestamp_ms: int
    event_type: str  # "invalid" when the value breaks the contract
    event_id: str  # "" when invalid
    detail: str  # the source, or the first contract error of an invalid record

    @property
    def where(self) -> str:
        return f"{self.partition}@{self.offset}"


@dataclass(frozen=True, slots=True)
class Resend:
    """A create of the order sent again to one sink through its replay topic (`orderbus reconcile --resend`)."""

    partition: int
    offset: int
    timestamp_ms: int
    event_id: str
    of: str  # the event it was made of

    @property
    def where(self) -> str:
        return f"{self.partition}@{self.offset}"


@dataclass(frozen=True, slots=True)
class SinkRecord:
    """What one sink holds about the order: its group's committed offsets on the orders topic, the order's dead
    letters, and from this host's file (None: no file here) the delivery states by event id, the downstream's id
    of the order and, if the order is blocked, its chain (`consumers.blocks`)."""

    name: str
    committed: Mapping[int, int]
    letters: Sequence[DeadLetterView]
    file: Path
    states: Mapping[str, DeliveryState] | None
    downstream_id: str | None = None
    blocked: Sequence[str] | None = None  # the idempotency keys of its events waiting in the dead letters
    resends: Sequence[Resend] = ()  # in the sink's replay topic; their states are in `states` too


@dataclass(frozen=True, slots=True)
class Found:
    """The order's records and where they were searched: partition -> (first offset, end offset)."""

    order: str
    topic: str
    events: Sequence[TracedEvent]
    searched: Mapping[int, tuple[int, int]]
    by_key: bool  # True: the key's partition only
    unreadable: str | None = None  # the client's error at a batch it cannot decode: the search stopped there


def key_partition(order: str, partitions: int) -> int:
    """The partition a record keyed by `order` goes to with the default partitioner (Java's, aiokafka's)."""
    hashed: int = murmur2(order.encode("utf-8"))
    return (hashed & 0x7FFFFFFF) % partitions


async def trace(
    settings: Settings, order: str, *, all_partitions: bool = False, since_ms: int | None = None
) -> tuple[Found, list[SinkRecord]]:
    """The order's records and every enabled sink's record of them."""
    if not order.strip():
        raise ConfigError("ORDER: give an order number, as the shop sent it (e.g. SO-2026-101414)")
    topic = orders_topic(settings.topics.prefix)
    options = client_options(settings.kafka)
    ids = await partition_ids(topic, options)
    if not ids:
        raise BrokerError(f"topic {topic} does not exist; run `orderbus topics apply`")
    wanted = ids if all_partitions else [key_partition(order, len(ids))]
    found = await _find(topic, wanted, order, options, since_ms)
    # A dead letter names its order by its value: one of the order's records keyed otherwise is found by position.
    positions = {(topic, str(event.partition), str(event.offset)) for event in found.events}

    async def record_of(name: str) -> SinkRecord:
        committed = await committed_offsets(consumer_group(name, settings.topics.prefix), topic, options, ids)
        every, replayed = await read_with_replays(settings, name)
        letters = [letter for letter in every if letter.order == order or source_of(letter.meta) in positions]
        path = dedup_path(settings.state_dir, name)
        return _local_states(name, committed, letters, path, order, found.events, resends(replayed).get(order, []))

    return found, list(await asyncio.gather(*(record_of(name) for name in settings.enabled_sinks())))


async def _find(
    topic: str, partitions: Sequence[int], order: str, options: Mapping[str, Any], since_ms: int | None
) -> Found:
    """The records of `order` in `partitions` of `topic` (keyed by it, or keyless with it in their value), read up
    to their end now (one batch at a time in memory beside those kept: a partition can hold millions)."""
    key = order.encode("utf-8")
    events: list[TracedEvent] = []
    unreadable = None
    async with reading(topic, options, partitions) as (consumer, tps):
        starts, ends = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        if since_ms is not None:
            at = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
            starts = {tp: ends[tp] if at[tp] is None else max(starts[tp], at[tp].offset) for tp in tps}
        try:
            async for _, records in batches(consumer, starts, ends):
                events.extend(_event(record) for record in records if _of_order(record, key, order))
        except Exception as exc:
            if passes_through(exc):
                raise
            unreadable = describe(exc)  # a batch it cannot decode (`consumers.unreadable`)
    events.sort(key=lambda event: (event.timestamp_ms, event.partition, event.offset))
    searched = {tp.partition: (starts[tp], ends[tp]) for tp in tps}
    return Found(order, topic, events, searched, by_key=len(partitions) == 1, unreadable=unreadable)


def resends(replayed: Sequence[tuple[int, Any]]) -> dict[str, list[Resend]]:
    """The resent creates among a replay topic's records (with their partitions), by the order they are of."""
    found: dict[str, list[Resend]] = {}
    for partition, record in replayed:
        headers = dict(copy_headers(record.headers))
        if (of := headers.get(RESEND_OF)) is not None and (order := record_order(record)) is not None:
            event_id = (headers.get("event-id") or b"").decode("ascii", "replace")
            resend = Resend(partition, record.offset, record.timestamp, event_id, of.decode("ascii", "replace"))
            found.setdefault(order, []).append(resend)
    return found


def record_order(record: Any) -> str | None:
    """The order a record is of, as the sinks read it: its key, or for a keyless one the order its value names."""
    return record.key.decode("utf-8", "replace") if record.key else order_number_in(record.value)


def _of_order(record: Any, key: bytes, order: str) -> bool:
    """`record_order`, with the JSON parse of a keyless record's value only when it holds the number's bytes."""
    if not record.key and (record.value is None or key not in record.value):
        return False
    return record_order(record) == order


def _event(record: Any) -> TracedEvent:
    """The record as the sinks see it: one whose key is not the order number its value names is invalid to them
    (`consumers.work.key_problem`), as a value that breaks the contract is."""
    try:
        event = decode(record.value)
    except ContractError as exc:
        first = exc.errors[0]
        return TracedEvent(
            record.partition, record.offset, record.timestamp, "invalid", "", f"{first.loc} {first.message}"
        )
    if (problem := key_problem(record.key, event.order.order_number)) is not None:
        return TracedEvent(record.partition, record.offset, record.timestamp, "invalid", "", f"key {problem}")
    return TracedEvent(
        record.partition, record.offset, record.timestamp, event.event_type, str(event.event_id), event.source
    )


def _local_states(
    name: str,
    committed: Mapping[int, int],
    letters: Sequence[DeadLetterView],
    path: Path,
    order: str,
    events: Sequence[TracedEvent],
    resends: Sequence[Resend] = (),
) -> SinkRecord:
    """The sink's record with what this host's file says of `events` and `resends` (none when the file is not
    here)."""
    if not path.exists():
        return SinkRecord(name, committed, letters, path, None, resends=resends)
    ids = [event.event_id for event in events if event.event_id] + [resend.event_id for resend in resends]
    keys = {idempotency_key(name, event_id): event_id for event_id in ids}
    try:
        with read_only(path) as db:
            check_layout(db)
            rows = select_states(db, [(order, key) for key in keys])
            downstream = select_in(db, SELECT_DOWNSTREAM_ID, [order])
            blocking = select_blocked(db, SELECT_BLOCKING, [order])
    except (sqlite3.Error, StoreError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    states = {keys[row[0]]: DeliveryState(*row) for row in rows}
    return SinkRecord(
        name,
        committed,
        letters,
        path,
        states,
        downstream_id=str(downstream[0][1]) if downstream else None,
        blocked=decode_chain(str(blocking[0][1])) if blocking else None,
        resends=resends,
    )


# --- the report ---------------------------------------------------------------------------------------------


def explain(found: Found, sinks: Sequence[SinkRecord]) -> list[str]:
    """The report's lines: the order's events, oldest first, each with one line per sink."""
    searched = ", ".join(
        f"partition {p} offsets {first}..{end - 1}" if end > first else f"partition {p} no records"
        for p, (first, end) in found.searched.items()
    )
    stopped = []
    if found.unreadable is not None:
        stopped = [
            f"  the search stopped at a batch the Kafka client cannot read ({found.unreadable}): later records are "
            "not shown (`orderbus status` names where a sink holds it)"
        ]
    if not found.events:
        lines = [f"no record of order {found.order} in {found.topic} ({searched or 'nothing to search'})", *stopped]
        if found.by_key:
            lines.append(
                "  searched its key's partition only: a record without a key, or from a producer that does not "
                "partition by murmur2 (librdkafka's default does not), is elsewhere: --all-partitions"
            )
        return lines
    lines = [f"order {found.order}: {len(found.events)} event(s) in {found.topic} ({searched})", *stopped]
    for event in found.events:
        at = _time(event.timestamp_ms / 1000)
        what = f"event_id={event.event_id} source={event.detail}" if event.event_id else event.detail
        lines.append(f"{event.where:>10} {at} {event.event_type} {what}")
        lines.extend(f"{'':>12}{sink.name:<11} {_verdict(event, sink, found.topic)}" for sink in sinks)
    for sink in sinks:
        for resend in sink.resends:
            state = sink.states.get(resend.event_id) if sink.states is not None else None
            lines.append(
                f"{sink.name}: resent {_time(resend.timestamp_ms / 1000)} as event_id={resend.event_id} (of "
                f"{resend.of}; replay topic {resend.where}): {_resend_verdict(state, sink)}"
            )
        if sink.blocked is not None:
            waiting = f"{len(sink.blocked)} of its events wait" if sink.blocked else "its unblocking is being written"
            lines.append(
                f"{sink.name}: the order is blocked ({waiting} in the dead letters; its new events follow them until "
                f"they are replayed): orderbus dlq replay --sink {sink.name} --order {found.order}"
            )
        if sink.states is None:
            lines.append(f"{sink.name}: no delivery-state file here ({sink.file}); states from Kafka only")
    return lines


def _verdict(event: TracedEvent, sink: SinkRecord, topic: str) -> str:
    """What became of `event` in `sink`, from the strongest evidence: its dead letter, its delivery state, its
    group's committed offset."""
    state = sink.states.get(event.event_id) if sink.states is not None and event.event_id else None
    letter = _letter_of(event, sink.letters, topic)
    if letter is not None:
        chain = [letter, *_failed_again(letter, sink.letters)]
        text = "dead-lettered: " + "; replayed, dead-lettered again: ".join(_letter(each) for each in chain)
        if chain[-1].state == "replayed" and state is not None and state.status in ("done", "duplicate"):
            text += f"; {_delivered(state, sink.downstream_id)}"
        return text
    committed = sink.committed.get(event.partition)
    if state is not None:
        match state.status:
            case "done" | "duplicate":
                return _delivered(state, sink.downstream_id)
            case "in_flight" if committed is None or committed <= event.offset:
                answer = f"last answer HTTP {state.last_status}" if state.last_status else "no answer yet"
                return f"being delivered: {_attempts(state)} so far, {answer}"
            case "in_flight":  # the partition moved on: an instance on another host finished it
                return (
                    f"handled: its group committed past it (this host last tried it: {_attempts(state)}, "
                    f"{_time(state.last_attempt_at)}; another instance finished it)"
                )
            case "dead":
                return f"dead-lettered ({state.reason}); the dead letter is no longer on its topic (retention)"
    if committed is not None and committed > event.offset:
        where = "pruned after dedup_retention_hours, or kept by an instance on another host"
        return f"handled: its group committed past it (no delivery state here: {where})"
    if committed is None:
        return f"not read yet: its group has committed nothing on partition {event.partition}"
    return (
        f"not delivered yet: its group is at offset {committed} of partition {event.partition}, "
        f"{event.offset - committed} record(s) before this one"
    )


def _resend_verdict(state: DeliveryState | None, sink: SinkRecord) -> str:
    """What became of a resent create, from this host's file alone."""
    if state is None:
        return "not delivered from this host yet (another instance may hold the order's partition)"
    match state.status:
        case "done" | "duplicate":
            return _delivered(state, sink.downstream_id)
        case "in_flight":
            answer = f"last answer HTTP {state.last_status}" if state.last_status else "no answer yet"
            return f"being delivered: {_attempts(state)} so far, {answer}"
        case _:
            return f"dead-lettered ({state.reason}): orderbus dlq list --sink {sink.name}"


def _delivered(state: DeliveryState, downstream_id: str | None) -> str:
    how = "delivered" if state.status == "done" else "delivered (the downstream already had it)"
    # The order's id there as the state file keeps it: the latest (a resend after a loss gets a new one), not
    # necessarily the one this event met.
    known = f", its id there now {downstream_id}" if downstream_id else ""
    return f"{how}{known}: {_attempts(state)}, {_time(state.last_attempt_at)}"


def _attempts(state: DeliveryState) -> str:
    return "1 attempt" if state.attempts == 1 else f"{state.attempts} attempts"


def _time(stamp: float | None) -> str:
    return "-" if stamp is None else datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


def _letter(letter: DeadLetterView) -> str:
    meta = letter.meta
    status = f", HTTP {meta['http-status']}" if meta.get("http-status") else ""
    return f"dlq {letter.where} ({meta.get('reason', '?')}{status}), state={letter.state}"


def _letter_of(event: TracedEvent, letters: Sequence[DeadLetterView], topic: str) -> DeadLetterView | None:
    source = (topic, str(event.partition), str(event.offset))
    return next((letter for letter in letters if source_of(letter.meta) == source), None)


def _failed_again(letter: DeadLetterView, letters: Sequence[DeadLetterView]) -> Iterator[DeadLetterView]:
    """The dead letters a replay of `letter` became, in turn (``failed-again@P:O``)."""
    by_where = {other.where: other for other in letters}
    seen = {letter.where}
    while letter.state.startswith("failed-again@"):
        again = by_where.get(letter.state.removeprefix("failed-again@"))
        if again is None or again.where in seen:
            return
        seen.add(again.where)
        yield again
        letter = again
