"""``orderbus reconcile --resend``: send the orders a system lost to it again, as creates, through its replay topic.

`daemon.reconcile` finds them: orders delivered to the system that it now answers 404 or 410 for, without orderbus
having cancelled them there (a restore from last night's backup, a migration that dropped some). A replay of their
events would not bring them back: the sink finds each delivered already (its delivery states), and an update
addresses an object that is gone. So each is sent once more as a new event:

- its state is the order's newest event on the orders topic (found in its key's partition, as `orderbus trace`
  finds it), which is the newest state the system had been sent, or a newer one still on its way;
- it is an ``order.created`` of that state, ``source: "resend"``, with a header ``orderbus.resend-of`` naming the
  event it was made of; its event id is derived from the sink, that event, and the id and time of the delivery
  the system lost (`resend_event`), so a run repeated before the daemon has delivered it makes the same event
  (skipped as delivered), and a loss of the resent order later makes a new one;
- it goes to ``orders.replay.<sink>``, which only that sink reads, keyed by the order number, to the instance that
  holds the order's state (`consumers.assignment`): the running daemon delivers it as any create, with a new
  idempotency key (the system may remember the lost one), retries, dead letters and all, and keeps the id the
  system gives it, which the order's later updates address.

Nothing is resent for an order without a valid event on the topic any more (older than its retention: the shop must
send it again), whose newest event is its cancel, or that a dead letter blocks (replay those first: the resend
would follow them to the dead letters).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumers.dedup_sql import SELECT_BLOCKING, check_layout, select_blocked
from consumers.sqlite_files import read_only
from consumers.unreadable import describe, passes_through
from consumers.work import key_problem
from daemon.dlq import order_number_in
from daemon.kafka_options import client_options
from daemon.reconcile import Delivered
from daemon.retention import dedup_path
from daemon.settings import Settings
from daemon.topic_reader import batches, reading
from daemon.trace import key_partition
from topics.admin import partition_ids
from topics.catalogue import orders_topic, replay_topic
from topics.codec import decode, encode
from topics.envelope import SCHEMA_VERSION, OrderEvent
from topics.errors import BrokerError, ContractError

# Resent events' ids: uuid5 in this namespace of the sink, the event resent, and the lost delivery (`resend_event`).
RESEND_NAMESPACE: Final = uuid.UUID("0b6a4f0e-5d2c-4c1e-9f3a-7e2d8c9b1a64")
RESEND_OF: Final = "orderbus.resend-of"
SOURCE: Final = "resend"
CANCELLED: Final = "order.cancelled"


@dataclass(frozen=True, slots=True)
class Resent:
    """What became of one lost order: `event` resent (made of `of`), or why not (`skipped`)."""

    order: Delivered
    event: OrderEvent | None = None
    of: OrderEvent | None = None
    skipped: str = ""

    @property
    def line(self) -> str:
        """The order as the command reports it: what was sent, or why nothing was."""
        if self.event is None or self.of is None:
            return f"{self.order.order_number}: {self.skipped}"
        return f"{self.order.order_number}: event {self.event.event_id}, of {self.of.event_type} {self.of.event_id}"


def resend_event(sink: str, newest: OrderEvent, lost: Delivered) -> OrderEvent:
    """`newest` as a create of its order for `sink`, its event id derived from what was lost (module docstring)."""
    name = f"{sink}\n{newest.event_id}\n{lost.downstream_id or ''}\n{lost.at!r}"
    return OrderEvent.model_construct(
        schema_version=SCHEMA_VERSION,
        event_id=uuid.uuid5(RESEND_NAMESPACE, name),
        event_type="order.created",
        occurred_at=newest.occurred_at,
        source=SOURCE,
        order=newest.order,
    )


def newest_events(records: Sequence[Any], wanted: set[str]) -> dict[str, OrderEvent]:
    """The newest valid event of each order of `wanted` among `records` (one partition's, in their order): keyed by
    the order number, or keyless and naming it in the value, as the sinks read them (`consumers.work`)."""
    newest: dict[str, OrderEvent] = {}
    for record in records:
        number = record.key.decode("utf-8", "replace") if record.key else order_number_in(record.value)
        if number not in wanted:
            continue
        try:
            event = decode(record.value)
        except ContractError:
            continue  # the sinks dead-letter it as invalid: not a state the system was sent
        if event.order.order_number == number and key_problem(record.key, number) is None:
            newest[number] = event
    return newest


async def find_newest(settings: Settings, orders: Sequence[str]) -> dict[str, OrderEvent]:
    """The newest valid event of each of `orders` on the orders topic, each partition read once up to its end now
    (`BrokerError` if the topic is missing, or a batch cannot be decoded: what it held is not known)."""
    topic = orders_topic(settings.topics.prefix)
    options = client_options(settings.kafka)
    ids = await partition_ids(topic, options)
    if not ids:
        raise BrokerError(f"topic {topic} does not exist; run `orderbus topics apply`")
    by_partition: dict[int, set[str]] = defaultdict(set)
    for order in orders:
        by_partition[key_partition(order, len(ids))].add(order)
    found: dict[str, OrderEvent] = {}
    async with reading(topic, options, sorted(by_partition)) as (consumer, tps):
        starts, ends = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        try:
            async for partition, records in batches(consumer, starts, ends):
                found.update(newest_events(records, by_partition[partition]))
        except Exception as exc:
            if passes_through(exc):
                raise
            raise BrokerError(f"cannot read {topic}: {describe(exc)}; nothing was resent") from exc
    return found


def blocked_orders(settings: Settings, sink: str, orders: Sequence[str]) -> set[str]:
    """Those of `orders` a dead letter blocks in this host's delivery-state file of `sink`."""
    with read_only(dedup_path(settings.state_dir, sink)) as db:
        check_layout(db)
        return {str(ref) for ref, _ in select_blocked(db, SELECT_BLOCKING, list(orders))}


def plan(sink: str, lost: Sequence[Delivered], newest: Mapping[str, OrderEvent], blocked: set[str]) -> list[Resent]:
    """For each lost order, the event to resend, or why none."""
    planned = []
    for order in lost:
        event = newest.get(order.order_number)
        if order.order_number in blocked:
            replay = f"orderbus dlq replay --sink {sink} --order {order.order_number}"
            why = f"blocked by its dead letters: replay them first ({replay})"
            planned.append(Resent(order, skipped=why))
        elif event is None:
            why = "no valid event of it on the orders topic any more (older than its retention): the shop must send it"
            planned.append(Resent(order, skipped=why))
        elif event.event_type == CANCELLED:
            planned.append(Resent(order, skipped=f"its newest event is its cancel ({event.event_id}): nothing to send"))
        else:
            planned.append(Resent(order, resend_event(sink, event, order), of=event))
    return planned


async def resend(settings: Settings, sink: str, lost: Sequence[Delivered]) -> list[Resent]:
    """Resend `lost` (the orders reconcile found missing) to `sink`'s replay topic, acks=all."""
    numbers = [order.order_number for order in lost]
    planned = plan(sink, lost, await find_newest(settings, numbers), blocked_orders(settings, sink, numbers))
    topic = replay_topic(sink, settings.topics.prefix)
    producer = AIOKafkaProducer(**client_options(settings.kafka), acks="all", enable_idempotence=True)
    sent = 0
    try:
        await producer.start()
        for item in planned:
            if item.event is None or item.of is None:
                continue
            record = encode(item.event)
            headers = [*record.headers, (RESEND_OF, str(item.of.event_id).encode("ascii"))]
            await producer.send_and_wait(topic, value=record.value, key=record.key, headers=headers)
            sent += 1
    except KafkaError as exc:
        raise BrokerError(f"resend to {topic} failed after {sent} order(s) sent: {exc!r}") from exc
    finally:
        await producer.stop()
    return planned


__all__ = ["RESEND_OF", "Resent", "blocked_orders", "find_newest", "newest_events", "plan", "resend", "resend_event"]
