"""The CRM: who the customer is and how to reach them, and which order of theirs, for how much.

Purpose (GDPR Art. 6, data minimisation): the CRM keeps the customer relationship. It gets the customer's
identity and contact details, the order reference and its gross total; no address, no line items, no VAT id.
"""

from __future__ import annotations

from typing import Any

from consumers.sink import RestSink
from topics.currency import at_places, zero
from topics.envelope import OrderEvent


class CrmSink(RestSink):
    """order.created → POST, order.updated → PUT (full replace), order.cancelled → DELETE."""

    def payload(self, event: OrderEvent) -> dict[str, Any]:
        order, customer = event.order, event.order.customer
        return {
            "order_number": order.order_number,
            "customer": {
                "customer_id": customer.customer_id,
                "name": customer.name,
                "email": customer.email,
                "phone": customer.phone,
                "company": customer.company,
            },
            "gross_total": at_places(order.gross_total, zero(order.currency)),
            "currency": order.currency,
        }
