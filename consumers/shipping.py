"""Shipping: who receives the parcel, where, how to reach them, and what goes in it.

Purpose (GDPR Art. 6, data minimisation): the carrier delivers the parcel. It gets the recipient's name and
phone, the shipping address, the line items without prices, the order number, and the delivery service the
customer paid for (``method``: its shipping charge's, ``null`` when it names none); no e-mail, no billing address,
no amounts, no VAT id.
"""

from __future__ import annotations

from typing import Any

from consumers.sink import RestSink
from topics.envelope import OrderEvent


class ShippingSink(RestSink):
    """order.created → POST, order.updated → PUT (full replace), order.cancelled → DELETE."""

    def payload(self, event: OrderEvent) -> dict[str, Any]:
        order, shipping = event.order, event.order.shipping_address
        return {
            "order_number": order.order_number,
            "recipient": {"name": order.customer.name, "phone": order.customer.phone},
            "shipping_address": {
                "line1": shipping.line1,
                "line2": shipping.line2,
                "postal_code": shipping.postal_code,
                "city": shipping.city,
                "region": shipping.region,
                "country": shipping.country,
            },
            "line_items": [
                {"sku": line.sku, "name": line.name, "quantity": line.quantity} for line in order.line_items
            ],
            "method": order.shipping.method if order.shipping is not None else None,
        }
