"""The order contract: models, envelope, Kafka record codec and ISO 4217 data. Imports nothing else of ours.

Import from here; `topics.schema` (JSON Schema files) and `topics.samples` (test data) are imported directly.

The names are loaded on first use (PEP 562), not when the package is: a module that needs only `topics.errors`
(the ingest key store's process, `daemon.ingest_keys_process`) does not pay for pydantic and the models, ~75 ms of
start and ~13 MB of memory.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from topics.codec import CONTENT_TYPE, EncodedRecord, decode, encode, field_errors, parse_submission
    from topics.currency import CURRENCY_CODES, is_currency, minor_units
    from topics.envelope import SCHEMA_VERSION, EventType, OrderEvent, OrderSubmission, to_event
    from topics.errors import ContractError, FieldError
    from topics.order import Address, Customer, LineItem, Order, ShippingCharge

_HOME: Final = {
    **dict.fromkeys(("CONTENT_TYPE", "EncodedRecord", "decode", "encode", "field_errors", "parse_submission"), "codec"),
    **dict.fromkeys(("CURRENCY_CODES", "is_currency", "minor_units"), "currency"),
    **dict.fromkeys(("SCHEMA_VERSION", "EventType", "OrderEvent", "OrderSubmission", "to_event"), "envelope"),
    **dict.fromkeys(("ContractError", "FieldError"), "errors"),
    **dict.fromkeys(("Address", "Customer", "LineItem", "Order", "ShippingCharge"), "order"),
}


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__all__ = [
    "CONTENT_TYPE",
    "CURRENCY_CODES",
    "SCHEMA_VERSION",
    "Address",
    "ContractError",
    "Customer",
    "EncodedRecord",
    "EventType",
    "FieldError",
    "LineItem",
    "Order",
    "OrderEvent",
    "OrderSubmission",
    "ShippingCharge",
    "decode",
    "encode",
    "field_errors",
    "is_currency",
    "minor_units",
    "parse_submission",
    "to_event",
]
