"""The one place where order events become Kafka records and bytes become events again.

Why one place: producers (the ingest, the demo generator) and every consumer group must agree byte for byte on
key, value and headers. Everything that can go wrong while reading bytes (no value, not UTF-8, not JSON, not
an object, a broken contract) surfaces as one `ContractError` carrying `FieldError`s, never as a pydantic,
JSON or Unicode exception, so callers catch exactly one thing.

JSON is parsed by pydantic in JSON mode: a JSON number never becomes a Python float on the way to a money
field (money is refused unless it is a string), and nesting deeper than the parser's limit is an error, not a
`RecursionError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from topics.envelope import SCHEMA_VERSION, SOURCE_PATTERN, OrderEvent, OrderSubmission
from topics.errors import ContractError, FieldError
from topics.order import PATTERN_RULES

CONTENT_TYPE: Final = "application/json"

_Model = TypeVar("_Model", bound=BaseModel)

_PATTERN_RULES: Final[Mapping[str, str]] = {
    **PATTERN_RULES,
    SOURCE_PATTERN: "must be 1-32 characters: lower-case letters, digits or '-', starting with a letter (shop-eu)",
}
# pydantic's wording for the errors producers meet most, rephrased to say what to send instead.
_MESSAGES: Final[Mapping[str, str]] = {
    "missing": "is required",
    "extra_forbidden": "is not a field of the contract; remove it",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be a whole number (a JSON integer)",
    "timezone_aware": "must include a UTC offset, e.g. 2026-11-29T10:15:00Z or 2026-11-29T11:15:00+01:00",
    "datetime_type": "must be an RFC 3339 date-time string with a UTC offset, e.g. 2026-11-29T10:15:00Z",
}


@dataclass(frozen=True, slots=True)
class EncodedRecord:
    """What a producer sends: key = order number (so one order's events stay in one partition, in order)."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def encode(event: OrderEvent) -> EncodedRecord:
    """Encode `event` as compact UTF-8 JSON; headers repeat the routing facts so tools need not parse it."""
    return EncodedRecord(
        key=event.order.order_number.encode("utf-8"),
        value=event.model_dump_json().encode("utf-8"),
        headers=[
            ("content-type", CONTENT_TYPE.encode("ascii")),
            ("event-id", str(event.event_id).encode("ascii")),
            ("event-type", event.event_type.encode("ascii")),
            ("schema-version", str(event.schema_version).encode("ascii")),
        ],
    )


def decode(value: bytes | None) -> OrderEvent:
    """Decode a record value; `ContractError` locs are relative to the envelope ("value" for the whole)."""
    return _validate(OrderEvent, value, root="value")


def parse_submission(body: bytes) -> OrderSubmission:
    """Parse a webhook body; raises `ContractError` (locs relative to the body, "body" for the whole)."""
    return _validate(OrderSubmission, body, root="body")


def field_errors(exc: ValidationError, prefix: str = "", *, root: str = "body") -> list[FieldError]:
    """Map pydantic's errors to `FieldError`s with dotted locs and producer-facing messages.

    `prefix` is prepended to every loc ("order" → "order.currency"); an error about the input as a whole
    (bad JSON, not an object) gets `prefix`, or `root` when there is no prefix. Messages state the rule
    broken, not the input value, which may hold personal data; so they are safe to log and to return.
    """
    errors = []
    details = exc.errors(include_url=False, include_input=False)
    # pydantic checks a list's length on the items that validated: every item wrong also says "at least 1 item,
    # not 0", about a list that has them. Said only when no item of that list has an error of its own.
    with_items = {error["loc"][:i] for error in details for i, part in enumerate(error["loc"]) if isinstance(part, int)}
    for error in details:
        if error["type"] == "too_short" and error["loc"] in with_items:
            continue
        path = ".".join(str(part) for part in error["loc"])
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        errors.append(FieldError(path or root, _message(error)))
    return errors


def _message(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    if kind == "json_invalid":
        return f"is not valid JSON: {ctx.get('error', error['msg'])}"
    if kind == "too_short":
        return f"must have at least {_items(ctx.get('min_length'))}, not {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"must have at most {_items(ctx.get('max_length'))}, not {ctx.get('actual_length')}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "string_pattern_mismatch" and (rule := _PATTERN_RULES.get(str(ctx.get("pattern")))) is not None:
        return rule
    if kind == "literal_error" and error["loc"][-1:] == ("schema_version",):
        return f"must be {SCHEMA_VERSION}: this orderbus reads version {SCHEMA_VERSION} of the contract only"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty (spaces around the text are removed); leave an optional field out, or null"
    return _MESSAGES.get(kind, error["msg"]).removeprefix("Value error, ")


def _items(count: object) -> str:
    return "1 item" if count == 1 else f"{count} items"


def _validate(model: type[_Model], data: bytes | None, *, root: str) -> _Model:
    if data is None:
        raise ContractError([FieldError(root, "is missing (null); expected a JSON object")])
    if not data:
        raise ContractError([FieldError(root, "is empty; expected a JSON object")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError([FieldError(root, f"is not valid UTF-8 (at byte {exc.start})")]) from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        if text.startswith("\ufeff"):  # pydantic's "expected value at line 1 column 1" does not say why
            raise ContractError(
                [FieldError(root, "starts with a byte order mark (BOM); send UTF-8 without one")]
            ) from None
        # `from None`: the ValidationError's text contains input values (personal data) and must not reach
        # a log through exception chaining.
        raise ContractError(field_errors(exc, root=root)) from None


__all__ = ["CONTENT_TYPE", "EncodedRecord", "decode", "encode", "field_errors", "parse_submission"]
