"""``orderbus webhook check``: the contract's verdict on a body, offline, before a shop sends it.

The team that sends orders otherwise learns what is wrong with a body from the ingest's 400 (or, producing to
Kafka directly, from a dead letter in each sink, which it does not see). This runs the same parsing the ingest
runs (`topics.codec.parse_submission`), or the one every sink runs on a record's value (`topics.codec.decode`),
and says either what is wrong, field by field in the words of the 400's ``errors``, or what the order amounts to.
It reads no settings and talks to nothing: a shop's CI can run it on its fixtures.
"""

from __future__ import annotations

from typing import Final

from daemon.settings import IngestSettings
from topics.codec import decode, parse_submission
from topics.envelope import OrderEvent, OrderSubmission
from topics.errors import ContractError
from topics.order import Order

MAX_BODY_BYTES: Final[int] = IngestSettings.model_fields["max_body_bytes"].default  # the ingest's default limit


def check(body: bytes, *, record: bool = False, max_body_bytes: int = MAX_BODY_BYTES) -> tuple[bool, list[str]]:
    """Whether `body` is a valid webhook body of at most `max_body_bytes` (`record`: a valid value of a record on
    the orders topic), and the lines that say why not, or what it holds and how to send it."""
    if not record and len(body) > max_body_bytes:
        return False, [
            f"invalid webhook body (the ingest answers 413): {len(body)} bytes, more than the {max_body_bytes} "
            "it takes (ingest.max_body_bytes)"
        ]
    try:
        parsed: OrderSubmission | OrderEvent = decode(body) if record else parse_submission(body)
    except ContractError as exc:
        count = len(exc.errors)
        what = (
            "record value (every sink dead-letters it as invalid)"
            if record
            else "webhook body (the ingest answers 400)"
        )
        head = f"invalid {what}: {count} {'problem' if count == 1 else 'problems'}"
        return False, [head, *(f"  {error.loc}: {error.message}" for error in exc.errors)]
    return True, _summary(parsed)


def _summary(parsed: OrderSubmission | OrderEvent) -> list[str]:
    order = parsed.order
    if isinstance(parsed, OrderEvent):
        lines = [
            f"valid record value: {parsed.event_type} of order {order.order_number}, event_id {parsed.event_id}, "
            f"source {parsed.source}",
            f"  key the record by the order number, {order.order_number!r}, with Kafka's murmur2 partitioner",
        ]
    else:
        own = f"event_id {parsed.event_id}" if parsed.event_id is not None else "event_id derived by the ingest"
        lines = [
            f"valid webhook body: {parsed.event_type} of order {order.order_number}, {own}",
            "  send it as it is: Content-Type: application/json, uncompressed, signed or with an Idempotency-Key",
        ]
        if parsed.event_id is None and parsed.occurred_at is None:
            lines.append("  without event_id or occurred_at, only that key makes a retry the same event: send one")
    return [*lines, *_amounts(order)]


def _amounts(order: Order) -> list[str]:
    discounted = sum(1 for line in order.line_items if line.discount_amount)
    items = f"{len(order.line_items)} {'line' if len(order.line_items) == 1 else 'lines'}"
    if discounted:
        items += f" ({discounted} discounted)"
    lines = [
        f"  {items}; net {order.net_total:f} + tax {order.tax_total:f} = gross {order.gross_total:f} {order.currency}"
    ]
    if (shipping := order.shipping) is not None:
        method = f" ({shipping.method})" if shipping.method is not None else ""
        lines.append(f"  shipping{method}: net {shipping.net_amount:f} + tax {shipping.tax_amount:f}, in the totals")
    return lines


__all__ = ["check"]
