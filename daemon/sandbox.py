"""The sandbox downstream systems: a realistic fake CRM, accounting tool and shipping provider over real HTTP.

Tests, the demo and benchmarks need a downstream that behaves like a real API (ids, idempotency keys, auth,
503s, Retry-After, lost responses) and that *remembers what it applied*, so that "exactly once in effect" can be
checked from the outside. One server plays every system; the system is the first path segment.

Resource API (any system name matching ``[a-z][a-z0-9_-]*``)::

    POST   /{system}/orders           create: 201 {"id": "<system>-<n>", "order_number", "status", "version"}
    GET    /{system}/orders/{id}      read back: 200 {"id", "order_number", "status", "version", "body"}
    PUT    /{system}/orders/{id}      replace: 200; 404 unknown; 409 cancelled
    DELETE /{system}/orders/{id}      cancel: 204 (the order stays, status "cancelled"); 404 unknown
    GET|PUT|DELETE /{system}/orders/by-number/{order_number}     the same, for sinks that keep no downstream id

A POST for an order number the system already holds answers 409 {"error": "conflict", "id": ...} (unless
``unique_order_numbers`` is off). An ``Idempotency-Key`` on POST/PUT/DELETE is honoured per system: the first
2xx is stored and replayed (``Idempotent-Replayed: true``) for the same method+path+body, applying nothing;
the same key with anything else is a 422. Fault answers are never stored, so a retry is evaluated afresh.

A request meets, in this order: auth (401 before anything else), its system's script or faults (503, 429 with
Retry-After, 400, delays, connection resets; see `daemon.sandbox_faults`), then the API itself. Every applied
change is appended to the ledger: ``{seq, system, method, order_number, id, idempotency_key, event_id, at}``
(``event_id`` from the ``X-Event-Id`` header).

Control API (never faulted, never authenticated)::

    GET  /_sandbox/ledger?system=&since=&min_count=&wait=   applied effects in order; waits up to `wait` s
    GET  /_sandbox/requests?system=&since=                  raw request log (no Authorization header)
    GET  /_sandbox/stats                                    counts per system and in total
    GET  /_sandbox/orders?system=                           every order's current state, fault-free
    POST /_sandbox/reset            {"seed": n}?            forget everything; faults and config as at start
    GET|POST /_sandbox/faults       {"crm": {...}, "*": {...}}        replace faults (see `daemon.sandbox_faults`)
    GET|POST /_sandbox/script       {"crm": [step, ...]}              replace scripts; GET shows what is left
    GET|POST /_sandbox/config       {"crm": {"auth": "bearer:T", "idempotency": true, "unique_order_numbers": true}}
    POST /_sandbox/oauth/token      OAuth2 client credentials grant (RFC 6749 §4.4), see below
    POST /_sandbox/oauth/revoke     {"client_id": "..."}?   revoke issued tokens (all, or one client's)

Auth specs: ``bearer:TOKEN``, ``basic:USER:PASSWORD``, ``header:NAME:VALUE``, ``oauth2:CLIENT_ID:SECRET:LIFETIME_S``.
A system with an oauth2 spec accepts only ``Authorization: Bearer <token>`` with a token the token endpoint issued
to that client, unexpired (by the sandbox's clock) and not revoked. The token endpoint takes a form-encoded
``grant_type=client_credentials`` (``scope`` optional, echoed back) with the client's id and secret as HTTP Basic
(id and secret form-encoded first, RFC 6749 §2.3.1) or as ``client_id``/``client_secret`` form fields, and answers
``{"access_token", "token_type": "Bearer", "expires_in"}`` with opaque random tokens; wrong credentials get 401
``{"error": "invalid_client"}``. ``/_sandbox/stats`` counts its requests under ``"oauth"``.

From Python: `build_sandbox_app` (in-process, for ``aiohttp.test_utils``), `SandboxClient` (the control API) and
`start_sandbox_process` (``python -m daemon.sandbox --port N``), so that the sandbox never competes with the
daemon's event loop in benchmarks. Nothing is logged per request: bodies hold personal data and stay in memory
only, for read-back.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypedDict, cast
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web

from daemon.logs import configure
from daemon.sandbox_faults import Auth, Faults, Outcome, Script, SystemConfig, parse_faults, parse_scripts
from topics.errors import ConfigError, OrderbusError

log = logging.getLogger(__name__)

CONTROL: Final = "/_sandbox"
_QUIET: Final = Faults()
_EFFECTS: Final = frozenset({"POST", "PUT", "DELETE"})


class SandboxError(OrderbusError):
    """The sandbox process did not start, or a control request was refused."""


class LedgerEntry(TypedDict):
    """One applied effect; ``at`` is epoch seconds from the sandbox's clock."""

    seq: int
    system: str
    method: str
    order_number: str
    id: str
    idempotency_key: str | None
    event_id: str | None
    at: float


class _RecordBase(TypedDict):
    seq: int
    system: str
    method: str
    path: str
    idempotency_key: str | None
    event_id: str | None
    order_number: str | None
    status: int | None
    outcome: str
    fault: str | None
    received_at: float
    answered_at: float | None


class RequestRecord(_RecordBase):
    """One request as received. ``outcome``: pending, answered, replayed, key_conflict, reset, client_gone."""

    headers: dict[str, str]  # without Authorization


class _Logged(_RecordBase):
    headers: tuple[tuple[str, str], ...]  # a tuple, so that the collector can untrack the record (see `_System`)


@dataclass(frozen=True, slots=True)
class _Answer:
    """A response as data, so that an idempotency key can replay it byte for byte."""

    status: int
    body: bytes = b""
    location: str = ""

    def response(self, *, replayed: bool = False, retry_after: str | None = None) -> web.Response:
        headers = {"Location": self.location} if self.location else {}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        content_type = "application/json" if self.body else None
        return web.Response(status=self.status, body=self.body or None, content_type=content_type, headers=headers)

    def pack(self) -> bytes:
        return f"{self.status} {self.location}\n".encode() + self.body

    @classmethod
    def unpack(cls, packed: bytes) -> _Answer:
        head, _, body = packed.partition(b"\n")
        status, _, location = head.decode().partition(" ")
        return cls(int(status), body, location)


def _answer(status: int, data: Any = None, location: str = "") -> _Answer:
    return _Answer(status, b"" if data is None else json.dumps(data).encode(), location)


_NOT_FOUND: Final = _answer(404, {"error": "not_found"})


@dataclass(slots=True)
class _System:
    """The state of one system.

    Orders, keys and the ledger live in dicts whose values are only str, int or bytes (bodies as received, not
    parsed). CPython never tracks such dicts, so its collector never walks them: with parsed bodies and an object
    per order, each full collection paused the server for 200-650 ms once a benchmark had stored 100k orders.
    """

    name: str
    rng: random.Random
    requests: deque[_Logged]
    number: dict[str, str] = field(default_factory=dict)  # id -> order number
    status: dict[str, str] = field(default_factory=dict)  # id -> "open" | "cancelled"
    version: dict[str, int] = field(default_factory=dict)  # id -> 1, 2, ... (+1 per applied change)
    body: dict[str, bytes] = field(default_factory=dict)  # id -> the last body as received
    by_number: dict[str, str] = field(default_factory=dict)  # order number -> id (the newest)
    key_fingerprint: dict[str, bytes] = field(default_factory=dict)  # Idempotency-Key -> digest of method, path, body
    key_answer: dict[str, bytes] = field(default_factory=dict)  # Idempotency-Key -> `_Answer.pack()`
    ledger: dict[int, bytes] = field(default_factory=dict)  # seq -> the entry as JSON
    script: Script = field(default_factory=Script)
    counts: dict[str, int] = field(default_factory=dict)
    by_status: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    max_concurrent: int = 0

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def summary(self, order_id: str) -> dict[str, Any]:
        return {
            "id": order_id,
            "order_number": self.number[order_id],
            "status": self.status[order_id],
            "version": self.version[order_id],
        }

    def view(self, order_id: str) -> bytes:
        """The read-back JSON: the summary plus ``"body"``, the last body as received."""
        return json.dumps(self.summary(order_id)).encode()[:-1] + b', "body": ' + self.body[order_id] + b"}"

    def stats(self) -> dict[str, Any]:
        names = ("requests", "applied", "duplicate_requests", "key_conflicts", "resets", "client_gone")
        return {
            **{name: self.counts.get(name, 0) for name in names},
            "by_status": {str(code): n for code, n in sorted(self.by_status.items())},
            "in_flight": self.in_flight,
            "max_concurrent": self.max_concurrent,
        }


@dataclass(slots=True)
class _Call:
    """One request on its way through `Sandbox._serve`."""

    request: web.Request
    method: str
    system: _System
    config: SystemConfig
    record: _Logged
    raw: bytes
    payload: Any = None


class Sandbox:
    """Every system's state and the handlers of both APIs; `build_sandbox_app` routes to them."""

    def __init__(
        self,
        *,
        seed: int = 0,
        faults: Mapping[str, Faults] | None = None,
        config: Mapping[str, SystemConfig] | None = None,
        clock: Callable[[], float] = time.time,
        max_request_log: int = 20_000,
        keep_bodies: bool = True,
    ) -> None:
        """`keep_bodies` False stores no bodies (read-back answers ``"body": null``): for long benchmarks, where
        1.3 KB orders would otherwise hold about 3.7 KB each rather than 2.3 KB.
        """
        self._initial = (dict(faults or {}), dict(config or {}))
        self._clock = clock
        self._max_request_log = max_request_log
        self._keep_bodies = keep_bodies
        self._ledger_changed = asyncio.Event()
        self._ledger_waiters = 0
        self._in_flight = 0  # requests still in flight keep counting it down, so a reset leaves it alone
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """Forget every order, key, effect, request and script; faults and config return to their start-up values."""
        self.seed = seed
        self.faults: dict[str, Faults] = dict(self._initial[0])
        self.config: dict[str, SystemConfig] = dict(self._initial[1])
        self.systems: dict[str, _System] = {}
        self._ledger: dict[int, bytes] = {}  # every system's, by seq (1, 2, ...)
        self._request_seq = 0
        self._max_concurrent = self._in_flight
        self._tokens: dict[str, tuple[str, float]] = {}  # issued token -> (client id, expiry by self._clock)
        self.oauth: dict[str, Any] = {"token_requests": 0, "issued": 0, "refused": 0, "scopes": {}}

    def system(self, name: str) -> _System:
        state = self.systems.get(name)
        if state is None:
            # A string seed per system: one system's traffic never shifts another's draws.
            rng = random.Random(f"{self.seed}:{name}")
            state = self.systems[name] = _System(name, rng, deque(maxlen=self._max_request_log))
        return state

    def ledger(self, system: str | None = None, since: int = 0) -> list[LedgerEntry]:
        """The applied effects after seq `since`, in order (for in-process tests; HTTP clients use /ledger)."""
        return [json.loads(entry) for entry in self._ledger_since(system, since)]

    def _config_of(self, name: str) -> SystemConfig:
        return self.config.get(name) or self.config.get("*") or SystemConfig()

    def _faults_of(self, name: str) -> Faults:
        return self.faults.get(name) or self.faults.get("*") or _QUIET

    # ---- the resource API -------------------------------------------------------------------------------------

    async def resource(self, request: web.Request) -> web.StreamResponse:
        """Every resource route: log the request, then answer it, or abort the connection when told to."""
        system = self.system(request.match_info["system"])
        headers = request.headers
        self._request_seq += 1
        record: _Logged = {
            "seq": self._request_seq,
            "system": system.name,
            "method": request.method,
            "path": request.path,
            "headers": tuple((k, v) for k, v in headers.items() if k.lower() != "authorization"),
            "idempotency_key": headers.get("Idempotency-Key"),
            "event_id": headers.get("X-Event-Id"),
            "order_number": None,
            "status": None,
            "outcome": "pending",
            "fault": None,
            "received_at": self._clock(),
            "answered_at": None,
        }
        system.requests.append(record)
        system.count("requests")
        system.in_flight += 1
        self._in_flight += 1
        system.max_concurrent = max(system.max_concurrent, system.in_flight)
        self._max_concurrent = max(self._max_concurrent, self._in_flight)
        try:
            answer = await self._serve(request, system, record)
        except asyncio.CancelledError:
            # handler_cancellation: the client went away while we were holding its request.
            record["outcome"] = "client_gone"
            system.count("client_gone")
            raise
        finally:
            system.in_flight -= 1
            self._in_flight -= 1
        record["answered_at"] = self._clock()
        if answer is None:
            record["outcome"] = "reset"
            system.count("resets")
            _reset_connection(request)
            return web.Response(status=204)  # never sent: the connection is gone
        if record["outcome"] == "pending":
            record["outcome"] = "answered"
        record["status"] = answer.status
        system.by_status[answer.status] = system.by_status.get(answer.status, 0) + 1
        return answer

    async def _serve(self, request: web.Request, system: _System, record: _Logged) -> web.Response | None:
        """Auth, then script or faults, then the request itself; None means: drop the connection."""
        config = self._config_of(system.name)
        if config.auth is not None and not self._accepts(config.auth, request.headers):
            record["fault"] = "auth"
            challenge = {"WWW-Authenticate": "Basic" if config.auth.scheme == "basic" else "Bearer"}
            return web.json_response({"error": "unauthorized"}, status=401, headers=challenge)
        call = _Call(request, request.method, system, config, record, await request.read())
        malformed = False
        if call.method in ("POST", "PUT"):
            try:
                call.payload = json.loads(call.raw)
            except ValueError:
                malformed = True
        order_number = record["order_number"] = self._order_number(call)
        step = system.script.take(call.method, order_number) if system.script else None
        faults = self._faults_of(system.name)
        outcome: Outcome | None = None
        if step is not None:
            outcome = step.outcome(self._clock())
        elif faults.active:
            outcome = faults.draw(system.rng, order_number, self._clock())
        if outcome is not None:
            record["fault"] = outcome.fault
            if outcome.delay_s > 0:
                await asyncio.sleep(outcome.delay_s)
            if outcome.reset:
                return None
            if outcome.status is not None:
                return _answer(outcome.status, outcome.body).response(retry_after=outcome.retry_after)
        if malformed:
            return _answer(400, {"error": "malformed_json", "message": "the body is not JSON"}).response()
        response = self._once(call)
        if outcome is not None and outcome.reset_after_effect:
            return None
        return response

    def _accepts(self, auth: Auth, headers: Mapping[str, str]) -> bool:
        if auth.scheme != "oauth2":
            return auth.accepts(headers)
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        issued = self._tokens.get(token) if scheme.lower() == "bearer" else None
        return issued is not None and issued[0] == auth.client_id and self._clock() < issued[1]

    def _order_number(self, call: _Call) -> str | None:
        """The order a request is about (for script matches, rejects and the logs), whatever its route."""
        match_info = call.request.match_info
        if "number" in match_info:
            return match_info["number"]
        if "id" in match_info:
            return call.system.number.get(match_info["id"])
        number = call.payload.get("order_number") if isinstance(call.payload, dict) else None
        return number if isinstance(number, str) else None

    def _once(self, call: _Call) -> web.Response:
        """Apply the request at most once per idempotency key; store a 2xx answer to replay it."""
        key, system, record = call.record["idempotency_key"], call.system, call.record
        if key is None or not call.config.idempotency or call.method not in _EFFECTS:
            return self._apply(call).response()
        fingerprint = hashlib.blake2b(f"{call.method} {call.request.path}\n".encode(), digest_size=16)
        fingerprint.update(call.raw)
        stored = system.key_fingerprint.get(key)
        if stored is not None:
            if stored != fingerprint.digest():
                record["outcome"] = "key_conflict"
                system.count("key_conflicts")
                message = "this Idempotency-Key was used with another method, path or body"
                return _answer(422, {"error": "idempotency_key_reused", "message": message}).response()
            record["outcome"] = "replayed"
            system.count("duplicate_requests")
            return _Answer.unpack(system.key_answer[key]).response(replayed=True)
        answer = self._apply(call)
        if 200 <= answer.status < 300:
            system.key_fingerprint[key] = fingerprint.digest()
            system.key_answer[key] = answer.pack()
        return answer.response()

    def _apply(self, call: _Call) -> _Answer:
        """The API's own semantics: create, read, replace or cancel, and the ledger entry of every change."""
        method, system, payload = call.method, call.system, call.payload
        if method == "POST":
            number = payload.get("order_number") if isinstance(payload, dict) else None
            if not isinstance(number, str) or not number:
                return _invalid("order_number", "is required (a non-empty string)")
            existing = system.by_number.get(number)
            if existing is not None and call.config.unique_order_numbers:
                return _answer(409, {"error": "conflict", "message": "order number exists", "id": existing})
            order_id = f"{system.name}-{len(system.number) + 1}"
            system.number[order_id], system.status[order_id], system.version[order_id] = number, "open", 1
            system.body[order_id] = call.raw if self._keep_bodies else b"null"
            system.by_number[number] = order_id
            self._record_effect(call, order_id)
            return _answer(201, system.summary(order_id), location=f"/{system.name}/orders/{order_id}")
        match_info = call.request.match_info
        order_id = match_info.get("id") or system.by_number.get(match_info["number"], "")
        if order_id not in system.number:
            return _NOT_FOUND
        if method == "GET":
            return _Answer(200, system.view(order_id))
        if method == "PUT":
            if not isinstance(payload, dict):
                return _invalid("body", "must be a JSON object")
            if payload.get("order_number", system.number[order_id]) != system.number[order_id]:
                return _invalid("order_number", "does not match the order being replaced")
            if system.status[order_id] == "cancelled":
                return _answer(409, {"error": "conflict", "message": "the order is cancelled", "id": order_id})
            system.body[order_id] = call.raw if self._keep_bodies else b"null"
        else:
            system.status[order_id] = "cancelled"
        system.version[order_id] += 1
        self._record_effect(call, order_id)
        return _answer(200, system.summary(order_id)) if method == "PUT" else _Answer(204)

    def _record_effect(self, call: _Call, order_id: str) -> None:
        system = call.system
        system.count("applied")
        seq = len(self._ledger) + 1
        entry: LedgerEntry = {
            "seq": seq,
            "system": system.name,
            "method": call.method,
            "order_number": system.number[order_id],
            "id": order_id,
            "idempotency_key": call.record["idempotency_key"],
            "event_id": call.record["event_id"],
            "at": self._clock(),
        }
        self._ledger[seq] = system.ledger[seq] = json.dumps(entry).encode()
        if self._ledger_waiters:
            self._ledger_changed.set()
            self._ledger_changed = asyncio.Event()

    # ---- the control API --------------------------------------------------------------------------------------

    async def get_ledger(self, request: web.Request) -> web.Response:
        """The ledger; with ``min_count`` and ``wait`` it answers once that many entries exist or `wait` passed."""
        name = request.query.get("system")
        since, min_count = _int_query(request, "since"), _int_query(request, "min_count")
        wait = _seconds_query(request, "wait")
        entries = self._ledger_since(name, since)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        self._ledger_waiters += 1
        try:
            while len(entries) < min_count and (remaining := deadline - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ledger_changed.wait(), remaining)
                entries = self._ledger_since(name, since)
        finally:
            self._ledger_waiters -= 1
        return _json_array(entries)

    def _ledger_since(self, name: str | None, since: int) -> list[bytes]:
        if name is None:
            return [self._ledger[seq] for seq in range(since + 1, len(self._ledger) + 1)]
        state = self.systems.get(name)
        return [] if state is None else [entry for seq, entry in state.ledger.items() if seq > since]

    async def get_requests(self, request: web.Request) -> web.Response:
        since = _int_query(request, "since")
        names = [request.query["system"]] if "system" in request.query else sorted(self.systems)
        found = [r for n in names if n in self.systems for r in self.systems[n].requests if r["seq"] > since]
        found.sort(key=lambda r: r["seq"])
        return web.json_response([{**r, "headers": dict(r["headers"])} for r in found])

    async def get_stats(self, _: web.Request) -> web.Response:
        systems = {name: state.stats() for name, state in sorted(self.systems.items())}
        total = _System("", random.Random(), deque()).stats()
        for stats in systems.values():
            for key, value in stats.items():
                if key == "by_status":
                    for code, n in value.items():
                        total["by_status"][code] = total["by_status"].get(code, 0) + n
                else:
                    total[key] += value
        total["by_status"] = dict(sorted(total["by_status"].items(), key=lambda item: int(item[0])))
        total["max_concurrent"] = self._max_concurrent
        return web.json_response({"systems": systems, "total": total, "oauth": self.oauth})

    async def get_orders(self, request: web.Request) -> web.Response:
        state = self.systems.get(request.query.get("system", ""))
        if state is None:
            return web.json_response([])
        return _json_array(map(state.view, state.number))

    async def post_reset(self, request: web.Request) -> web.Response:
        data = await _json_body(request, default={})
        seed = data.get("seed", self.seed) if isinstance(data, dict) else None
        if not isinstance(seed, int) or isinstance(seed, bool):
            return _config_error("reset.seed: expected an integer")
        self.reset(seed)
        return web.json_response({"seed": seed})

    async def faults_endpoint(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.faults.update(parse_faults(await _json_body(request)))
            except ConfigError as exc:
                return _config_error(str(exc))
        return web.json_response({name: faults.as_json() for name, faults in sorted(self.faults.items())})

    async def script_endpoint(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                scripts = parse_scripts(await _json_body(request))
            except ConfigError as exc:
                return _config_error(str(exc))
            for name, script in scripts.items():
                self.system(name).script = script
        return web.json_response({name: s.script.remaining() for name, s in sorted(self.systems.items())})

    async def config_endpoint(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            data = await _json_body(request)
            try:
                if not isinstance(data, dict):
                    raise ConfigError("config: expected a JSON object of systems")
                for name, value in data.items():
                    self.config[name] = self.config.get(name, SystemConfig()).updated(value, f"config.{name}")
            except ConfigError as exc:
                return _config_error(str(exc))
        return web.json_response({name: config.as_json() for name, config in sorted(self.config.items())})

    # ---- the OAuth2 token endpoint --------------------------------------------------------------------------------

    async def oauth_token(self, request: web.Request) -> web.Response:
        """Issue a bearer token to a client named by some system's ``oauth2:`` auth spec (client credentials)."""
        self.oauth["token_requests"] += 1
        if request.content_type != "application/x-www-form-urlencoded":
            return self._token_error(400, "invalid_request")
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return self._token_error(400, "unsupported_grant_type")
        client_id, secret = _client_credentials(request.headers.get("Authorization", ""), form)
        auth = next(
            (
                config.auth
                for config in self.config.values()
                if config.auth is not None and config.auth.scheme == "oauth2" and config.auth.client_id == client_id
            ),
            None,
        )
        if auth is None or not hmac.compare_digest(secret.encode(), auth.client_secret.encode()):
            return self._token_error(401, "invalid_client")
        token = secrets.token_urlsafe(24)
        self._tokens[token] = (auth.client_id, self._clock() + auth.lifetime_s)
        self.oauth["issued"] += 1
        lifetime = int(auth.lifetime_s) if auth.lifetime_s.is_integer() else auth.lifetime_s
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}
        scope = form.get("scope")
        if isinstance(scope, str):
            answer["scope"] = scope
            self.oauth["scopes"][scope] = self.oauth["scopes"].get(scope, 0) + 1
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    def _token_error(self, status: int, error: str) -> web.Response:
        self.oauth["refused"] += 1
        headers = {"WWW-Authenticate": "Basic"} if status == 401 else {}
        return web.json_response({"error": error}, status=status, headers=headers)

    async def oauth_revoke(self, request: web.Request) -> web.Response:
        """Revoke every issued token, or one client's: their next use is a 401."""
        data = await _json_body(request, default={})
        client_id = data.get("client_id") if isinstance(data, dict) else None
        revoked = [token for token, (owner, _) in self._tokens.items() if client_id in (None, owner)]
        for token in revoked:
            del self._tokens[token]
        return web.json_response({"revoked": len(revoked)})


def _client_credentials(authorization: str, form: Mapping[str, Any]) -> tuple[str, str]:
    """The client's id and secret: from HTTP Basic (each form-encoded, RFC 6749 §2.3.1), else from the form."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except ValueError:
            return "", ""
        client_id, _, secret = decoded.partition(":")
        return unquote_plus(client_id), unquote_plus(secret)
    given_id, given_secret = form.get("client_id"), form.get("client_secret")
    return (given_id if isinstance(given_id, str) else ""), (given_secret if isinstance(given_secret, str) else "")


SANDBOX: Final = web.AppKey("sandbox", Sandbox)


def build_sandbox_app(sandbox: Sandbox | None = None) -> web.Application:
    """The aiohttp application; ``app[SANDBOX]`` is its state, for tests that want to look inside."""
    sandbox = sandbox or Sandbox()
    app = web.Application()
    app[SANDBOX] = sandbox
    add = app.router.add_route
    for method, path, handler in (
        ("GET", "/ledger", sandbox.get_ledger),
        ("GET", "/requests", sandbox.get_requests),
        ("GET", "/stats", sandbox.get_stats),
        ("GET", "/orders", sandbox.get_orders),
        ("POST", "/reset", sandbox.post_reset),
        ("*", "/faults", sandbox.faults_endpoint),
        ("*", "/script", sandbox.script_endpoint),
        ("*", "/config", sandbox.config_endpoint),
        ("POST", "/oauth/token", sandbox.oauth_token),
        ("POST", "/oauth/revoke", sandbox.oauth_revoke),
    ):
        add(method, CONTROL + path, handler)
    system = "/{system:[a-z][a-z0-9_-]{0,31}}/orders"
    add("POST", system, sandbox.resource)
    for method in ("GET", "PUT", "DELETE"):
        add(method, system + "/{id:[^/]+}", sandbox.resource)
        add(method, system + "/by-number/{number:[^/]+}", sandbox.resource)
    return app


def _invalid(field_name: str, message: str) -> _Answer:
    return _answer(400, {"error": "validation_failed", "errors": [{"field": field_name, "message": message}]})


def _json_array(items: Iterable[bytes]) -> web.Response:
    """A JSON array of items that are JSON already (ledger entries, order views): no parse, no dump."""
    return web.Response(body=b"[" + b",".join(items) + b"]", content_type="application/json")


def _config_error(message: str) -> web.Response:
    return web.json_response({"error": "invalid_config", "message": message}, status=400)


async def _json_body(request: web.Request, default: Any = None) -> Any:
    raw = await request.read()
    if not raw and default is not None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "malformed_json"}', content_type="application/json") from None


def _int_query(request: web.Request, name: str) -> int:
    value = request.query.get(name, "0")
    if not value.isdigit():
        raise web.HTTPBadRequest(text=f'{{"error": "{name} must be a non-negative integer"}}')
    return int(value)


def _seconds_query(request: web.Request, name: str) -> float:
    try:
        value = float(request.query.get(name, "0"))
    except ValueError:
        value = -1.0
    if not 0 <= value <= 600:
        raise web.HTTPBadRequest(text=f'{{"error": "{name} must be seconds between 0 and 600"}}')
    return value


def _reset_connection(request: web.Request) -> None:
    """Abort with a TCP RST (SO_LINGER 0): the client sees "connection reset", never a response."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# ---- the Python client, for tests and benchmarks ----------------------------------------------------------------


class SandboxClient:
    """The control API from Python. Pass a session to share one (e.g. a `TestClient`'s), else it owns one."""

    def __init__(self, base_url: str, *, session: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> SandboxClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def ledger(self, system: str | None = None, *, since: int = 0) -> list[LedgerEntry]:
        """Applied effects in order; `since` is the last ``seq`` already seen."""
        return cast(list[LedgerEntry], await self._call("GET", "/ledger", _query(system=system, since=since)))

    async def wait_ledger(
        self, system: str | None, count: int, *, since: int = 0, timeout: float = 10.0
    ) -> list[LedgerEntry]:
        """The ledger once it holds `count` entries (after `since`); the server waits, nobody polls.

        Raises `SandboxError` listing what arrived when `timeout` passes first.
        """
        query = _query(system=system, since=since, min_count=count, wait=timeout)
        entries = cast(list[LedgerEntry], await self._call("GET", "/ledger", query, timeout=timeout + 5))
        if len(entries) < count:
            raise SandboxError(f"ledger of {system or 'all systems'}: {len(entries)} of {count} effects: {entries}")
        return entries

    async def requests(self, system: str | None = None, *, since: int = 0) -> list[RequestRecord]:
        return cast(list[RequestRecord], await self._call("GET", "/requests", _query(system=system, since=since)))

    async def stats(self) -> dict[str, Any]:
        """``{"systems": {name: counts}, "total": counts, "oauth": counts}``; see `_System.stats` for the counts.

        ``oauth``: ``token_requests`` (every request to the token endpoint), ``issued``, ``refused`` and
        ``scopes`` (issued tokens per requested scope).
        """
        return cast(dict[str, Any], await self._call("GET", "/stats"))

    async def orders(self, system: str) -> list[dict[str, Any]]:
        """Every order of `system` as ``{"id", "order_number", "status", "version", "body"}``, fault-free."""
        return cast(list[dict[str, Any]], await self._call("GET", "/orders", {"system": system}))

    async def script(self, system: str, steps: Sequence[Mapping[str, Any]]) -> None:
        """Replace `system`'s script (see `daemon.sandbox_faults.Step` for a step's keys)."""
        await self._call("POST", "/script", json_body={system: list(steps)})

    async def remaining_script(self, system: str) -> list[dict[str, Any]]:
        scripts = cast(dict[str, list[dict[str, Any]]], await self._call("GET", "/script"))
        return scripts.get(system, [])

    async def faults(self, system: str, **faults: Any) -> None:
        """Replace `system`'s faults (``"*"``: every system without its own); no keywords: a quiet system."""
        await self._call("POST", "/faults", json_body={system: faults})

    async def configure(self, system: str, **config: Any) -> None:
        """Change `system`'s ``auth`` (spec or None), ``idempotency`` or ``unique_order_numbers``."""
        await self._call("POST", "/config", json_body={system: config})

    async def configure_auth(self, system: str, spec: str | None) -> None:
        """``bearer:TOKEN``, ``basic:USER:PASSWORD``, ``header:NAME:VALUE``, ``oauth2:CLIENT_ID:SECRET:LIFETIME_S``
        or None (no auth).
        """
        await self.configure(system, auth=spec)

    async def revoke_tokens(self, client_id: str | None = None) -> int:
        """Revoke the tokens issued so far (all, or `client_id`'s); how many were revoked."""
        answer = await self._call(
            "POST", "/oauth/revoke", json_body={} if client_id is None else {"client_id": client_id}
        )
        return cast(int, answer["revoked"])

    @property
    def token_url(self) -> str:
        """The OAuth2 token endpoint, for a sink's ``auth.token_url``."""
        return f"{self.base_url}{CONTROL}/oauth/token"

    async def reset(self, seed: int | None = None) -> None:
        await self._call("POST", "/reset", json_body={} if seed is None else {"seed": seed})

    async def _call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        *,
        json_body: Any = None,
        timeout: float = 10.0,
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"{self.base_url}{CONTROL}{path}"
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with self._session.request(method, url, params=query, json=json_body, timeout=client_timeout) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise SandboxError(f"{method} {CONTROL}{path}: {resp.status} {text}")
            return json.loads(text)


def _query(**params: object) -> dict[str, str]:
    return {key: str(value) for key, value in params.items() if value is not None}


# ---- the separate process -----------------------------------------------------------------------------------------


class SandboxProcess:
    """A sandbox running as its own process (`start_sandbox_process`); stopping sends SIGTERM."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_file: Path, own_log: bool) -> None:
        self.process = process
        self.url = url  # http://host:port, without a trailing slash
        self.port = int(url.rpartition(":")[2])
        self.log_file = log_file
        self._own_log = own_log

    def system_url(self, system: str) -> str:
        """Where a sink's base URL points for `system`: ``POST {system_url}/orders``."""
        return f"{self.url}/{system}"

    @property
    def token_url(self) -> str:
        """The OAuth2 token endpoint, for a sink's ``auth.token_url``."""
        return f"{self.url}{CONTROL}/oauth/token"

    def client(self, session: aiohttp.ClientSession | None = None) -> SandboxClient:
        return SandboxClient(self.url, session=session)

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit code (0 after a clean stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._own_log and self.process.returncode == 0:
            self.log_file.unlink(missing_ok=True)
        return self.process.returncode

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_sandbox_process(
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    seed: int = 0,
    faults: Mapping[str, Mapping[str, Any]] | None = None,
    auth: Mapping[str, str] | None = None,
    keep_bodies: bool = True,
    log_file: Path | None = None,
    startup_timeout: float = 20.0,
) -> SandboxProcess:
    """Start ``python -m daemon.sandbox`` and return once it answers ``/_sandbox/stats``.

    Blocking (it is a few hundred milliseconds): call it from a sync fixture. `port` None takes a free port, which
    the child picks itself and reports on stdout, so there is no race for it. The child's log goes to `log_file`
    (by default a temporary file, deleted after a clean stop; a failed start quotes it in its `SandboxError`).
    """
    own_log = log_file is None
    if log_file is None:
        fd, name = tempfile.mkstemp(prefix="orderbus-sandbox-", suffix=".log")
        os.close(fd)
        log_file = Path(name)
    argv = [sys.executable, "-m", "daemon.sandbox", "--host", host, "--port", str(port or 0), "--seed", str(seed)]
    if faults:
        argv += ["--faults", json.dumps(faults)]
    if not keep_bodies:
        argv.append("--no-bodies")
    for system, spec in (auth or {}).items():
        argv += ["--auth", f"{system}={spec}"]
    with log_file.open("ab") as log_out:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_out, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + startup_timeout
    try:
        url = _read_url(process, deadline)
        # S310: the URL is the child's own http:// address, read from its stdout.
        stats_url = f"{url}{CONTROL}/stats"
        with urllib.request.urlopen(stats_url, timeout=max(0.1, deadline - time.monotonic())):  # noqa: S310
            pass
    except (OSError, SandboxError) as exc:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
        tail = log_file.read_text(errors="replace")[-2000:]
        if own_log:
            log_file.unlink()
        raise SandboxError(f"the sandbox process did not start: {exc}; its log ends:\n{tail}") from None
    return SandboxProcess(process, url, log_file, own_log)


def _read_url(process: subprocess.Popen[bytes], deadline: float) -> str:
    """The first stdout line of the child: the URL it listens on, printed once its socket is bound."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if selector.select(remaining):
                line = process.stdout.readline().decode().strip()
                if line.startswith("http://"):
                    return line
                raise SandboxError(f"exited with code {process.wait()}")
    raise SandboxError("no answer within the start-up timeout")


def main(argv: list[str] | None = None) -> int:
    """``python -m daemon.sandbox``: serve until SIGTERM/SIGINT. Exit codes: 0 stopped, 2 bad options."""
    parser = argparse.ArgumentParser(prog="python -m daemon.sandbox", description="Sandbox downstream systems.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8700, help="0: any free port (printed on stdout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    parser.add_argument("--faults", help='JSON file, or inline JSON such as {"crm": {"p503": 0.1}}')
    parser.add_argument("--auth", action="append", default=[], metavar="SYSTEM=SPEC", help="e.g. crm=bearer:TOKEN")
    parser.add_argument("--max-request-log", type=int, default=20_000, help="requests kept per system")
    parser.add_argument("--no-bodies", action="store_true", help="keep no bodies (read-back: null); for benchmarks")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    configure(args.log_level)
    try:
        sandbox = Sandbox(
            seed=args.seed,
            faults=_load_faults(args.faults),
            config=_auth_options(args.auth),
            max_request_log=args.max_request_log,
            keep_bodies=not args.no_bodies,
        )
    except ConfigError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve_until_signal(sandbox, args.host, args.port))


def _load_faults(option: str | None) -> dict[str, Faults]:
    if option is None:
        return {}
    try:
        text = option if option.lstrip().startswith("{") else Path(option).read_text()
        data = json.loads(text)
    except OSError as exc:
        raise ConfigError(f"--faults: cannot read {option}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"--faults: not JSON: {exc}") from None
    return parse_faults(data)


def _auth_options(options: Sequence[str]) -> dict[str, SystemConfig]:
    config: dict[str, SystemConfig] = {}
    for option in options:
        system, sep, spec = option.partition("=")
        if not sep:
            raise ConfigError(f"--auth {option.split(':')[0]}...: expected SYSTEM=SPEC")
        config[system] = SystemConfig(auth=Auth.parse(spec, f"--auth {system}"))
    return config


async def _serve_until_signal(sandbox: Sandbox, host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # Everything alive now (modules, classes) lives as long as the process: move it out of the collector's sight,
    # so that full collections during a benchmark walk only what requests create.
    gc.collect()
    gc.freeze()
    # handler_cancellation: a held request (p_timeout, delays) ends when its client gives up.
    runner = web.AppRunner(build_sandbox_app(sandbox), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            print(f"sandbox: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return 2
        bound = runner.addresses[0][1]
        print(f"http://{host}:{bound}", flush=True)
        log.info("sandbox listening", extra={"url": f"http://{host}:{bound}", "seed": sandbox.seed})
        await stop.wait()
        log.info("sandbox stopping")
    finally:
        await runner.cleanup()
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    raise SystemExit(main())
