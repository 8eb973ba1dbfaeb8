"""Bad input at volume: malformed webhook bodies and malformed Kafka records, each reproducible from (seed, index).

Every case is checked against the contract as it is made: `parse_submission` (webhooks) or `decode` (records)
must refuse it, else another draw is taken. So "each gets a clear 4xx or a dead letter" tests the daemon, not the
generator's luck. The kinds cover bad JSON, wrong types, broken money and charges (discounts, shipping), wrong
encodings and control characters, huge values, deep nesting, missing and extra fields, wrong shapes, bad dates and
envelopes, oversized bodies and wrong media types.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from topics.codec import decode, parse_submission
from topics.errors import ContractError
from topics.samples import sample_event, sample_submission

CHAOS_ID_HEADER: Final = "chaos-bad-id"
MAX_BODY_BYTES: Final = 1_048_576  # the ingest's default limit (`IngestSettings.max_body_bytes`)
# Close to the broker's message.max.bytes (1 MiB + 12): the record fits, its dead letter (value plus headers) too.
LARGE_RECORD_BYTES: Final = 1_000_000

Json = dict[str, Any]
Mutation = Callable[[random.Random, Json], bytes]


@dataclass(frozen=True, slots=True)
class BadWebhook:
    """A webhook body the ingest must refuse with `status`."""

    kind: str
    body: bytes
    status: int
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record every sink must dead-letter with reason "invalid"; `ident` travels in the CHAOS_ID_HEADER."""

    kind: str
    ident: str
    key: bytes | None
    value: bytes | None

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return [(CHAOS_ID_HEADER, self.ident.encode())]


# --- mutations of a valid document (an OrderSubmission or an OrderEvent as JSON) -----------------------------


def _dump(data: object) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


def _order(data: Json) -> Json:
    order: Json = data["order"]
    return order


def _line(rng: random.Random, data: Json) -> Json:
    line: Json = rng.choice(_order(data)["line_items"])
    return line


def _truncated(rng: random.Random, data: Json) -> bytes:
    text = _dump(data)
    return text[: rng.randrange(1, len(text) - 1)]


def _trailing(rng: random.Random, data: Json) -> bytes:
    return _dump(data) + rng.choice([b",", b"}", b" x", b"\x00", b"{}", b"]"])


def _single_quotes(rng: random.Random, data: Json) -> bytes:
    return _dump(data).replace(b'"', b"'")


def _comment(rng: random.Random, data: Json) -> bytes:
    return b"// " + rng.choice([b"order", b"todo"]) + b"\n" + _dump(data)


def _nan_token(rng: random.Random, data: Json) -> bytes:
    return _dump(data).replace(b'"paid": ' + (b"true" if _order(data)["paid"] else b"false"), b'"paid": NaN', 1)


def _latin1(rng: random.Random, data: Json) -> bytes:
    _order(data)["customer"]["name"] = rng.choice(["Jürgen Müller", "Renée Français", "Groß Straße"])
    return json.dumps(data, ensure_ascii=False).encode("latin-1")


def _utf16(rng: random.Random, data: Json) -> bytes:
    return _dump(data).decode().encode(rng.choice(["utf-16", "utf-16-le", "utf-32"]))


def _bom(rng: random.Random, data: Json) -> bytes:
    return b"\xef\xbb\xbf" + _dump(data)


def _lone_surrogate(rng: random.Random, data: Json) -> bytes:
    _order(data)["customer"]["name"] = "X" + chr(rng.randrange(0xD800, 0xE000)) + "Y"
    return json.dumps(data).encode()  # ensure_ascii: the surrogate travels as a \\udXXX escape


def _control_character(rng: random.Random, data: Json) -> bytes:
    order = _order(data)
    text = rng.choice([order["customer"], order["billing_address"], _line(rng, data)])
    field = rng.choice([key for key in ("name", "line1", "city") if key in text])
    text[field] = str(text[field]) + chr(rng.choice([0, 8, 27, 127]))
    return _dump(data)


def _invalid_utf8(rng: random.Random, data: Json) -> bytes:
    text = _dump(data)
    cut = text.index(b'"name"') + 9
    return text[:cut] + rng.choice([b"\xc0\xaf", b"\xff", b"\xed\xa0\x80", b"\xe2\x82"]) + text[cut:]


def _wrong_type(rng: random.Random, data: Json) -> bytes:
    order, line = _order(data), _line(rng, data)
    target, field, value = rng.choice(
        [
            (order, "order_number", rng.randrange(10**6)),
            (order, "paid", rng.choice(["yes", 1, "true", None])),
            (order, "line_items", {"0": line}),
            (order, "customer", [order["customer"]]),
            (order, "created_at", 1767225600),
            (order, "currency", 978),
            (line, "quantity", rng.choice(["two", 2.5, "2", True, None])),
            (line, "sku", ["A", "B"]),
            (order["billing_address"], "country", 49),
            (data, "order", rng.choice(["SO-1", None, 7, []])),
        ]
    )
    target[field] = value
    return _dump(data)


def _broken_money(rng: random.Random, data: Json) -> bytes:
    order, line = _order(data), _line(rng, data)
    case = rng.randrange(9)
    if case == 0:
        line["unit_price"] = float(line["unit_price"])  # a JSON number, not a string
    elif case == 1:
        line["unit_price"] = line["unit_price"] + "1"  # more places than the currency has
    elif case == 2:
        order["net_total"] = "-" + order["net_total"]
    elif case == 3:
        line["net_amount"] = rng.choice(["2.49e1", "NaN", "Infinity", "", "12,50", "0x10", " "])
    elif case == 4:
        order["gross_total"] = f"{float(order['gross_total']) + 0.01:.2f}"
    elif case == 5:
        line["net_amount"] = f"{float(line['net_amount']) + 1:.2f}"
    elif case == 6:
        order["currency"] = rng.choice(["XXX", "EURO", "eur", "", "€"])
    elif case == 7:
        order["tax_total"] = "9" * rng.randrange(19, 60) + ".00"
    else:
        line["tax_rate"] = rng.choice(["-0.19", "19%", "1.5", 0.19])
    return _dump(data)


def _broken_charges(rng: random.Random, data: Json) -> bytes:
    order, line = _order(data), _line(rng, data)
    price = Decimal(line["unit_price"]) * line["quantity"]
    case = rng.randrange(6)
    if case == 0:
        line["discount_amount"] = str(price + Decimal("0.01"))  # more than the line's price
    elif case == 1:
        line["discount_amount"] = rng.choice(["0.001", "-1.00", "1,00", 1.5])  # places, sign, notation, a number
    elif case == 2:
        line["discount_amount"] = "0.01"  # the net left as if undiscounted
    elif case == 3:  # a charge the totals leave out
        order["shipping"] = {"method": "standard", "net_amount": "4.90", "tax_rate": "0.19", "tax_amount": "0.93"}
    elif case == 4:
        order["shipping"] = {"net_amount": "4.90", "tax_rate": "0.19", "tax_amount": "1.50"}  # its tax wrong
    else:
        order["shipping"] = {"net_amount": 4.9, "tax_rate": "19%", "tax_amount": "0.93", "carrier": "DHL"}
    return _dump(data)


def _huge(rng: random.Random, data: Json) -> bytes:
    order, line = _order(data), _line(rng, data)
    case = rng.randrange(6)
    if case == 0:
        line["quantity"] = 10 ** rng.randrange(7, 40)
    elif case == 1:
        return _dump(data).replace(b'"quantity": ', b'"quantity": ' + b"9" * rng.randrange(500, 5000), 1)
    elif case == 2:
        order["order_number"] = "A" * rng.randrange(65, 100_000)
    elif case == 3:
        order["customer"]["name"] = "x" * rng.randrange(10_000, 400_000)
    elif case == 4:
        order["line_items"] = [line] * rng.randrange(501, 2000)
    else:
        return _dump(data).replace(b'"quantity": ', b'"quantity": 1e400, "q": ', 1)
    return _dump(data)


def _deep(rng: random.Random, data: Json) -> bytes:
    depth = rng.choice([200, 1000, 5000, 50_000])
    case = rng.randrange(3)
    if case == 0:
        return b"[" * depth + b"]" * depth
    if case == 1:
        return b'{"a":' * depth + b"1" + b"}" * depth
    text = _dump(data)
    cut = text.index(b'"customer": ') + len(b'"customer": ')
    return text[:cut] + b"[" * depth + b"]" * depth + b", " + b'"x": ' + text[cut:]


_REQUIRED = (
    ("order",),
    ("order", "order_number"),
    ("order", "customer"),
    ("order", "customer", "name"),
    ("order", "billing_address"),
    ("order", "billing_address", "city"),
    ("order", "line_items"),
    ("order", "currency"),
    ("order", "net_total"),
    ("order", "gross_total"),
    ("order", "paid"),
    ("order", "created_at"),
)
_REQUIRED_EVENT = (("event_id",), ("event_type",), ("schema_version",), ("source",), ("occurred_at",))


def _missing(rng: random.Random, data: Json) -> bytes:
    paths = _REQUIRED + (_REQUIRED_EVENT if "schema_version" in data else ())
    path = rng.choice(paths)
    target = data
    for part in path[:-1]:
        target = target[part]
    if rng.random() < 0.3:
        del _line(rng, data)[rng.choice(["sku", "quantity", "unit_price", "tax_amount"])]
    del target[path[-1]]
    return _dump(data)


def _extra(rng: random.Random, data: Json) -> bytes:
    order = _order(data)
    target = rng.choice([data, order, order["customer"], order["billing_address"], _line(rng, data)])
    target[rng.choice(["note", "discount", "__proto__", "x" * 40, "Order_Number", ""])] = rng.choice(
        [None, 1, "free", {"a": 1}, [1, 2]]
    )
    return _dump(data)


def _shape(rng: random.Random, data: Json) -> bytes:
    return rng.choice([b"", b"null", b"[]", b"42", b'"order"', b"true", b"{}", b" ", b'{"order": {}}', b"\x00"])


def _dates(rng: random.Random, data: Json) -> bytes:
    order = _order(data)
    field = rng.choice(["created_at", "updated_at"])
    order[field] = rng.choice(
        ["2026-13-45T00:00:00Z", "2026-01-01T00:00:00", "yesterday", "", "2026-02-30T10:00:00Z", "0000-00-00"]
    )
    return _dump(data)


def _envelope(rng: random.Random, data: Json) -> bytes:
    case = rng.randrange(5)
    if case == 0:
        data["event_type"] = rng.choice(["order.deleted", "ORDER.CREATED", "", 1])
    elif case == 1:
        data["event_id"] = rng.choice(["not-a-uuid", "1234", 5, ""])
    elif case == 2:
        data["occurred_at"] = "2026-01-01 10:00"
    elif case == 3 and "schema_version" in data:
        data["schema_version"] = rng.choice([2, 0, "1", None])
    elif "source" in data:
        data["source"] = rng.choice(["Shop EU!", "", "x" * 40, None])
    else:
        data["source"] = "webhook"  # a submission never names its source
    return _dump(data)


MUTATIONS: Final[dict[str, Mutation]] = {
    "bad-json/truncated": _truncated,
    "bad-json/trailing": _trailing,
    "bad-json/single-quotes": _single_quotes,
    "bad-json/comment": _comment,
    "bad-json/nan": _nan_token,
    "encoding/latin-1": _latin1,
    "encoding/utf-16-32": _utf16,
    "encoding/bom": _bom,
    "encoding/lone-surrogate": _lone_surrogate,
    "encoding/invalid-utf-8": _invalid_utf8,
    "encoding/control-character": _control_character,
    "wrong-type": _wrong_type,
    "broken-money": _broken_money,
    "broken-charges": _broken_charges,
    "huge-value": _huge,
    "deep-nesting": _deep,
    "missing-field": _missing,
    "extra-field": _extra,
    "wrong-shape": _shape,
    "bad-date": _dates,
    "bad-envelope": _envelope,
}
_KINDS: Final = tuple(MUTATIONS)
_TRIES: Final = 50


def _refused(check: Callable[[bytes], object], value: bytes) -> bool:
    try:
        check(value)
    except ContractError:
        return True
    return False


def bad_webhook(seed: int, index: int) -> BadWebhook:
    """The `index`-th malformed webhook of `seed`: about 1 in 200 is oversized, 1 in 100 has a wrong media type."""
    rng = random.Random(f"bad-webhook:{seed}:{index}")
    base = sample_submission(rng, order_number=f"BADWH-{index:05d}").model_dump(mode="json")
    roll = rng.random()
    if roll < 0.005:
        filler = "x" * (MAX_BODY_BYTES + rng.randrange(1, 200_000))
        return BadWebhook("oversized", _dump({**base, "padding": filler}), 413)
    if roll < 0.015:
        content_type = rng.choice(["text/plain", "application/x-www-form-urlencoded", "application/xml", ""])
        return BadWebhook("media-type", _dump(base), 415, content_type=content_type)
    for _ in range(_TRIES):
        kind = rng.choice(_KINDS)
        body = MUTATIONS[kind](rng, copy.deepcopy(base))
        if len(body) <= MAX_BODY_BYTES and _refused(parse_submission, body):
            return BadWebhook(kind, body, 400)
    raise AssertionError(f"no malformed webhook for index {index} after {_TRIES} draws")


def bad_record(seed: int, index: int) -> BadRecord:
    """The `index`-th malformed Kafka record of `seed`, with its own key (or none), never a valid order's."""
    rng = random.Random(f"bad-record:{seed}:{index}")
    ident = f"bad-{index:05d}"
    key_roll = rng.random()
    key: bytes | None = f"BAD-{index:05d}".encode()
    if key_roll < 0.1:
        key = None
    elif key_roll < 0.15:
        key = b"\xff\xfeBAD-" + str(index).encode()  # not UTF-8
    roll = rng.random()
    if roll < 0.01:
        return BadRecord("tombstone", ident, key or f"BAD-{index:05d}".encode(), None)  # a producer needs one
    if roll < 0.015:
        value = b'{"padding": "' + b"x" * (LARGE_RECORD_BYTES - rng.randrange(20, 5000)) + b'"}'
        return BadRecord("oversized", ident, key, value)
    base = sample_event(rng, order_number=f"BADKF-{index:05d}").model_dump(mode="json")
    for _ in range(_TRIES):
        kind = rng.choice(_KINDS)
        value = MUTATIONS[kind](rng, copy.deepcopy(base))
        if len(value) < LARGE_RECORD_BYTES and _refused(decode, value):
            return BadRecord(kind, ident, key, value)
    raise AssertionError(f"no malformed record for index {index} after {_TRIES} draws")
