"""The envelope around an order on the "orders" topic, and what a webhook body carries before it becomes one.

Why an envelope: sinks need to know *what happened* (created, updated, cancelled → POST, PUT, DELETE), *which
event* this is (the `event_id` every sink derives its idempotency key from, so a redelivered record is
recognised) and *which contract version* wrote it, without guessing from the order itself.

`OrderSubmission` is the shop's side: it may omit the event id and time, and never names the source; the
ingest fills those in with `to_event`, so every record on the topic is a complete `OrderEvent`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal
from uuid import UUID

from pydantic import ConfigDict, Field, StringConstraints

from topics.order import ContractModel, Order, Timestamp

EventType = Literal["order.created", "order.updated", "order.cancelled"]
SCHEMA_VERSION: Final = 1

SOURCE_PATTERN: Final = r"^[a-z][a-z0-9-]{0,31}$"
Source = Annotated[str, StringConstraints(pattern=SOURCE_PATTERN)]
"""Where the event entered orderbus, as a short slug: "webhook", "shop-eu"."""
_SOURCE: Final = re.compile(SOURCE_PATTERN)


class _Envelope(ContractModel):
    """The fields of an `OrderEvent` around its order: what `to_event` validates (the order is validated already)."""

    # A ValidationError names the event, as it would if the whole OrderEvent had been validated.
    model_config = ConfigDict(title="OrderEvent")

    schema_version: Annotated[Literal[1], Field(description="Contract version of this envelope.")]
    event_id: Annotated[UUID, Field(description="Unique per event; sinks derive idempotency keys from it.")]
    event_type: EventType
    occurred_at: Annotated[Timestamp, Field(description="When it happened at the source.")]
    source: Source


class OrderEvent(_Envelope):
    """One record value on the "orders" topic: an order plus what happened to it, when, and from where."""

    order: Order


class OrderSubmission(ContractModel):
    """A webhook body: the order and, optionally, the producer's own event id and time.

    A shop that retries a request with the same `event_id` produces the same event, which the sinks then
    recognise as a duplicate. Without one, the event id is derived from the request's idempotency key and body, or
    without a key from a body that carries `occurred_at`: the same request sent again is the same event. A body with
    neither a key nor a time is a new event each time.
    """

    event_type: EventType = "order.created"
    occurred_at: Timestamp | None = None
    event_id: UUID | None = None
    order: Order


def to_event(submission: OrderSubmission, *, event_id: UUID, source: str, now: datetime) -> OrderEvent:
    """Complete a submission into an event; the submission's own `event_id` and `occurred_at` win.

    `event_id` and `now` are the fallbacks (and injected, so tests are deterministic). A bad `source` or a
    naive `now` is the caller's bug and raises pydantic's `ValidationError`, not `ContractError`.

    Nothing is validated twice: the order, the event type and the producer's id and time are the submission's,
    validated when it was parsed and frozen since (validating an `OrderEvent` would run the order's consistency
    checks again: pydantic runs a model's after-validators on an instance too). What is left, the fallbacks and
    `source`, is checked here directly; only a bad one takes pydantic's way, for its error.
    """
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "event_id": submission.event_id or event_id,
        "event_type": submission.event_type,
        "occurred_at": submission.occurred_at or now,
        "source": source,
    }
    if not (type(fields["event_id"]) is UUID and _aware(fields["occurred_at"]) and _SOURCE.fullmatch(source)):
        fields = _Envelope.model_validate(fields).__dict__  # raises the ValidationError naming the field
    return OrderEvent.model_construct(**fields, order=submission.order)


def _aware(value: object) -> bool:
    return isinstance(value, datetime) and value.utcoffset() is not None


__all__ = ["SCHEMA_VERSION", "SOURCE_PATTERN", "EventType", "OrderEvent", "OrderSubmission", "Source", "to_event"]
