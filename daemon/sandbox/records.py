"""What the sandbox's control API answers with (ledger entries, request records), where it lives, and its error."""

from __future__ import annotations

from typing import Final, TypedDict

from topics.errors import OrderbusError

CONTROL: Final = "/_sandbox"


class SandboxError(OrderbusError):
    """The sandbox process did not start, or a control request was refused."""


class LedgerEntry(TypedDict):
    """One applied effect; ``at`` is epoch seconds from the sandbox's clock."""

    seq: int
    system: str
    method: str
    order_number: str
    id: str
    idempotency_key: str | None
    event_id: str | None
    at: float


class _RecordBase(TypedDict):
    seq: int
    system: str
    method: str
    path: str
    idempotency_key: str | None
    event_id: str | None
    order_number: str | None
    status: int | None
    outcome: str
    fault: str | None
    received_at: float
    answered_at: float | None


class RequestRecord(_RecordBase):
    """One request as received. ``outcome``: pending, answered, replayed, key_conflict, reset, client_gone."""

    headers: dict[str, str]  # without Authorization


class Logged(_RecordBase):
    headers: tuple[tuple[str, str], ...]  # a tuple, so that the collector can untrack the record (see `SystemState`)


__all__ = ["CONTROL", "LedgerEntry", "Logged", "RequestRecord", "SandboxError"]
