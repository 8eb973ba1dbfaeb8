"""`orderbus status` and `orderbus health`: a running daemon's sinks at a glance, read from its ``/status``
document, and whether it is alive or ready, read from ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from daemon.key_pairs import certificate_validity
from topics.errors import OrderbusError

_COLUMNS = ("sink", "partitions", "lag", "buffered", "in-flight", "parked", "circuit", "auth", "delivered",
            "duplicate", "dead-lettered")  # fmt: skip


class StatusError(OrderbusError):
    """The daemon's status could not be read."""


def fetch_status(base_url: str, *, timeout: float = 5.0, pinned: Path | None = None) -> dict[str, Any]:
    """The daemon's ``/status`` document. `pinned`: the certificate file of this host's own HTTPS listener; the
    listener must then show exactly that certificate (its name is not checked: the URL is a loopback address)."""
    url, code, reason, body = _get(base_url, "/status", timeout, pinned)
    if code != 200:
        raise StatusError(f"no orderbus daemon answers at {url}: HTTP {code} {reason}")
    try:
        document: dict[str, Any] = json.loads(body)
    except json.JSONDecodeError:
        raise StatusError(f"{url} did not answer with a status document; is that an orderbus daemon?") from None
    return document


def probe_health(
    base_url: str, *, component: str | None = None, ready: bool = False, timeout: float = 4.0, verify: bool = True
) -> tuple[bool, list[str]]:
    """`orderbus health`: whether the daemon answers ``/healthz`` (alive), or with `ready` (or a `component`)
    ``/readyz`` (ready for its part), and what it says, one line each. `StatusError` if nothing answers. Without
    `verify`, an HTTPS listener's certificate is not checked (this host's own, whichever it shows)."""
    if component is not None:
        path, ready = f"/readyz?component={quote(component, safe='.')}", True
    else:
        path = "/readyz" if ready else "/healthz"
    url, code, reason, body = _get(base_url, path, timeout, None, verify=verify)
    try:
        document = json.loads(body)
    except json.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise StatusError(f"{url} answered HTTP {code} {reason} without a health document; is that an orderbus daemon?")
    if not ready:
        return code == 200, [f"alive: {url}" if code == 200 else f"NOT ALIVE: {url} answered HTTP {code}"]
    if code not in (200, 503):  # an unknown component (400): its problem document names the ones there are
        raise StatusError(f"{url}: HTTP {code}: {document.get('detail', reason)}")
    lines = problems(document.get("reasons") or {}, document.get("degraded") or {})
    return code == 200, [f"{'ready' if code == 200 else 'not ready'}: {url}", *lines]


def _get(
    base_url: str, path: str, timeout: float, pinned: Path | None, *, verify: bool = True
) -> tuple[str, int, str, bytes]:
    """GET `path` of the daemon at `base_url`, whatever the status: (url, status, reason, body); over HTTPS from a
    listener that shows `pinned`'s certificate, else one the system trusts, or any without `verify`."""
    url = base_url.rstrip("/") + path
    if not url.startswith(("http://", "https://")):
        raise StatusError(f"--url must be an http(s) URL, got {base_url!r}")
    try:
        if pinned is not None and url.startswith("https://"):
            return url, *_pinned_get(url, pinned, timeout)
        context = None if verify else _any_certificate()
        # Straight to the daemon, whatever HTTP_PROXY the shell or an image sets for outbound traffic: through a
        # proxy, 127.0.0.1 is the proxy's own host, and a proxy that fails made a live daemon look dead.
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(url, timeout=timeout) as response:
                return url, response.status, response.reason, response.read()
        except urllib.error.HTTPError as answer:  # an answer all the same
            with answer:
                return url, answer.code, answer.reason, answer.read()
    except (http.client.BadStatusLine, ConnectionResetError) as exc:
        # What plain HTTP to a TLS port meets: under systemd credentials the operator's shell may not see the
        # webhook's HTTPS settings, which the unit's environment gives.
        hint = "; if that port speaks HTTPS (ingest.tls_certfile), pass --url https://..., or ask the admin port"
        said = f"no orderbus daemon answers at {url}: {exc!r}{hint if url.startswith('http:') else ''}"
        raise StatusError(said) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise StatusError(f"no orderbus daemon answers at {url}: {exc}") from None


def _pinned_get(url: str, pinned: Path, timeout: float) -> tuple[int, str, bytes]:
    """GET `url` from a listener that must show the first certificate of `pinned` (compared byte for byte)."""
    try:
        expected, _, _ = certificate_validity(pinned.read_text("ascii", errors="replace"))
    except (OSError, ValueError) as exc:
        raise StatusError(f"cannot read the listener's certificate {pinned}: {exc}") from None
    parts = urlsplit(url)
    context = _any_certificate()  # the comparison below is the check
    connection = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443, timeout=timeout, context=context)
    try:
        connection.connect()
        assert isinstance(connection.sock, ssl.SSLSocket)
        if connection.sock.getpeercert(binary_form=True) != expected:
            raise StatusError(
                f"{url} shows another certificate than {pinned}: not this host's orderbus, or one not reloaded since "
                "the file was renewed"
            )
        connection.request("GET", f"{parts.path}?{parts.query}" if parts.query else parts.path)
        response = connection.getresponse()
        return response.status, response.reason, response.read()
    finally:
        connection.close()


def _any_certificate() -> ssl.SSLContext:
    """A TLS client's context that takes whichever certificate this host's listener shows."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def render_status(document: dict[str, Any]) -> str:
    """A table, one row per sink, then why the daemon is not ready (if it is not)."""
    rows = [_COLUMNS]
    for name, sink in sorted(document.get("sinks", {}).items()):
        outcomes = sink.get("outcomes", {})
        partitions = sink.get("assigned_partitions", [])
        rows.append(
            (
                name,
                _ranges(partitions) or "none",
                str(sum(sink.get("lag", {}).values())),
                str(sink.get("buffered", 0)),
                str(sink.get("in_flight", 0)),
                str(sink.get("parked", 0)),
                _circuit(sink),
                "PAUSED" if sink.get("auth_paused") else "ok",
                str(outcomes.get("delivered", 0)),
                str(outcomes.get("duplicate", 0)),
                str(outcomes.get("dead_lettered", 0)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if len(rows) == 1:
        lines.append("(no sink enabled)")
    if (line := _membership_line(document.get("sinks", {}))) is not None:
        lines.append(line)
    for name, sink in sorted(document.get("sinks", {}).items()):  # see consumers.expiry
        if expired := sink.get("expired_records"):
            lines.append(
                f"{name}: {expired} RECORDS DELETED FROM KAFKA BEFORE THIS SINK READ THEM since the start: their "
                "orders did not reach it (the log names the partitions and offsets)"
            )
    ingest = document.get("ingest")
    if ingest is not None:
        if ingest.get("topic_missing"):
            line = f"ingest: TOPIC NOT FOUND: {ingest['topic_missing']}"
        elif ingest.get("kafka_refused"):
            line = f"ingest: KAFKA REFUSES: {ingest['kafka_refused']}"
        else:
            line = f"ingest: {'publishing' if ingest.get('kafka_available') else 'KAFKA UNREACHABLE'}"
            if not ingest.get("kafka_available") and ingest.get("kafka_unreachable"):
                line += f": {ingest['kafka_unreachable']}"  # the credentials, a certificate, the protocol, ...
        if ingest.get("key_store_error"):  # webhooks with a key get 503 until a batch is written again
            line += f"; KEY STORE FAILING: {ingest['key_store_error']}"
        if connections := ingest.get("connections"):  # see daemon.connection_gate
            busy, idle, limit = connections["busy"], connections["idle"], connections["limit"]
            line += f"; connections {busy + idle} of {limit} ({busy} busy)"
            if busy + idle >= limit:
                line += ": AT THE LIMIT"
            if refusing := connections.get("refusing"):
                line += f", {refusing} being refused"
        lines.append(line)
    if why := document.get("kafka_unreachable"):  # the sinks', without the ingest (whose line says it)
        lines.append(f"kafka: UNREACHABLE: {why}")
    for key, label in (("certificate", "certificate"), ("kafka_certificate", "kafka client certificate")):
        if (certificate := document.get(key)) is not None:
            lines.append(_certificate_line(certificate, label))
    lines += problems(document.get("not_ready", {}), document.get("degraded", {}))
    return "\n".join(lines)


def _certificate_line(certificate: Mapping[str, Any], label: str) -> str:
    """When a certificate (the webhook's, the Kafka client's) expires; what is wrong with that in capitals, with
    what to do: both in the daemon's words (an earlier daemon's document has no ``renewal``)."""
    if (problem := certificate.get("problem")) is not None:
        return f"{str(problem).upper()}; {certificate.get('renewal', 'renew it')}"
    days = float(certificate.get("seconds_left", 0)) / 86400
    return f"{label}: expires at {certificate.get('expires', '?')} ({days:.0f} days)"


def problems(not_ready: Mapping[str, str], degraded: Mapping[str, str]) -> list[str]:
    """``NOT READY <component>: <reason>``, then ``DEGRADED ...``, by component: as `orderbus status` prints them
    and the systemd status line (`daemon.lifecycle`) joins them."""
    return [
        f"{label} {component}: {reason}"
        for label, found in (("NOT READY", not_ready), ("DEGRADED", degraded))
        for component, reason in sorted(found.items())
    ]


def _membership_line(sinks: dict[str, Any]) -> str | None:
    """How the instance belongs to its sinks' groups, when it has a name (the same for every sink)."""
    for sink in sinks.values():
        membership = sink.get("membership") or {}
        if (name := membership.get("group_instance_id")) is not None:
            session = membership.get("session_timeout", 0)
            kept = f"session {session:g} s: a restart within it keeps the partitions"
            return f"group instance: {name} (static membership, {kept})"
    return None


def _circuit(sink: dict[str, Any]) -> str:
    """The circuit's state; the operator's pause; the downstream's hold (its Retry-After) while it lasts, else the
    ramp's limit while the sink ramps up after its circuit closed or a hold ended."""
    state = str(sink.get("circuit", "?"))
    if sink.get("paused_by_settings"):
        return f"{state}, PAUSED by its settings"
    held = sink.get("held_for") or 0.0
    if held > 0:
        return f"{state}, held by Retry-After: {held:.0f} s more"
    limit = sink.get("ramp_limit")
    return state if limit is None else f"{state}, ramping up: {limit} in flight"


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2,5"."""
    runs: list[list[int]] = []
    for number in sorted(numbers):
        if runs and runs[-1][1] + 1 == number:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)
