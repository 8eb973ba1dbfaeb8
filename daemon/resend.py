"""``orderbus reconcile --resend``: send the orders a system lost to it again, as creates, through its replay topic.

`daemon.reconcile` finds them: orders delivered to the system that it now answers 404 or 410 for, without orderbus
having cancelled them there (a restore from last night's backup, a migration that dropped some). A replay of their
events would not bring them back: the sink finds each delivered already (its delivery states), and an update
addresses an object that is gone. So each is sent once more as a new event:

- its state is the order's newest event on the orders topic (committed records in its key's partition, as the sinks
  read them and `orderbus trace` finds them), which is the newest state the system had been sent, or a newer one
  still on its way;
- it is an ``order.created`` of that state, ``source: "resend"``, with a header ``orderbus.resend-of`` naming the
  event it was made of (`consumers.work.RESEND_OF`); its event id is derived from the sink, the order and the
  delivery the system lost (its downstream id and time), so a run repeated before the daemon has delivered it makes
  the same event (skipped as delivered), and a loss of the resent order later makes a new one;
- an order the replay topic holds a resend of since the delivery it lost is not sent again: that resend is on its
  way, or was delivered by the instance that holds the order's partition now (this host's file lists the order
  from before the partition moved, with the id it knew then), where a second create would be a second object;
- it goes to ``orders.replay.<sink>``, which only that sink reads, keyed by the order number, to the instance that
  holds the order's state (`consumers.assignment`): the running daemon delivers it as any create, with a new
  idempotency key (the system may remember the lost one), retries, dead letters and all, and keeps the id the
  system gives it, which the order's later updates address.

An order that dead letters block (its updates met the 404 of the lost object) is resent all the same: the resent
create goes ahead of them (`consumers.blocks`), and the operator then replays them, which now address the new
object. Not resent: an order without a valid event on the topic any more (older than its retention: the shop must
send it again), one whose newest event is its cancel, and one resent since the delivery it lost (above).
Nothing is resent while the replay topic's partition count is not the orders topic's (`orderbus topics apply`).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumers.dedup_sql import SELECT_BLOCKING, check_layout, select_blocked
from consumers.sqlite_files import read_only
from consumers.unreadable import describe, passes_through
from consumers.work import RESEND_OF, key_problem
from daemon.dlq import replay_records
from daemon.kafka_options import client_options
from daemon.reconcile import CANCELLED, Delivered
from daemon.retention import dedup_path
from daemon.settings import Settings
from daemon.topic_reader import whole
from daemon.trace import key_partition, record_order, resends
from topics.admin import partition_counts
from topics.catalogue import orders_topic, replay_topic
from topics.codec import decode, encode
from topics.envelope import SCHEMA_VERSION, OrderEvent
from topics.errors import BrokerError, ContractError, OrderbusError, StoreError

# Resent events' ids: uuid5 in this namespace of the sink, the order and the lost delivery (`resend_event`).
RESEND_NAMESPACE: Final = uuid.UUID("0b6a4f0e-5d2c-4c1e-9f3a-7e2d8c9b1a64")
SOURCE: Final = "resend"


@dataclass(frozen=True, slots=True)
class Resent:
    """What became of one lost order: `event` resent (made of `of`; `then`: what the operator does next), or why
    nothing was (`skipped`)."""

    order: Delivered
    event: OrderEvent | None = None
    of: OrderEvent | None = None
    skipped: str = ""
    then: str = ""

    @property
    def line(self) -> str:
        """The order as the command reports it: what was sent, or why nothing was."""
        if self.event is None or self.of is None:
            return f"{self.order.order_number}: {self.skipped}"
        sent = f"{self.order.order_number}: event {self.event.event_id}, of {self.of.event_type} {self.of.event_id}"
        return f"{sent}; {self.then}" if self.then else sent


def resend_event(sink: str, newest: OrderEvent, lost: Delivered) -> OrderEvent:
    """`newest` as a create of its order for `sink`, its event id derived from what was lost (module docstring)."""
    name = f"{sink}\n{lost.order_number}\n{lost.downstream_id or ''}\n{lost.at!r}"
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
        if (number := record_order(record)) not in wanted or number is None:
            continue
        try:
            event = decode(record.value)
        except ContractError:
            continue  # the sinks dead-letter it as invalid: not a state the system was sent
        if event.order.order_number == number and key_problem(record.key, number) is None:
            newest[number] = event
    return newest


def resends_in(replayed: Sequence[tuple[int, Any]], wanted: set[str]) -> dict[str, int]:
    """The newest resent create's time (ms) of each of `wanted` among a replay topic's records (with partitions)."""
    return {
        number: max(resend.timestamp_ms for resend in found)
        for number, found in resends(replayed).items()
        if number in wanted
    }


def by_partition(orders: Sequence[str], partitions: int) -> dict[int, set[str]]:
    """`orders` by the partition their key goes to."""
    grouped: dict[int, set[str]] = defaultdict(set)
    for order in orders:
        grouped[key_partition(order, partitions)].add(order)
    return grouped


async def find_newest(settings: Settings, orders: Sequence[str], partitions: int) -> dict[str, OrderEvent]:
    """The newest valid event of each of `orders` on the orders topic (`partitions` of it), each partition read
    once up to its end now (`BrokerError` if a batch cannot be decoded: what it held is not known)."""
    topic = orders_topic(settings.topics.prefix)
    wanted = by_partition(orders, partitions)
    found: dict[str, OrderEvent] = {}
    try:
        async for partition, records in whole(topic, client_options(settings.kafka), sorted(wanted), committed=True):
            found.update(newest_events(records, wanted[partition]))
    except Exception as exc:
        if passes_through(exc):
            raise
        raise BrokerError(f"cannot read {topic}: {describe(exc)}; nothing was resent") from exc
    return found


async def earlier_resends(settings: Settings, sink: str, orders: Sequence[str]) -> dict[str, int]:
    """The newest resend's time (ms) of each of `orders` that the sink's replay topic holds, read or not."""
    return resends_in(await replay_records(settings, sink), set(orders))


def blocked_orders(settings: Settings, sink: str, orders: Sequence[str]) -> set[str]:
    """Those of `orders` a dead letter blocks in this host's delivery-state file of `sink`."""
    path = dedup_path(settings.state_dir, sink)
    try:
        with read_only(path) as db:
            check_layout(db)
            return {str(ref) for ref, _ in select_blocked(db, SELECT_BLOCKING, list(orders))}
    except (StoreError, sqlite3.Error, OSError) as exc:
        raise OrderbusError(f"cannot read {path}: {exc}; nothing was resent") from None


def plan(
    sink: str,
    lost: Sequence[Delivered],
    newest: Mapping[str, OrderEvent],
    blocked: set[str],
    resent: Mapping[str, int],
) -> list[Resent]:
    """For each lost order, the event to resend, or why none. `resent`: the newest resend's time (ms) of orders the
    replay topic holds one of; one at or after the lost delivery is on its way, or this host's file is older than
    it (the order's partition moved, and the instance that holds it now has the resend's delivery)."""
    planned = []
    for order in lost:
        number = order.order_number
        event = newest.get(number)
        if (at := resent.get(number)) is not None and at >= order.at * 1000:
            when = datetime.fromtimestamp(at / 1000, UTC).isoformat(timespec="seconds")
            skipped = f"resent at {when}, after the delivery it lost: see orderbus trace {number}"
            planned.append(Resent(order, skipped=skipped))
        elif event is None:
            skipped = (
                "no valid event of it on the orders topic any more (older than its retention): the shop must send it"
            )
            planned.append(Resent(order, skipped=skipped))
        elif event.event_type == CANCELLED:
            planned.append(Resent(order, skipped=f"its newest event is its cancel ({event.event_id}): nothing to send"))
        else:
            then = ""
            if number in blocked:
                replay = f"orderbus dlq replay --sink {sink} --order {number}"
                then = f"then replay its dead letters, which now address the resent order: {replay}"
            planned.append(Resent(order, resend_event(sink, event, order), of=event, then=then))
    return planned


async def resend(settings: Settings, sink: str, lost: Sequence[Delivered]) -> list[Resent]:
    """Resend `lost` (the orders reconcile found missing) to `sink`'s replay topic, acks=all."""
    orders, replays = orders_topic(settings.topics.prefix), replay_topic(sink, settings.topics.prefix)
    options = client_options(settings.kafka)
    counts = await partition_counts([orders, replays], options, timeout=settings.kafka.request_timeout)
    if counts.get(orders) is None or counts.get(orders) != counts.get(replays):
        raise BrokerError(
            f"{replays} has {counts.get(replays, 'no')} partitions, {orders} {counts.get(orders, 'none')}: a "
            "resend could reach an instance that does not hold the order; run `orderbus topics apply` first; "
            "nothing was resent"
        )
    numbers = [order.order_number for order in lost]
    newest = await find_newest(settings, numbers, counts[orders])
    resent = await earlier_resends(settings, sink, numbers)
    planned = plan(sink, lost, newest, blocked_orders(settings, sink, numbers), resent)
    producer = AIOKafkaProducer(**options, acks="all", enable_idempotence=True)
    sent = 0
    try:
        await producer.start()
        for item in planned:
            if item.event is None or item.of is None:
                continue
            record = encode(item.event)
            headers = [*record.headers, (RESEND_OF, str(item.of.event_id).encode("ascii"))]
            await producer.send_and_wait(replays, value=record.value, key=record.key, headers=headers)
            sent += 1
    except KafkaError as exc:
        raise BrokerError(f"resend to {replays} failed after {sent} order(s) sent: {exc!r}") from exc
    finally:
        await producer.stop()
    return planned


__all__ = [
    "SOURCE",
    "Resent",
    "blocked_orders",
    "earlier_resends",
    "find_newest",
    "newest_events",
    "plan",
    "resend",
    "resend_event",
    "resends_in",
]
