"""`reconcile --resend`'s choices: which event an order is resent from, its new event's id, and what is not resent."""

from __future__ import annotations

import random
from dataclasses import dataclass

from daemon.reconcile import Delivered
from daemon.resend import newest_events, plan, resend_event
from topics.codec import encode
from topics.envelope import OrderEvent
from topics.samples import sample_event


@dataclass(frozen=True)
class Record:
    """What `newest_events` reads of aiokafka's ConsumerRecord."""

    key: bytes | None
    value: bytes | None


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
    assert resend_event("accounting", newest, LOST).event_id == resent.event_id  # a run repeated: the same event
    lost_again = Delivered("SO-1", "accounting-19", 1_764_100_000.5)  # the resent one, lost later
    assert (
        len(
            {
                resent.event_id,
                resend_event("accounting", newest, lost_again).event_id,
                resend_event("crm", newest, LOST).event_id,
                resend_event("accounting", event("SO-1", 3, "order.updated"), LOST).event_id,
            }
        )
        == 4
    )
    OrderEvent.model_validate_json(encode(resent).value)  # a valid event for the sinks


def test_what_is_not_resent_and_why() -> None:
    lost = [
        LOST,
        Delivered("SO-2", None, 1.0),
        Delivered("SO-3", "accounting-3", 2.0),
        Delivered("SO-4", "accounting-4", 3.0),
    ]
    newest = {
        "SO-1": event("SO-1", 1),
        "SO-3": event("SO-3", 3, "order.cancelled"),
        "SO-4": event("SO-4", 4),
    }
    planned = plan("accounting", lost, newest, blocked={"SO-4"})
    assert [item.event is not None for item in planned] == [True, False, False, False]
    assert planned[0].of == newest["SO-1"]
    assert planned[0].line == f"SO-1: event {planned[0].event.event_id}, of order.created {newest['SO-1'].event_id}"  # type: ignore[union-attr]
    assert planned[1].line.startswith("SO-2: no valid event of it on the orders topic any more")
    assert planned[2].line == f"SO-3: its newest event is its cancel ({newest['SO-3'].event_id}): nothing to send"
    assert planned[3].line == (
        "SO-4: blocked by its dead letters: replay them first (orderbus dlq replay --sink accounting --order SO-4)"
    )
