"""Dead letters for operators: list them per sink with their reason and HTTP exchange, and replay a selection.

A replay sends the dead-letter records, unchanged (key, value, and headers with their ``orderbus.dlq.*``
history), to ``orders.replay.<sink>``: only that sink reads it. The event keeps its event id, so the downstream
sees the same ``Idempotency-Key`` as on the first attempts, and a record that was meanwhile delivered is
skipped. Replay in the dead letters' order: one order's records then reach the sink in their original order.

A sink killed between the broker's ack of a dead letter and recording the record as dead writes it again when
the record is redelivered; both copies name the same consumed record, and the list and the replay show it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from consumers.deadletter import read_headers
from daemon.kafka_options import client_options
from daemon.settings import Settings
from topics.admin import partition_ids
from topics.catalogue import SINKS, dlq_topic, replay_topic
from topics.errors import BrokerError, ConfigError


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """One dead-letter record as an operator sees it; `meta` holds the ``orderbus.dlq.*`` headers."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    meta: dict[str, str]

    @property
    def where(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def order(self) -> str:
        return (self.key or b"").decode("utf-8", "replace") or "-"

    def line(self) -> str:
        """One line without personal data: position, order number, reason, rule, status, attempts, time."""
        meta = self.meta
        at = datetime.fromtimestamp(self.timestamp_ms / 1000, UTC).isoformat(timespec="seconds")
        return (
            f"{self.where:>8} {at} order={self.order} reason={meta.get('reason', '?')} rule={meta.get('rule', '?')} "
            f"status={meta.get('http-status', '-')} attempts={meta.get('attempts', '0')}"
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

    def empty(self) -> bool:
        return not (self.positions or self.reason or self.order or self.everything)

    def matches(self, letter: DeadLetterView) -> bool:
        if self.positions and letter.where not in self.positions:
            return False
        if self.reason is not None and letter.meta.get("reason") != self.reason:
            return False
        return self.order is None or letter.order == self.order


def check_sink(sink: str) -> str:
    if sink not in SINKS:
        raise ConfigError(f"--sink: unknown sink {sink!r}; the sinks are {', '.join(SINKS)}")
    return sink


async def read_dead_letters(settings: Settings, sink: str) -> list[DeadLetterView]:
    """Every record of ``orders.dlq.<sink>``, oldest first per partition, ordered by time across partitions."""
    topic = dlq_topic(check_sink(sink), settings.topics.prefix)
    options = client_options(settings.kafka)
    partitions = [TopicPartition(topic, p) for p in await partition_ids(topic, options)]
    if not partitions:
        raise BrokerError(f"topic {topic} does not exist; run `orderbus topics apply`")
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False, group_id=None)
    letters: list[DeadLetterView] = []
    try:
        await consumer.start()
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, records in batch.items():
                letters.extend(_view(tp.partition, record) for record in records if record.offset < ends[tp])
    except KafkaError as exc:
        raise BrokerError(f"cannot read {topic}: {exc!r}") from exc
    finally:
        await consumer.stop()
    letters.sort(key=lambda letter: (letter.timestamp_ms, letter.partition, letter.offset))
    return distinct(letters)


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
    headers = [(str(k), bytes(v or b"")) for k, v in (record.headers or ())]
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
    if selection.empty():
        raise ConfigError("say which dead letters to replay: --position P:O, --reason R, --order N or --all")
    chosen = [letter for letter in await read_dead_letters(settings, sink) if selection.matches(letter)]
    await replay(settings, sink, chosen)
    return chosen
