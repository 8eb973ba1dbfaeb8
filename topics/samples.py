"""Realistic, valid, obviously fictitious sample orders, reproducible from a seeded `random.Random`.

Why here and not in tests: the demo generator, the benchmarks and the tests of every package need orders that
pass the contract, and they should all exercise the same shapes (non-ASCII addresses, 1-5 lines, reduced
and standard VAT rates, per-line rounding). Everything comes from `rng`, never from the clock or global
random state, so a seed names one order forever. Discounts and shipping charges are drawn only when asked for
(``charges=True``, the demo's orders), so the orders of every seed stay what they were before they existed.

People are placeholders (Mustermann, Doe), e-mails are at example.com/.org/.net (RFC 2606), phone numbers
are in the UK range reserved for drama (+44 20 7946 0xxx).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Final
from uuid import UUID

from topics.currency import minor_units
from topics.envelope import SCHEMA_VERSION, EventType, OrderEvent, OrderSubmission
from topics.order import Address, Customer, LineItem, Order, ShippingCharge


@dataclass(frozen=True, slots=True)
class _Country:
    code: str
    postal_format: str  # "#" is a digit, "@" a letter
    standard_rate: str
    reduced_rate: str
    cities: tuple[str, ...]
    streets: tuple[str, ...]


_COUNTRIES: Final = (
    _Country("DE", "#####", "0.19", "0.07", ("Musterstadt", "Beispielheim"), ("Musterstraße", "Beispielweg")),
    _Country("AT", "####", "0.20", "0.10", ("Musterdorf", "Probenau"), ("Beispielgasse", "Testweg")),
    _Country("FR", "#####", "0.20", "0.055", ("Villexemple", "Modèleville"), ("Rue Exemple", "Rue Fictive")),
    _Country("NL", "#### @@", "0.21", "0.09", ("Voorbeeldstad", "Testdorp"), ("Voorbeeldstraat", "Proefweg")),
    _Country("GB", "@@# #@@", "0.20", "0.05", ("Exampleton", "Sampleford"), ("Example Road", "Sample Lane")),
)
_FIRST_NAMES: Final = ("Erika", "Max", "Jane", "John", "Lena", "Otto", "Zoë", "José", "Ana", "Kim")
_LAST_NAMES: Final = ("Mustermann", "Musterfrau", "Doe", "Roe", "Beispiel", "Exemple", "Voorbeeld", "Sample")
_MAIL_DOMAINS: Final = ("example.com", "example.org", "example.net")
_COMPANIES: Final = ("Example Trading GmbH", "Sample & Co. KG", "Placeholder Ltd", "Muster AG")
_Product = tuple[str, str, int, bool]
# (sku, name, list price in hundredths of a major unit, reduced VAT rate?)
_PRODUCTS: Final[tuple[_Product, ...]] = (
    ("COF-1KG", "Coffee beans, medium roast, 1 kg", 2490, True),
    ("TEA-SMP", "Loose-leaf tea sampler", 1695, True),
    ("BOOK-PB-017", "Paperback: A Field Guide to Examples", 1899, True),
    ("CHOC-DK-100", "Dark chocolate 70 %, 100 g", 349, True),
    ("CUP-ESP-2", "Espresso cups, set of 2", 2450, False),
    ("NTB-A5-DOT", "Notebook A5, dotted", 895, False),
    ("CBL-USBC-2M", "USB-C cable, 2 m", 1299, False),
    ("LMP-DSK-WW", "Desk lamp, warm white", 5990, False),
    ("BAG-CNV", "Canvas tote bag", 1190, False),
    ("MUG-ENM", "Enamel mug, 350 ml", 1475, False),
    ("PEN-FTN-M", "Fountain pen, medium nib", 3350, False),
    ("GRN-HND", "Hand grinder, ceramic burrs", 4299, False),
)


def sample_order(
    rng: random.Random, *, order_number: str | None = None, currency: str = "EUR", charges: bool = False
) -> Order:
    """A valid order (about 1 KB of JSON) drawn from `rng`; amounts respect `currency`'s minor units.

    `charges`: some lines carry a discount, and most orders a shipping charge (drawn after everything else)."""
    country = rng.choice(_COUNTRIES)
    customer = _customer(rng, country)
    billing = _address(rng, country)
    address = billing if rng.random() < 0.7 else _address(rng, country)
    products = rng.sample(_PRODUCTS, rng.randint(1, 5))
    lines = tuple(_line_item(rng, product, country, currency) for product in products)
    created_at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(365 * 24 * 3600))
    number = order_number or f"SO-2026-{rng.randrange(1_000_000):06d}"
    paid = rng.random() < 0.8
    updated_at = created_at + timedelta(seconds=rng.randrange(0, 3600))
    shipping = None
    if charges:
        lines = tuple(_discounted(rng, line, currency) for line in lines)
        shipping = _shipping_charge(rng, country, currency) if rng.random() < 0.7 else None
    net_total = sum((line.net_amount for line in lines), Decimal(0))
    tax_total = sum((line.tax_amount for line in lines), Decimal(0))
    if shipping is not None:
        net_total += shipping.net_amount
        tax_total += shipping.tax_amount
    return Order(
        order_number=number,
        customer=customer,
        billing_address=billing,
        shipping_address=address,
        line_items=lines,
        shipping=shipping,
        currency=currency,
        net_total=net_total,
        tax_total=tax_total,
        gross_total=net_total + tax_total,
        paid=paid,
        created_at=created_at,
        updated_at=updated_at,
    )


def sample_submission(
    rng: random.Random,
    *,
    order_number: str | None = None,
    currency: str = "EUR",
    event_type: EventType = "order.created",
    charges: bool = False,
) -> OrderSubmission:
    """A webhook body for a sample order, with the producer's own event id and time."""
    order = sample_order(rng, order_number=order_number, currency=currency, charges=charges)
    return OrderSubmission(
        event_type=event_type,
        occurred_at=order.updated_at,
        event_id=_uuid4(rng),
        order=order,
    )


def sample_event(
    rng: random.Random,
    *,
    order_number: str | None = None,
    currency: str = "EUR",
    event_type: EventType = "order.created",
    source: str = "shop-eu",
) -> OrderEvent:
    """A complete envelope, as found on the "orders" topic."""
    order = sample_order(rng, order_number=order_number, currency=currency)
    return OrderEvent(
        schema_version=SCHEMA_VERSION,
        event_id=_uuid4(rng),
        event_type=event_type,
        occurred_at=order.updated_at,
        source=source,
        order=order,
    )


def _uuid4(rng: random.Random) -> UUID:
    return UUID(int=rng.getrandbits(128), version=4)


def _customer(rng: random.Random, country: _Country) -> Customer:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    local = f"{first}.{last}".lower().encode("ascii", "ignore").decode("ascii")
    business = rng.random() < 0.3
    return Customer(
        customer_id=f"C-{rng.randrange(100_000):05d}" if rng.random() < 0.6 else None,
        name=f"{first} {last}",
        email=f"{local}{rng.randrange(100)}@{rng.choice(_MAIL_DOMAINS)}",
        phone=f"+4420794600{rng.randrange(10, 100)}" if rng.random() < 0.5 else None,
        company=rng.choice(_COMPANIES) if business else None,
        vat_id=f"{country.code}000{rng.randrange(1_000_000):06d}" if business else None,
    )


def _address(rng: random.Random, country: _Country) -> Address:
    return Address(
        line1=f"{rng.choice(country.streets)} {rng.randint(1, 120)}",
        line2=f"Apt {rng.randint(1, 40)}" if rng.random() < 0.2 else None,
        postal_code=_postal_code(rng, country.postal_format),
        city=rng.choice(country.cities),
        country=country.code,
    )


def _postal_code(rng: random.Random, template: str) -> str:
    digits, letters = "0123456789", "ABCDEFGHJKLMNPRSTUVWXYZ"
    return "".join(rng.choice(digits) if c == "#" else rng.choice(letters) if c == "@" else c for c in template)


def _line_item(rng: random.Random, product: _Product, country: _Country, currency: str) -> LineItem:
    sku, name, price, reduced = product
    unit = _unit(currency)
    unit_price = _price(price, currency)
    quantity = rng.choice((1, 1, 1, 2, 2, 3, 5))
    net = unit_price * quantity
    rate = Decimal(country.reduced_rate if reduced else country.standard_rate)
    return LineItem(
        sku=sku,
        name=name,
        quantity=quantity,
        unit_price=unit_price,
        net_amount=net,
        tax_rate=rate,
        tax_amount=(net * rate).quantize(unit, rounding=ROUND_HALF_UP),
    )


def _discounted(rng: random.Random, line: LineItem, currency: str) -> LineItem:
    """`line`, or a third of the time the same line 10 % or 20 % off its price, its tax on what is left."""
    if rng.random() >= 1 / 3:
        return line
    unit = _unit(currency)
    discount = (line.quantity * line.unit_price * Decimal(rng.choice(("0.10", "0.20")))).quantize(unit)
    net = line.quantity * line.unit_price - discount
    tax = (net * line.tax_rate).quantize(unit, rounding=ROUND_HALF_UP)
    return line.model_copy(update={"discount_amount": discount, "net_amount": net, "tax_amount": tax})


def _shipping_charge(rng: random.Random, country: _Country, currency: str) -> ShippingCharge:
    """Standard or express delivery at the country's standard rate, priced like the products (yen: 100 times)."""
    method, price = rng.choice((("standard", 490), ("standard", 590), ("express", 1290)))
    net = _price(price, currency)
    rate = Decimal(country.standard_rate)
    tax = (net * rate).quantize(_unit(currency), rounding=ROUND_HALF_UP)
    return ShippingCharge(method=method, net_amount=net, tax_rate=rate, tax_amount=tax)


def _unit(currency: str) -> Decimal:
    """The minor unit of `currency`: 0.01 for euros, 1 for yen."""
    return Decimal(1).scaleb(-minor_units(currency))


def _price(hundredths: int, currency: str) -> Decimal:
    """A list price in hundredths of a major unit, in `currency`: a currency without minor units gets 100 times it,
    as yen prices are to euro prices."""
    return (Decimal(hundredths) / 100 * (100 if minor_units(currency) == 0 else 1)).quantize(_unit(currency))


__all__ = ["sample_event", "sample_order", "sample_submission"]
