"""Dead letters for operators: list them per sink with their reason and HTTP exchange, and replay a selection.

A replay sends the dead-letter records, unchanged (key, value, and headers with their ``orderbus.dlq.*``
history), to ``orders.replay.<sink>``: only that sink reads it. The event keeps its event id, so the downstream
sees the same ``Idempotency-Key`` as on the first attempts, and a record that was meanwhile delivered is
skipped. Replay in the dead letters' order: one order's records then reach the sink in their original order.

A sink killed between the broker's ack of a dead letter and recording the record as dead writes it again when
the record is redelivered; both copies name the same consumed record, and the list and the replay show it once.

Each dead letter has a state, read from the replay topic and the sink's committed offsets there: ``open`` (never
replayed), ``replay-pending`` (replayed, the sink has not read it yet), ``replayed`` (the sink read it and did not
dead-letter it again: delivered, or found delivered before), or ``failed-again@P:O`` (dead-lettered again, at
P:O in the dead-letter topic: that one is open). A replay by reason, order or ``--all`` takes open ones only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from consumers.deadletter import REASONS, Header, copy_headers, read_headers
from daemon.kafka_options import client_options
from daemon.settings import Settings
from daemon.topic_reader import whole
from topics.admin import group_offsets, partition_ids
from topics.catalogue import SINKS, consumer_group, dlq_topic, replay_topic
from topics.errors import BrokerError, ConfigError, OrderbusError


class SelectionError(OrderbusError):
    """A replay named a dead letter that is not there, or its selection matched none: nothing was replayed."""


def parse_position(text: str) -> str:
    """``PARTITION:OFFSET`` as `DeadLetterView.where` writes it (``"01:7"`` becomes ``"1:7"``); a `ValueError`
    names the format."""
    partition, sep, offset = text.partition(":")
    if not (sep and _number(partition) and _number(offset)):
        raise ValueError(f"{text!r} is not PARTITION:OFFSET: two numbers, such as 0:17, as `dlq list` prints them")
    return f"{int(partition)}:{int(offset)}"


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def order_number_in(value: bytes | None) -> str | None:
    """The order number an event's JSON value names; None if it is not JSON, not an object or not the contract's
    shape (read leniently: the record may be what made it a dead letter)."""
    try:
        number = json.loads(value or b"")["order"]["order_number"]
    except (ValueError, TypeError, KeyError):
        return None
    return number if isinstance(number, str) and number else None


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """One dead-letter record as an operator sees it; `meta` holds the ``orderbus.dlq.*`` headers."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[Header]
    meta: dict[str, str]
    state: str = "open"  # see the module's docstring
    # The order number of the event in the value, else the record's key: a record sent without a key, or with
    # another, is found by its order (``--order``) all the same. Read once: `line` and a selection both ask.
    order: str = field(init=False)

    def __post_init__(self) -> None:
        number = order_number_in(self.value) or (self.key or b"").decode("utf-8", "replace") or "-"
        object.__setattr__(self, "order", number)

    @property
    def where(self) -> str:
        return f"{self.partition}:{self.offset}"

    def line(self) -> str:
        """One line without personal data: position, order number, reason, rule, status, attempts, time."""
        meta = self.meta
        at = datetime.fromtimestamp(self.timestamp_ms / 1000, UTC).isoformat(timespec="seconds")
        return (
            f"{self.where:>8} {at} order={self.order} reason={meta.get('reason', '?')} rule={meta.get('rule', '?')} "
            f"status={meta.get('http-status', '-')} attempts={meta.get('attempts', '0')} state={self.state}"
        )

    def details(self) -> str:
        """Everything about it, including the downstream's answer (which may quote the order's data)."""
        lines = [self.line(), f"  idempotency key: {self.meta.get('idempotency-key', '-')}"]
        lines.append(
            f"  consumed from:   {self.meta.get('topic', '?')} partition {self.meta.get('partition', '?')} "
            f"offset {self.meta.get('offset', '?')}"
        )
        for name in ("first-attempt-at", "last-attempt-at"):
            if name in self.meta:
                stamp = datetime.fromtimestamp(float(self.meta[name]), UTC).isoformat(timespec="milliseconds")
                lines.append(f"  {name + ':':<16} {stamp}")
        if self.meta.get("detail"):
            lines.append(f"  detail:          {self.meta['detail']}")
        if self.meta.get("body-excerpt"):
            lines.append(f"  response body:   {self.meta['body-excerpt']}")
        if self.meta.get("history"):
            lines.append(f"  history:         {self.meta['history']}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters to act on; an empty selection selects nothing (replaying all needs `everything`)."""

    positions: tuple[str, ...] = ()
    reason: str | None = None
    order: str | None = None
    everything: bool = False
    again: bool = False  # also those replayed before (a position named is taken whatever its state)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "positions", tuple(parse_position(position) for position in self.positions))
        except ValueError as exc:
            raise ConfigError(f"--position: {exc}") from None
        if self.reason is not None and self.reason not in REASONS:
            raise ConfigError(f"--reason: unknown reason {self.reason!r}; the reasons are {', '.join(REASONS)}")

    def empty(self) -> bool:
        return not (self.positions or self.reason or self.order or self.everything)

    def describe(self) -> str:
        """The selection as the options that made it: ``--position 0:17 --reason rejected``."""
        parts = [f"--position {position}" for position in self.positions]
        parts += [f"--{name} {value}" for name, value in (("reason", self.reason), ("order", self.order)) if value]
        described = " ".join(parts) or ("--all" if self.everything else "nothing")
        if not (self.positions or self.again):
            described += " among the open ones (--again: those replayed before too)"
        return described

    def matches(self, letter: DeadLetterView) -> bool:
        if self.positions and letter.where not in self.positions:
            return False
        if not (self.positions or self.again) and letter.state != "open":
            return False
        if self.reason is not None and letter.meta.get("reason") != self.reason:
            return False
        return self.order is None or letter.order == self.order


def check_sink(sink: str) -> str:
    if sink not in SINKS:
        raise ConfigError(f"--sink: unknown sink {sink!r}; the sinks are {', '.join(SINKS)}")
    return sink


async def read_dead_letters(settings: Settings, sink: str) -> list[DeadLetterView]:
    """Every record of ``orders.dlq.<sink>``, oldest first per partition, ordered by time across partitions, each
    with its replay state."""
    return (await read_with_replays(settings, sink))[0]


async def replay_records(settings: Settings, sink: str) -> list[tuple[int, Any]]:
    """Every record of the sink's replay topic up to its end now, with its partition."""
    return await _records(replay_topic(check_sink(sink), settings.topics.prefix), client_options(settings.kafka))


async def read_with_replays(settings: Settings, sink: str) -> tuple[list[DeadLetterView], list[tuple[int, Any]]]:
    """`read_dead_letters`, and the records of the sink's replay topic it read for their states (with their
    partitions): replayed dead letters, and the creates `orderbus reconcile --resend` sent (`daemon.resend`)."""
    sink = check_sink(sink)
    prefix = settings.topics.prefix
    options = client_options(settings.kafka)
    replays = replay_topic(sink, prefix)
    # In this order: a replay the sink has committed past was dead-lettered again, if at all, before that commit,
    # so the dead-letter topic read last holds it (read first, a `failed-again` could show as `replayed`).
    done = await committed_offsets(consumer_group(sink, prefix), replays, options)
    replayed = await replay_records(settings, sink)
    sent = [
        Replay(partition, record.offset, source_of(read_headers(copy_headers(record.headers))))
        for partition, record in replayed
    ]
    letters = [_view(partition, record) for partition, record in await _records(dlq_topic(sink, prefix), options)]
    letters.sort(key=lambda letter: (letter.timestamp_ms, letter.partition, letter.offset))
    return with_states(distinct(letters), replays, sent, done), replayed


async def _records(topic: str, options: Mapping[str, Any]) -> list[tuple[int, Any]]:
    """Every record of `topic` up to its end now, with its partition."""
    return [(partition, record) async for partition, records in whole(topic, options) for record in records]


async def committed_offsets(
    group: str, topic: str, options: Mapping[str, Any], partitions: Sequence[int] | None = None
) -> dict[int, int]:
    """`group`'s committed offsets on `topic`'s `partitions` (default: all), by partition (absent: nothing committed
    there).

    Asked again for `_OFFSETS_PATIENCE` seconds while the broker does not tell them (`topics.admin.group_offsets`),
    never taken as nothing committed (every replay would show as pending)."""
    ids = partitions if partitions is not None else await partition_ids(topic, options)
    tps = [TopicPartition(topic, p) for p in ids]
    admin = AIOKafkaAdminClient(**options)
    deadline = time.monotonic() + _OFFSETS_PATIENCE
    try:
        await admin.start()
        while (offsets := await group_offsets(admin, group, tps)) is None:
            if time.monotonic() > deadline:
                raise BrokerError(f"the broker did not tell the committed offsets of group {group}; try again")
            await asyncio.sleep(0.5)
    except KafkaError as exc:
        raise BrokerError(f"cannot read the committed offsets of group {group}: {exc!r}") from exc
    finally:
        await admin.close()
    return {tp.partition: offset for tp, offset in offsets.items() if offset >= 0}


_OFFSETS_PATIENCE = 10.0  # seconds a group's committed offsets are asked for while the broker does not tell them

Source = tuple[str, str, str]  # the record a dead letter was made of: topic, partition, offset (from its headers)


def source_of(meta: Mapping[str, str]) -> Source:
    """The record a dead letter (its ``orderbus.dlq.*`` headers) was made of."""
    return meta.get("topic", ""), meta.get("partition", ""), meta.get("offset", "")


@dataclass(frozen=True, slots=True)
class Replay:
    """A record of the replay topic: where it is, and which dead letter it is a copy of (`source`)."""

    partition: int
    offset: int
    source: Source


def with_states(
    letters: Sequence[DeadLetterView], replays: str, sent: Sequence[Replay], done: Mapping[int, int]
) -> list[DeadLetterView]:
    """`letters` with their states (the module's docstring): `sent` are the records of the replay topic `replays`,
    `done` the sink group's committed offsets there. A dead letter made of a replay record names it as its source.
    """
    last: dict[Source, Replay] = {}
    for copy in sent:  # a dead letter's replays share its order number, so its partition: the last is the latest
        if not all(copy.source):  # a record without our headers is no dead letter's copy
            continue
        if (earlier := last.get(copy.source)) is None or earlier.offset < copy.offset:
            last[copy.source] = copy
    again = {source_of(letter.meta): letter.where for letter in letters}
    stated = []
    for letter in letters:
        replay = last.get(source_of(letter.meta)) if all(source_of(letter.meta)) else None
        if replay is None:
            state = "open"
        elif (where := again.get((replays, str(replay.partition), str(replay.offset)))) is not None:
            state = f"failed-again@{where}"
        elif done.get(replay.partition, 0) > replay.offset:
            state = "replayed"
        else:
            state = "replay-pending"
        stated.append(dataclasses.replace(letter, state=state))
    return stated


def distinct(letters: Sequence[DeadLetterView]) -> list[DeadLetterView]:
    """Each dead-lettered record once: later copies naming the same consumed record (topic, partition, offset)
    are dropped; a record dead-lettered again after a replay was consumed from the replay topic, so it stays."""
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for letter in letters:
        source = (letter.meta.get("topic", ""), letter.meta.get("partition", ""), letter.meta.get("offset", ""))
        if all(source):
            if source in seen:
                continue
            seen.add(source)
        kept.append(letter)
    return kept


def _view(partition: int, record: Any) -> DeadLetterView:
    headers = list(copy_headers(record.headers))
    return DeadLetterView(
        partition, record.offset, record.timestamp, record.key, record.value, headers, read_headers(headers)
    )


async def replay(settings: Settings, sink: str, letters: Sequence[DeadLetterView]) -> int:
    """Send `letters` to the sink's replay topic in the given order, acks=all; returns how many were sent."""
    topic = replay_topic(check_sink(sink), settings.topics.prefix)
    producer = AIOKafkaProducer(**client_options(settings.kafka), acks="all", enable_idempotence=True)
    try:
        await producer.start()
        for letter in letters:
            await producer.send_and_wait(topic, value=letter.value, key=letter.key, headers=letter.headers)
    except KafkaError as exc:
        raise BrokerError(f"replay to {topic} failed: {exc!r}; records sent before the failure stay sent") from exc
    finally:
        await producer.stop()
    return len(letters)


async def replay_selected(settings: Settings, sink: str, selection: Selection) -> list[DeadLetterView]:
    """Replay the dead letters `selection` matches. A `SelectionError`, before anything is sent, when a position
    it names holds no dead letter of the sink, or when it matches none."""
    if selection.empty():
        raise ConfigError("say which dead letters to replay: --position P:O, --reason R, --order N or --all")
    chosen = choose(await read_dead_letters(settings, sink), sink, selection)
    await replay(settings, sink, chosen)
    return chosen


def choose(letters: Sequence[DeadLetterView], sink: str, selection: Selection) -> list[DeadLetterView]:
    """The `letters` `selection` matches, in their order; a `SelectionError` if a position it names is not among
    them or if it matches none."""
    there = {letter.where for letter in letters}
    missing = [position for position in selection.positions if position not in there]
    if missing:
        raise SelectionError(
            f"no dead letter at {', '.join(missing)} in sink {sink} (see `orderbus dlq list --sink {sink}`); "
            "nothing was replayed"
        )
    chosen = [letter for letter in letters if selection.matches(letter)]
    if not chosen:
        raise SelectionError(f"no dead letter of sink {sink} matches {selection.describe()}; nothing was replayed")
    return chosen
