"""`reconcile --resend`'s choices: which event an order is resent from, its new event's id, and what is not resent."""

from __future__ import annotations

import random
from dataclasses import dataclass

from consumers.work import RESEND_OF
from daemon.reconcile import Delivered
from daemon.resend import newest_events, plan, resend_event, resends_in
from topics.codec import encode
from topics.envelope import OrderEvent
from topics.samples import sample_event


@dataclass(frozen=True)
class Record:
    """What `newest_events` and `resends_in` read of aiokafka's ConsumerRecord."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: int = 0
    offset: int = 0


def event(number: str, seed: int, event_type: str = "order.created") -> OrderEvent:
    made = sample_event(random.Random(seed), order_number=number)
    return made.model_copy(update={"event_type": event_type})


def record(made: OrderEvent, key: bytes | None = b"") -> Record:
    encoded = encode(made)
    return Record(encoded.key if key == b"" else key, encoded.value)


LOST = Delivered("SO-1", "accounting-7", 1_764_000_000.25)


def test_the_newest_valid_event_of_each_wanted_order() -> None:
    created, updated, newest = event("SO-1", 1), event("SO-1", 2, "order.updated"), event("SO-1", 3, "order.updated")
    other = event("SO-2", 4)
    records = [
        record(created),
        record(other),
        record(updated),
        Record(b"SO-1", b'{"order": {"order_number": "SO-1"}}'),  # breaks the contract: the sinks dead-letter it
        record(newest, key=None),  # keyless, named by its value: the sinks read it as the order's
        Record(b"SO-1", encode(event("SO-3", 5)).value),  # keyed SO-1, another order's value: invalid to the sinks
    ]
    assert newest_events(records, {"SO-1"}) == {"SO-1": newest}
    assert newest_events(records, {"SO-2", "SO-9"}) == {"SO-2": other}
    assert newest_events(records[3:4], {"SO-1"}) == {}


def test_a_resent_event_is_a_create_of_the_newest_state_with_an_id_of_what_was_lost() -> None:
    newest = event("SO-1", 2, "order.updated")
    resent = resend_event("accounting", newest, LOST)
    assert resent.event_type == "order.created"
    assert resent.source == "resend"
    assert resent.order == newest.order
    assert resent.occurred_at == newest.occurred_at
    assert resent.event_id != newest.event_id
    # A run repeated before the daemon delivered it, with a newer event on the topic meanwhile: the same event.
    assert resend_event("accounting", event("SO-1", 3, "order.updated"), LOST).event_id == resent.event_id
    lost_again = Delivered("SO-1", "accounting-19", 1_764_100_000.5)  # the resent one, lost later
    by_number = Delivered("SO-1", None, 1_764_100_000.5)  # a system addressed by number: the delivery's time tells
    ids = {
        resent.event_id,
        resend_event("accounting", newest, lost_again).event_id,
        resend_event("accounting", newest, by_number).event_id,
        resend_event("crm", newest, LOST).event_id,
    }
    assert len(ids) == 4
    OrderEvent.model_validate_json(encode(resent).value)  # a valid event for the sinks


def test_what_is_not_resent_and_why() -> None:
    lost = [
        LOST,
        Delivered("SO-2", None, 1.0),
        Delivered("SO-3", "accounting-3", 2.0),
        Delivered("SO-4", "accounting-4", 3.0),
        Delivered("SO-5", "accounting-5", 1_764_000_000.0),
        Delivered("SO-6", "accounting-6", 1_764_000_000.0),
    ]
    newest = {number: event(number, i) for i, number in enumerate(["SO-1", "SO-5", "SO-6"])}
    newest |= {"SO-3": event("SO-3", 3, "order.cancelled"), "SO-4": event("SO-4", 4, "order.updated")}
    # SO-5 was resent after the delivery this host's file knows of (on its way, or delivered by the instance that
    # holds the order now); SO-6's resend came before it: that one was delivered, and lost again since.
    resent = {"SO-5": 1_764_000_000_000, "SO-6": 1_763_999_999_999}
    planned = plan("accounting", lost, newest, blocked={"SO-4"}, resent=resent)
    assert [item.event is not None for item in planned] == [True, False, False, True, False, True]
    first, _, _, blocked, _, again = planned
    assert first.of == newest["SO-1"]
    assert first.event is not None
    assert first.line == f"SO-1: event {first.event.event_id}, of order.created {newest['SO-1'].event_id}"
    assert planned[1].line.startswith("SO-2: no valid event of it on the orders topic any more")
    assert planned[2].line == f"SO-3: its newest event is its cancel ({newest['SO-3'].event_id}): nothing to send"
    # Its updates met the lost object's 404: resent ahead of them, which are then replayed against the new one.
    assert blocked.line.endswith(
        "; then replay its dead letters, which now address the resent order: "
        "orderbus dlq replay --sink accounting --order SO-4"
    )
    assert planned[4].line == (
        "SO-5: resent at 2025-11-24T16:00:00+00:00, after the delivery it lost: see orderbus trace SO-5"
    )
    assert again.of == newest["SO-6"]


def test_the_newest_resend_of_each_order_is_found_in_the_replay_topic_by_its_header() -> None:
    resent = Record(b"SO-1", b"{}", ((RESEND_OF, b"x"),), timestamp=5)
    resent_again = Record(b"SO-1", b"{}", ((RESEND_OF, b"z"),), timestamp=9)
    replayed = Record(b"SO-2", b"{}", (("orderbus.dlq.reason", b"rejected"),), timestamp=7)
    keyless = Record(None, encode(event("SO-3", 3)).value, ((RESEND_OF, b"y"),), timestamp=3)
    records = [(0, resent_again), (1, resent), (0, replayed), (2, keyless)]
    assert resends_in(records, {"SO-1", "SO-2", "SO-3", "SO-4"}) == {"SO-1": 9, "SO-3": 3}
    assert resends_in(records, {"SO-2"}) == {}
