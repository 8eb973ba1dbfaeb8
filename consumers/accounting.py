"""Accounting: the invoice. Who is billed, where, for what, at which tax, and whether it is paid.

Purpose (GDPR Art. 6, data minimisation): accounting books the sale. It gets the billing party (name, company,
VAT id, customer id) and billing address, the priced line items, the shipping charge, net/tax/gross totals,
currency, the paid flag, the order number and dates; no e-mail, no phone, no shipping address.

Every field is sent for every order, ``null`` or zero when it has no value (the order's ``shipping``; a line's
``discount_amount``, ``"0.00"`` in euros, at the currency's places as every amount): an update is a full replace,
and names what it clears.
"""

from __future__ import annotations

import functools
from decimal import Decimal
from typing import Any

from consumers.sink import RestSink
from topics.currency import minor_units
from topics.envelope import OrderEvent
from topics.order import LineItem, ShippingCharge


class AccountingSink(RestSink):
    """order.created → POST, order.updated → PUT (full replace), order.cancelled → DELETE."""

    def payload(self, event: OrderEvent) -> dict[str, Any]:
        order, customer, billing = event.order, event.order.customer, event.order.billing_address
        zero = _zero(order.currency)
        return {
            "order_number": order.order_number,
            "created_at": order.created_at,
            "updated_at": order.updated_at,
            "billing_party": {
                "customer_id": customer.customer_id,
                "name": customer.name,
                "company": customer.company,
                "vat_id": customer.vat_id,
            },
            "billing_address": {
                "line1": billing.line1,
                "line2": billing.line2,
                "postal_code": billing.postal_code,
                "city": billing.city,
                "region": billing.region,
                "country": billing.country,
            },
            "line_items": [_line(line, zero) for line in order.line_items],
            "currency": order.currency,
            "net_total": order.net_total,
            "tax_total": order.tax_total,
            "gross_total": order.gross_total,
            "shipping": _shipping(order.shipping),
            "paid": order.paid,
        }


@functools.cache
def _zero(currency: str) -> Decimal:
    """Zero at `currency`'s places: "0.00" in euros, "0" in yen (made once per currency, not per request)."""
    return Decimal(0).scaleb(-minor_units(currency))


def _line(line: LineItem, zero: Decimal) -> dict[str, Any]:
    return {
        "sku": line.sku,
        "name": line.name,
        "quantity": line.quantity,
        "unit_price": line.unit_price,
        "discount_amount": line.discount_amount or zero,
        "net_amount": line.net_amount,
        "tax_rate": line.tax_rate,
        "tax_amount": line.tax_amount,
    }


def _shipping(charge: ShippingCharge | None) -> dict[str, Any] | None:
    if charge is None:
        return None
    return {"net_amount": charge.net_amount, "tax_rate": charge.tax_rate, "tax_amount": charge.tax_amount}
