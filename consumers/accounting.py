"""Accounting: the invoice. Who is billed, where, for what, at which tax, and whether it is paid.

Purpose (GDPR Art. 6, data minimisation): accounting books the sale. It gets the billing party (name, company,
VAT id, customer id) and billing address, the priced line items, the shipping charge, net/tax/gross totals,
currency, the paid flag, the order number and dates; no e-mail, no phone, no shipping address.

Every field is sent for every order, ``null`` or zero when it has no value (the order's ``shipping``; a line's
``discount_amount``, ``"0.00"`` in euros, at the currency's places as every amount): an update is a full replace,
and names what it clears.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from consumers.sink import RestSink
from topics.currency import at_places, zero
from topics.envelope import OrderEvent
from topics.order import LineItem, ShippingCharge


class AccountingSink(RestSink):
    """order.created → POST, order.updated → PUT (full replace), order.cancelled → DELETE."""

    def payload(self, event: OrderEvent) -> dict[str, Any]:
        order, customer, billing = event.order, event.order.customer, event.order.billing_address
        places = zero(order.currency)
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
            "line_items": [_line(line, places) for line in order.line_items],
            "currency": order.currency,
            "net_total": at_places(order.net_total, places),
            "tax_total": at_places(order.tax_total, places),
            "gross_total": at_places(order.gross_total, places),
            "shipping": _shipping(order.shipping, places),
            "paid": order.paid,
        }


def _line(line: LineItem, places: Decimal) -> dict[str, Any]:
    return {
        "sku": line.sku,
        "name": line.name,
        "quantity": line.quantity,
        "unit_price": at_places(line.unit_price, places),
        "discount_amount": at_places(line.discount_amount, places) if line.discount_amount else places,
        "net_amount": at_places(line.net_amount, places),
        "tax_rate": line.tax_rate,
        "tax_amount": at_places(line.tax_amount, places),
    }


def _shipping(charge: ShippingCharge | None, places: Decimal) -> dict[str, Any] | None:
    if charge is None:
        return None
    return {
        "net_amount": at_places(charge.net_amount, places),
        "tax_rate": charge.tax_rate,
        "tax_amount": at_places(charge.tax_amount, places),
    }
