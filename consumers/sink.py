"""What a downstream system is to the engine: how an order event becomes its HTTP request, and its policy.

A sink module (crm, accounting, shipping) only says that; the engine owns retries, pacing, dead letters and
commits. `RestSink` is the common shape of such an API (create with POST, replace with PUT, cancel with DELETE);
the real sinks differ only in the fields they send (data minimisation) and their URL templates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from consumers.policy import DEFAULT_POLICY, ResponsePolicy
from topics.envelope import OrderEvent

_METHODS = {"order.created": "POST", "order.updated": "PUT", "order.cancelled": "DELETE"}


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request to a downstream system, before the engine adds the idempotency key and credentials."""

    method: str
    url: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class Sink(Protocol):
    """A downstream system as the engine sees it."""

    @property
    def name(self) -> str: ...

    @property
    def policy(self) -> ResponsePolicy: ...

    def request(self, event: OrderEvent, downstream_id: str | None) -> HttpRequest:
        """The request that applies `event`; `downstream_id` is what this system's create returned, if known."""
        ...

    def downstream_id(self, event: OrderEvent, status: int, body: bytes) -> str | None:
        """The id this system gave the order in its answer to a create, if any."""
        ...


@dataclass(frozen=True)
class RestSink:
    """A REST resource API: POST {base}/orders, PUT/DELETE {base}/orders/{id}.

    Without a known downstream id (the create happened before orderbus kept ids, or another system created it),
    updates and cancels address the order by number: {base}/orders/by-number/{order_number}.
    Subclasses override `payload` to send only the fields their purpose needs.
    """

    name: str
    base_url: str
    policy: ResponsePolicy = DEFAULT_POLICY
    id_field: str = "id"

    def payload(self, event: OrderEvent) -> dict[str, Any]:
        return {"order_number": event.order.order_number, "event_type": event.event_type}

    def request(self, event: OrderEvent, downstream_id: str | None) -> HttpRequest:
        method = _METHODS[event.event_type]
        base = self.base_url.rstrip("/")
        headers = {"X-Event-Id": str(event.event_id)}
        if method == "POST":
            url = f"{base}/orders"
        elif downstream_id is not None:
            url = f"{base}/orders/{downstream_id}"
        else:
            url = f"{base}/orders/by-number/{event.order.order_number}"
        body = None if method == "DELETE" else json.dumps(self.payload(event), default=str).encode()
        if body is not None:
            headers["Content-Type"] = "application/json"
        return HttpRequest(method, url, body, headers)

    def downstream_id(self, event: OrderEvent, status: int, body: bytes) -> str | None:
        if event.event_type != "order.created" or not body:
            return None
        try:
            document = json.loads(body)
        except ValueError:
            return None
        value = document.get(self.id_field) if isinstance(document, dict) else None
        return str(value) if isinstance(value, str | int) and str(value) else None
