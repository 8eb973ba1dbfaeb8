"""The order contract: models, envelope, Kafka record codec and ISO 4217 data. Imports nothing else of ours.

Import from here; `topics.schema` (JSON Schema files) and `topics.samples` (test data) are imported directly.
"""

from topics.codec import CONTENT_TYPE, EncodedRecord, decode, encode, field_errors, parse_submission
from topics.currency import CURRENCY_CODES, is_currency, minor_units
from topics.envelope import SCHEMA_VERSION, EventType, OrderEvent, OrderSubmission, to_event
from topics.errors import ContractError, FieldError
from topics.order import Address, Customer, LineItem, Order

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
    "decode",
    "encode",
    "field_errors",
    "is_currency",
    "minor_units",
    "parse_submission",
    "to_event",
]
