"""What a downstream system is to the engine: how an order event becomes its HTTP request, and its policy.

A sink module (crm, accounting, shipping) only says that; the engine owns retries, pacing, dead letters and
commits. `RestSink` is the common shape of such an API (create with POST, replace with PUT, cancel with DELETE);
the real sinks differ only in the fields they send (data minimisation) and their URL templates.

Bodies are canonical JSON (`canonical_json`: sorted keys, no spaces, amounts as decimal strings), so every retry
of one event sends the same bytes under the same ``Idempotency-Key``; a downstream that compares them sees the
same request, not a reuse of the key for another one.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, Protocol
from urllib.parse import quote, unquote, urlsplit

from consumers.masking import mask_url
from consumers.policy import DEFAULT_POLICY, EVENT_METHODS, ResponsePolicy
from topics.envelope import OrderEvent
from topics.errors import ConfigError

_ABSOLUTE: Final = re.compile(r"https?://[^\s/]+(/\S*)?")
MAX_DOWNSTREAM_ID: Final = 255  # characters of a downstream id kept from an answer (`RestSink.downstream_id`)


@dataclass(frozen=True, slots=True)
class Prepared:
    """An event as one sink will send it, made once when the record is fetched: all but the URL.

    The URL of an update or a cancel depends on the downstream id known at the time of the attempt, so it is
    added then (`Sink.request`). A buffered record holds this (~0.5 KB) instead of the decoded event (~10 KB),
    which keeps the engine's memory small while a sink is down and its buffer is full.
    """

    event_id: str
    event_type: str
    order_number: str
    method: str
    body: bytes | None
    headers: Mapping[str, str]


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

    def prepare(self, event: OrderEvent) -> Prepared:
        """`event` as this system's request: method, body (its fields only) and headers."""
        ...

    def request(self, prepared: Prepared, downstream_id: str | None) -> HttpRequest:
        """The request that applies the event; `downstream_id` is what this system's create returned, if known."""
        ...

    def downstream_id(self, prepared: Prepared, status: int, body: bytes, location: str | None = None) -> str | None:
        """The id this system gave the order in its answer to a create (`location`: the answer's Location), if any."""
        ...

    def read(self, order_number: str, downstream_id: str | None) -> HttpRequest:
        """A GET of the order as this system has it: by its downstream id if known, else by its number."""
        ...


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """`document` as UTF-8 JSON with sorted keys and no spaces: the same document always gives the same bytes.

    Amounts (`Decimal`) become decimal strings as written ("12.50", never a float); times become RFC 3339.
    """
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_plain
    ).encode()


def _plain(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} has no canonical JSON form")


@dataclass(frozen=True, slots=True)
class UrlTemplates:
    """Where a system's orders live. Placeholders: ``{base_url}``, ``{id}`` (by_id only), ``{order_number}``.

    `by_number` addresses an order whose downstream id is unknown (created before orderbus kept ids, or by
    another system). Values are percent-encoded into the path: an id from a downstream answer can never add a
    path segment or a query. Invalid templates raise `ConfigError` naming the template.
    """

    create: str = "{base_url}/orders"
    by_id: str = "{base_url}/orders/{id}"
    by_number: str = "{base_url}/orders/by-number/{order_number}"

    def __post_init__(self) -> None:
        allowed = {"create": {"base_url", "order_number"}, "by_id": {"base_url", "id", "order_number"}}
        required = {"by_id": "id", "by_number": "order_number"}
        for item in fields(self):
            _check_template(
                item.name,
                getattr(self, item.name),
                allowed.get(item.name, {"base_url", "order_number"}),
                required.get(item.name),
            )


def _check_template(name: str, template: str, allowed: set[str], required: str | None) -> None:
    shown = repr(mask_url(template))  # a template may hold a credential in its user info or query
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{name}: {shown} is not a URL template: {exc}") from None
    used = set()
    for _, placeholder, spec, conversion in parts:
        if placeholder is None:
            continue
        if placeholder not in allowed or spec or conversion:
            known = ", ".join("{" + known + "}" for known in sorted(allowed))
            raise ConfigError(f"{name}: {shown}: unknown placeholder {{{placeholder}}}; allowed: {known}")
        used.add(placeholder)
    if required is not None and required not in used:
        raise ConfigError(f"{name}: {shown} must contain {{{required}}}")
    example = template.format(base_url="http://example.invalid", id="1", order_number="SO-1")
    if not _ABSOLUTE.fullmatch(example):
        raise ConfigError(f"{name}: {shown} must give an absolute http(s) URL (start with {{base_url}})")
    probed = template.format(base_url="http://example.invalid", id=".other.example", order_number=".other.example")
    if urlsplit(probed).netloc != urlsplit(example).netloc:
        # "{base_url}{id}" with an answer's id ".attacker.example": the order and the credentials to that host.
        raise ConfigError(f"{name}: {shown}: {{id}} and {{order_number}} go after the host, behind a '/'")


def usable_id(value: str | None) -> str | None:
    """`value` if it can address an order in a URL; None for one that cannot: empty, ``.`` or ``..`` (which
    percent-encoding leaves as they are and a proxy or framework resolves to another resource), with control
    characters, or longer than `MAX_DOWNSTREAM_ID` characters."""
    if value is None or value in ("", ".", "..") or len(value) > MAX_DOWNSTREAM_ID or not value.isprintable():
        return None
    return value


def _last_segment(location: str) -> str | None:
    """The last non-empty path segment of a Location (an absolute URL or a path), percent-decoded: the URLs built
    from it encode it again (`UrlTemplates.render`)."""
    path = urlsplit(location.strip()).path
    segment = next((part for part in reversed(path.split("/")) if part), None)
    return unquote(segment) if segment is not None else None


@dataclass(frozen=True)
class RestSink:
    """A REST resource API: POST to `urls.create`, PUT/DELETE to `urls.by_id` (or `urls.by_number`).

    Without a known downstream id (the create happened before orderbus kept ids, or another system created it),
    updates and cancels address the order by number. Subclasses override `payload` to send only the fields
    their purpose needs; DELETE never has a body.
    """

    name: str
    base_url: str
    policy: ResponsePolicy = DEFAULT_POLICY
    id_field: str = "id"
    urls: UrlTemplates = UrlTemplates()

    def payload(self, event: OrderEvent) -> dict[str, Any]:
        """The body of a create or a replace. The generic sink sends the order reference only."""
        return {"order_number": event.order.order_number, "event_type": event.event_type}

    def prepare(self, event: OrderEvent) -> Prepared:
        method = EVENT_METHODS[event.event_type]
        event_id = str(event.event_id)
        headers = {"X-Event-Id": event_id}
        body = None
        if method != "DELETE":
            body = canonical_json(self.payload(event))
            headers["Content-Type"] = "application/json"
        return Prepared(event_id, event.event_type, event.order.order_number, method, body, headers)

    def request(self, prepared: Prepared, downstream_id: str | None) -> HttpRequest:
        url = self.url(prepared, None if prepared.method == "POST" else downstream_id)
        return HttpRequest(prepared.method, url, prepared.body, prepared.headers)

    def url(self, prepared: Prepared, downstream_id: str | None) -> str:
        """Create: `urls.create`; otherwise the order by its downstream id, or by its number without one (or with
        one that is no path segment: kept before such ids were refused, see `usable_id`)."""
        if prepared.event_type == "order.created":
            return self._format(self.urls.create, prepared.order_number, None)
        return self._order_url(prepared.order_number, downstream_id)

    def read(self, order_number: str, downstream_id: str | None) -> HttpRequest:
        return HttpRequest("GET", self._order_url(order_number, downstream_id))

    def _order_url(self, order_number: str, downstream_id: str | None) -> str:
        """The order's own URL: by its downstream id when it has a usable one, else by its number."""
        downstream_id = usable_id(downstream_id)
        template = self.urls.by_id if downstream_id is not None else self.urls.by_number
        return self._format(template, order_number, downstream_id)

    def _format(self, template: str, order_number: str, downstream_id: str | None) -> str:
        return template.format(
            base_url=self.base_url.rstrip("/"),
            id=quote(downstream_id or "", safe=""),
            order_number=quote(order_number, safe=""),
        )

    def downstream_id(self, prepared: Prepared, status: int, body: bytes, location: str | None = None) -> str | None:
        """`id_field` of the answer to a create: a 2xx, or a 409 that names the order already there; else, for a
        201 Created, the last path segment of its Location (RFC 9110: the resource created), as many APIs answer
        without a body. Not a 202's: its Location is where to ask how the work goes, not the order.

        None (the order is then addressed by its number) for an id `usable_id` refuses."""
        if prepared.event_type != "order.created" or not (200 <= status < 300 or status == 409):
            return None
        found = self._id_in(body) if body else None
        if found is None and status == 201 and location:
            found = usable_id(_last_segment(location))
        return found

    def _id_in(self, body: bytes) -> str | None:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # deeply nested JSON exhausts the parser's stack
            return None
        value = document.get(self.id_field) if isinstance(document, dict) else None
        if isinstance(value, bool) or not isinstance(value, str | int):
            return None
        return usable_id(str(value))
