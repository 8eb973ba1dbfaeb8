"""The order as every part of orderbus sees it: frozen pydantic models that reject what downstream cannot use.

Why so strict: an order that passes here is delivered to CRM, accounting and shipping without further checks,
and a wrong amount booked in accounting costs far more than a 422 at the door. So the contract rejects rather
than repairs:

- Money is a `Decimal` that travels as a JSON *string* ("12.50"). JSON numbers are rejected, because most
  producers' JSON libraries turn them into binary floats, and 0.1 + 0.2 is not 0.3 in a float.
- Amounts are non-negative, finite, and carry no more decimal places than the currency's minor units. That
  rule needs the currency, which lives on the order, so `Order` checks it for every amount it holds.
- Totals add up: line net = quantity * unit price - the line's discount; line tax = net * rate within one minor
  unit (shops round per line, half-up or half-even); the shipping charge's tax likewise; order totals are the
  sums of the lines and the shipping charge; gross = net + tax.

Every violation names its field (``line_items.0.unit_price``) and, for arithmetic, the expected and given
values. Messages never echo names, e-mails or addresses: they are safe to log and to dead-letter.
"""

from __future__ import annotations

import decimal
import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from topics.currency import CURRENCY_CODES, is_currency, minor_units

MAX_LINE_ITEMS: Final = 500
MAX_QUANTITY: Final = 1_000_000
# 18 + 18 digits, a quantity of 7 digits and sums over 500 lines all fit in 64 digits: arithmetic stays exact.
_MAX_WHOLE_DIGITS: Final = 18
_MAX_PLACES: Final = 18
_EXACT_PRECISION: Final = 64
_EXACT: Final = decimal.Context(prec=_EXACT_PRECISION)
_ZERO: Final = Decimal(0)

_DECIMAL_RE: Final = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")
_NON_FINITE: Final = frozenset({"nan", "snan", "inf", "infinity"})


class ContractModel(BaseModel):
    """Base of every contract model: immutable once validated, unknown fields refused, text trimmed."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


# --- decimals: money and rates ---------------------------------------------------------------------------


def _json_kind(value: object) -> str:
    """Name `value` the way a JSON producer thinks of it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _parse_decimal(value: object, *, example: str) -> Decimal:
    """Turn a decimal string (or, from Python, a `Decimal`) into a non-negative finite `Decimal`.

    Floats and ints are refused even from Python: accepting them here would make the JSON rule leaky.
    """
    if isinstance(value, Decimal):
        text = format(value, "f")
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise PydanticCustomError(
            "decimal_type",
            'must be a decimal string such as "{example}", not a {kind}: send it as a JSON string so it '
            "never passes through a binary float",
            {"example": example, "kind": _json_kind(value)},
        )
    match = _DECIMAL_RE.fullmatch(text)
    if match is None:
        if text.lower().lstrip("+-") in _NON_FINITE:
            raise PydanticCustomError("decimal_not_finite", "must be a finite amount, not NaN or Infinity")
        raise PydanticCustomError(
            "decimal_format",
            'must be a decimal string such as "{example}": digits, optionally a dot and decimals; '
            "no sign, exponent, spaces or thousands separators",
            {"example": example},
        )
    sign, whole, places = match.groups()
    if sign:
        raise PydanticCustomError("decimal_negative", "must not be negative")
    if len(whole) > _MAX_WHOLE_DIGITS or len(places or "") > _MAX_PLACES:
        raise PydanticCustomError(
            "decimal_too_long",
            "has too many digits: at most {whole} before and {places} after the decimal point",
            {"whole": _MAX_WHOLE_DIGITS, "places": _MAX_PLACES},
        )
    return Decimal(text)


# The common case, checked first and cheaply: a plain decimal string within the length limits. Anything else takes
# `_parse_decimal`'s way, which names what is wrong; both accept exactly the same strings as written or stripped.
_PLAIN_DECIMAL: Final = re.compile(rf"[0-9]{{1,{_MAX_WHOLE_DIGITS}}}(?:\.[0-9]{{1,{_MAX_PLACES}}})?")


def _to_money(value: object) -> Decimal:
    if type(value) is str and _PLAIN_DECIMAL.fullmatch(value):
        return Decimal(value)
    return _parse_decimal(value, example="12.50")


def _to_rate(value: object) -> Decimal:
    if type(value) is str and _PLAIN_DECIMAL.fullmatch(value):
        rate = Decimal(value)
    else:
        rate = _parse_decimal(value, example="0.19")
    if rate > 1:
        raise PydanticCustomError("rate_range", "must be between 0 and 1 (0.19 means 19 %)")
    return rate


def _decimal_text(value: Decimal) -> str:
    """Plain notation, trailing zeros kept: Decimal("12.50") → "12.50", never "1.25E+1"."""
    return format(value, "f")


_MONEY_SCHEMA: Final = {
    "type": "string",
    "pattern": r"^[0-9]{1,18}(\.[0-9]{1,18})?$",
    "description": 'Non-negative amount as a decimal string, e.g. "12.50"; no more decimal places '
    "than the currency's minor units (EUR 2, JPY 0, KWD 3).",
    "examples": ["12.50"],
}
# str, not `_decimal_text`: no Python call per amount (a tenth of an order's serialization). Both write the same text
# for every amount an order can hold: `_to_money` builds it from plain digits (exponent <= 0), and the currency's
# minor units (at most 4) keep it above 1e-6, where str would switch to exponent notation.
_MONEY_TEXT: Final = PlainSerializer(str, return_type=str, when_used="json")

Money = Annotated[Decimal, PlainValidator(_to_money), _MONEY_TEXT, WithJsonSchema(_MONEY_SCHEMA)]
"""An amount of money: `Decimal` in Python, a decimal string in JSON."""


def _to_discount(value: object) -> Decimal:
    # null is no discount, as leaving it out is: a shop's serializer may write every absent amount as null.
    return _ZERO if value is None else _to_money(value)


Discount = Annotated[
    Decimal,
    PlainValidator(_to_discount),
    _MONEY_TEXT,
    WithJsonSchema({"anyOf": [_MONEY_SCHEMA, {"type": "null"}]}),
]
"""A line's discount: money, and null (or left out) for none, which is `Decimal(0)`."""

TaxRate = Annotated[
    Decimal,
    PlainValidator(_to_rate),
    PlainSerializer(_decimal_text, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(0(\.[0-9]{1,18})?|1(\.0{1,18})?)$",
            "description": 'Tax rate as a fraction between 0 and 1, as a decimal string: "0.19" means 19 %.',
            "examples": ["0.19"],
        }
    ),
]


# --- text, codes and times ----------------------------------------------------------------------------------


def _check_currency(code: str) -> str:
    if not is_currency(code):
        raise PydanticCustomError(
            "currency_unknown", "is not an active ISO 4217 currency code (upper case, e.g. EUR, USD, JPY)"
        )
    return code


# Free text without control characters but tab and line breaks: a NUL (which PostgreSQL, for one, refuses in any
# text), an escape sequence or a backspace in a name is a sender's bug, better named here than dead-lettered by
# a downstream system's 400.
_NO_CONTROLS: Final = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"


def _text(max_length: int) -> StringConstraints:
    return StringConstraints(min_length=1, max_length=max_length, pattern=_NO_CONTROLS)


CurrencyCode = Annotated[
    str,
    AfterValidator(_check_currency),
    WithJsonSchema({"type": "string", "enum": list(CURRENCY_CODES), "description": "ISO 4217 code."}),
]
_ORDER_NUMBER: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SKU: Final = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$"
_COUNTRY: Final = r"^[A-Z]{2}$"
_EMAIL: Final = (
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_PHONE: Final = r"^\+[1-9][0-9]{6,14}$"
_VAT_ID: Final = r"^[A-Z]{2}[A-Z0-9+*.]{2,13}$"
OrderNumber = Annotated[str, StringConstraints(pattern=_ORDER_NUMBER)]
Sku = Annotated[str, StringConstraints(pattern=_SKU)]
CountryCode = Annotated[str, StringConstraints(pattern=_COUNTRY)]
Email = Annotated[str, StringConstraints(max_length=254, pattern=_EMAIL)]
Phone = Annotated[str, StringConstraints(pattern=_PHONE)]
VatId = Annotated[str, StringConstraints(pattern=_VAT_ID)]
# What each pattern asks for, in words: pydantic's message quotes the regular expression.
PATTERN_RULES: Final[dict[str, str]] = {
    _ORDER_NUMBER: "must be 1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit",
    _SKU: "must be 1-64 characters: letters, digits, '.', '_', '/' or '-', starting with a letter or digit",
    _COUNTRY: "must be an ISO 3166-1 alpha-2 country code in upper case, e.g. DE",
    _EMAIL: "must be an e-mail address with a domain that has a dot (name@example.com), in ASCII",
    _PHONE: "must be in E.164 form: + and the country code, then digits only, 8-16 characters (+4930123456)",
    _VAT_ID: "must be a VAT id: the country prefix in upper case, then 2-13 letters or digits, no spaces",
    _NO_CONTROLS: "must not contain control characters (NUL, escape, backspace, ...); tabs and line breaks are fine",
}
# RFC 3339 section 5.6: a "T", seconds, a numeric offset with a colon (a missing offset is left to pydantic, whose
# message for it is clearer). pydantic alone takes a number, or a string of digits, for seconds or milliseconds
# since the epoch (guessing the unit), and a space for the "T".
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?", re.ASCII)
_AWARE_FROM_TEXT: Final = TypeAdapter(AwareDatetime)


def _rfc3339(value: object) -> object:
    """An RFC 3339 string parsed as JSON's would be (a validator before the type sees Python values, not JSON)."""
    if isinstance(value, datetime):  # built in Python (`topics.envelope`), not read from JSON
        return value
    if not (isinstance(value, str) and _RFC3339.fullmatch(value)):
        raise PydanticCustomError(
            "datetime_rfc3339", "must be an RFC 3339 date-time string with a UTC offset, e.g. 2026-11-29T10:15:00Z"
        )
    try:
        return _AWARE_FROM_TEXT.validate_strings(value, strict=True)
    except ValidationError as exc:  # out of range, or no offset: pydantic's reason, under its type
        [error] = exc.errors(include_url=False, include_input=False)
        raise PydanticCustomError(error["type"], "{reason}", {"reason": error["msg"]}) from None


# A timestamp is an RFC 3339 string in JSON, never a number of seconds of unknown epoch and unit.
Timestamp = Annotated[AwareDatetime, Field(strict=True), BeforeValidator(_rfc3339)]


# --- the models ---------------------------------------------------------------------------------------------


class Address(ContractModel):
    """A postal address; `country` is an ISO 3166-1 alpha-2 code, upper case."""

    line1: Annotated[str, _text(200)]
    line2: Annotated[str, _text(200)] | None = None
    postal_code: Annotated[str, _text(16)]
    city: Annotated[str, _text(100)]
    region: Annotated[str, _text(100)] | None = None
    country: CountryCode


class Customer(ContractModel):
    """Who ordered. Personal data: sinks receive only the fields their purpose needs."""

    customer_id: Annotated[str, _text(64)] | None = None
    name: Annotated[str, _text(200)]
    email: Email
    phone: Annotated[Phone, Field(description="E.164: + and country code, digits only.")] | None = None
    company: Annotated[str, _text(200)] | None = None
    vat_id: Annotated[VatId, Field(description="Country prefix and number, no spaces.")] | None = None


def _is_zero(amount: Decimal) -> bool:
    return not amount


def _is_none(value: object) -> bool:
    return value is None


class LineItem(ContractModel):
    """One line of the order; `Order` checks its amounts against each other, as only it knows the currency."""

    sku: Sku
    name: Annotated[str, _text(200)]
    quantity: Annotated[
        int,
        Field(
            strict=True,
            gt=0,
            le=MAX_QUANTITY,
            description="A JSON integer written without a fraction: 2, not 2.0 (which JSON Schema would also call an "
            "integer)",
        ),
    ]
    unit_price: Money
    # Left out of the event's JSON when zero: a record of an order without discounts is what it was before the
    # field existed, so a daemon of an earlier version still reads it.
    discount_amount: Annotated[
        Discount,
        Field(
            description="Taken off quantity * unit_price before tax (a coupon shared out over the lines, or the "
            "line's own reduction), as a decimal string (\"2.50\") with no more decimal places than the currency's "
            "minor units; none when left out or null.",
            exclude_if=_is_zero,
        ),
    ] = _ZERO
    net_amount: Annotated[Money, Field(description="quantity * unit_price - discount_amount")]
    tax_rate: TaxRate
    tax_amount: Annotated[Money, Field(description="net_amount * tax_rate, rounded to the minor unit")]


class ShippingCharge(ContractModel):
    """What the customer pays for delivery, with its tax; `method` is the service the shop sold (the carrier's
    product, e.g. "express"), for the shipping system."""

    method: Annotated[str, _text(100)] | None = None
    net_amount: Money
    tax_rate: TaxRate
    tax_amount: Annotated[Money, Field(description="net_amount * tax_rate, rounded to the minor unit")]


class Order(ContractModel):
    """An order as the shop committed it: who, where, what, and totals that add up in its currency."""

    order_number: Annotated[OrderNumber, Field(description="The shop's order number; the Kafka record key.")]
    customer: Customer
    billing_address: Address
    shipping_address: Address
    line_items: Annotated[tuple[LineItem, ...], Field(min_length=1, max_length=MAX_LINE_ITEMS)]
    # Left out of the event's JSON when there is none, as a line's discount_amount when zero.
    shipping: Annotated[
        ShippingCharge | None, Field(description="The delivery charge, if the customer pays one.", exclude_if=_is_none)
    ] = None
    currency: CurrencyCode
    net_total: Annotated[Money, Field(description="Sum of the lines' and the shipping charge's net_amount.")]
    tax_total: Annotated[Money, Field(description="Sum of the lines' and the shipping charge's tax_amount.")]
    gross_total: Annotated[Money, Field(description="net_total + tax_total.")]
    paid: Annotated[bool, Field(strict=True)]
    created_at: Timestamp
    updated_at: Timestamp

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        """Raise one `ValidationError` listing every inconsistency, each located at the field it concerns."""
        problems = [*_precision_problems(self), *_arithmetic_problems(self)]
        if self.updated_at < self.created_at:
            problems.append(_problem("updated_at", "must not be before created_at", self.updated_at))
        if problems:
            raise ValidationError.from_exception_data(title=type(self).__name__, line_errors=problems)
        return self


# --- order-level checks -------------------------------------------------------------------------------------

Loc = tuple[str | int, ...]


def _problem(loc: str | Loc, message: str, given: Any, kind: str = "order_inconsistent") -> InitErrorDetails:
    # The message is passed as context so that braces in it can never be taken for template fields.
    return InitErrorDetails(
        type=PydanticCustomError(kind, "{message}", {"message": message}),
        loc=(loc,) if isinstance(loc, str) else loc,
        input=given,
    )


_LINE_AMOUNTS: Final = ("unit_price", "net_amount", "tax_amount")  # and discount_amount, when given
_SHIPPING_AMOUNTS: Final = ("net_amount", "tax_amount")
_ORDER_AMOUNTS: Final = ("net_total", "tax_total", "gross_total")
# The minor unit of each number of decimal places a currency has (ISO 4217: 0 to 4): 1, 0.1, 0.01, ...
_QUANTUM: Final = {places: Decimal(1).scaleb(-places) for places in {minor_units(c) for c in CURRENCY_CODES}}


def _places(amount: Decimal) -> int:
    """Decimal places as written: "12.50" has 2, "12" has 0 (an exponent > 0 only comes from Python)."""
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int)  # finite by construction
    return max(0, -exponent)


def _precision_problems(order: Order) -> list[InitErrorDetails]:
    # A plain loop, not a generator of (loc, amount): this runs for every record every sink decodes. An amount
    # written with exactly the currency's places (same_quantum, the common case) is settled without as_tuple(),
    # which builds a tuple of every digit.
    allowed = minor_units(order.currency)
    quantum = _QUANTUM[allowed]
    problems = []
    for index, line in enumerate(order.line_items):
        for field in _LINE_AMOUNTS:
            amount = getattr(line, field)
            if not amount.same_quantum(quantum) and -amount.as_tuple().exponent > allowed:
                problems.append(_too_precise(("line_items", index, field), amount, order.currency, allowed))
        # The default (left out, or null) is passed over: it has no places to check, and `as_tuple` is what costs.
        discount = line.discount_amount
        if discount is not _ZERO and not discount.same_quantum(quantum) and _places(discount) > allowed:
            problems.append(_too_precise(("line_items", index, "discount_amount"), discount, order.currency, allowed))
    if (shipping := order.shipping) is not None:
        for field in _SHIPPING_AMOUNTS:
            amount = getattr(shipping, field)
            if not amount.same_quantum(quantum) and -amount.as_tuple().exponent > allowed:
                problems.append(_too_precise(("shipping", field), amount, order.currency, allowed))
    for field in _ORDER_AMOUNTS:
        amount = getattr(order, field)
        if not amount.same_quantum(quantum) and -amount.as_tuple().exponent > allowed:
            problems.append(_too_precise((field,), amount, order.currency, allowed))
    return problems


def _too_precise(loc: Loc, amount: Decimal, currency: str, allowed: int) -> InitErrorDetails:
    message = f"has {_places(amount)} decimal places; {currency} allows at most {allowed}"
    return _problem(loc, message, _decimal_text(amount), "money_precision")


def _mismatch(loc: Loc, expected: str, given: Decimal) -> InitErrorDetails:
    return _problem(loc, f"expected {expected}, got {_decimal_text(given)}", _decimal_text(given))


def _arithmetic_problems(order: Order) -> list[InitErrorDetails]:
    # The context's own methods, not operators inside ``decimal.localcontext``: entering a context per order cost a
    # third of this check, which runs for every order the ingest takes and every record every sink decodes.
    # Comparisons are exact in any context; `copy_abs` too.
    problems: list[InitErrorDetails] = []
    unit = _QUANTUM[minor_units(order.currency)]
    multiply, add = _EXACT.multiply, _EXACT.add
    net_sum = tax_sum = _ZERO
    for index, line in enumerate(order.line_items):
        net_amount, tax_amount = line.net_amount, line.tax_amount
        gross_price = multiply(line.quantity, line.unit_price)
        if discount := line.discount_amount:
            if discount > gross_price:
                message = f"must not exceed quantity * unit_price ({gross_price:f})"
                problems.append(_problem(("line_items", index, "discount_amount"), message, _decimal_text(discount)))
            elif net_amount != (net := _EXACT.subtract(gross_price, discount)):
                expected = f"{net:f} (quantity * unit_price - discount_amount)"
                problems.append(_mismatch(("line_items", index, "net_amount"), expected, net_amount))
        elif net_amount != gross_price:
            expected = f"{gross_price:f} (quantity * unit_price)"
            problems.append(_mismatch(("line_items", index, "net_amount"), expected, net_amount))
        tax = multiply(net_amount, line.tax_rate)
        if _EXACT.subtract(tax_amount, tax).copy_abs() > unit:
            problems.append(_tax_mismatch(("line_items", index, "tax_amount"), tax, tax_amount, unit))
        net_sum = add(net_sum, net_amount)
        tax_sum = add(tax_sum, tax_amount)
    summed = "line_items"
    if (shipping := order.shipping) is not None:
        tax = multiply(shipping.net_amount, shipping.tax_rate)
        if _EXACT.subtract(shipping.tax_amount, tax).copy_abs() > unit:
            problems.append(_tax_mismatch(("shipping", "tax_amount"), tax, shipping.tax_amount, unit))
        net_sum = add(net_sum, shipping.net_amount)
        tax_sum = add(tax_sum, shipping.tax_amount)
        summed = "line_items and shipping"
    gross = add(order.net_total, order.tax_total)
    if order.net_total != net_sum:
        expected = f"{net_sum:f} (sum of {summed} net_amount)"
        problems.append(_mismatch(("net_total",), expected, order.net_total))
    if order.tax_total != tax_sum:
        expected = f"{tax_sum:f} (sum of {summed} tax_amount)"
        problems.append(_mismatch(("tax_total",), expected, order.tax_total))
    if order.gross_total != gross:
        problems.append(_mismatch(("gross_total",), f"{gross:f} (net_total + tax_total)", order.gross_total))
    return problems


def _tax_mismatch(loc: Loc, tax: Decimal, tax_amount: Decimal, unit: Decimal) -> InitErrorDetails:
    """`tax_amount` is more than one minor unit (`unit`) away from net * rate (`tax`): shops round per line, either
    way, so only that far is refused."""
    shown = tax.quantize(unit, rounding=decimal.ROUND_HALF_EVEN)
    return _mismatch(loc, f"{shown:f} (net_amount * tax_rate = {tax:f}, give or take {unit:f})", tax_amount)


__all__ = [
    "MAX_LINE_ITEMS",
    "MAX_QUANTITY",
    "Address",
    "ContractModel",
    "CurrencyCode",
    "Customer",
    "LineItem",
    "Money",
    "Order",
    "ShippingCharge",
    "TaxRate",
    "Timestamp",
]
