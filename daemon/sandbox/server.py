"""The sandbox's server: every system's resource API and the control API over one aiohttp application.

What the APIs do is described in `daemon.sandbox`; faults and scripts are `daemon.sandbox.faults`, the token
endpoint `daemon.sandbox.oauth`, a system's state `daemon.sandbox.state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from daemon.sandbox.faults import Auth, Faults, Outcome, SystemConfig, parse_faults, parse_scripts
from daemon.sandbox.oauth import TokenIssuer
from daemon.sandbox.records import CONTROL, LedgerEntry, Logged
from daemon.sandbox.state import NOT_FOUND, Answer, SystemState
from topics.errors import ConfigError

_QUIET: Final = Faults()
_EFFECTS: Final = frozenset({"POST", "PUT", "DELETE"})


@dataclass(slots=True)
class _Call:
    """One request on its way through `Sandbox._serve`."""

    request: web.Request
    method: str
    system: SystemState
    config: SystemConfig
    record: Logged
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
        self.systems: dict[str, SystemState] = {}
        self._ledger: dict[int, bytes] = {}  # every system's, by seq (1, 2, ...)
        self._request_seq = 0
        self._max_concurrent = self._in_flight
        self.tokens = TokenIssuer(self._clock)

    def system(self, name: str) -> SystemState:
        state = self.systems.get(name)
        if state is None:
            # A string seed per system: one system's traffic never shifts another's draws.
            rng = random.Random(f"{self.seed}:{name}")
            state = self.systems[name] = SystemState(name, rng, deque(maxlen=self._max_request_log))
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
        record: Logged = {
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

    async def _serve(self, request: web.Request, system: SystemState, record: Logged) -> web.Response | None:
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
                return Answer.of(outcome.status, outcome.body).response(retry_after=outcome.retry_after)
        if malformed:
            return Answer.of(400, {"error": "malformed_json", "message": "the body is not JSON"}).response()
        response = self._once(call)
        if outcome is not None and outcome.reset_after_effect:
            return None
        return response

    def _accepts(self, auth: Auth, headers: Mapping[str, str]) -> bool:
        if auth.scheme != "oauth2":
            return auth.accepts(headers)
        return self.tokens.accepts(auth, headers)

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
                return Answer.of(422, {"error": "idempotency_key_reused", "message": message}).response()
            record["outcome"] = "replayed"
            system.count("duplicate_requests")
            return Answer.unpack(system.key_answer[key]).response(replayed=True)
        answer = self._apply(call)
        if 200 <= answer.status < 300:
            system.key_fingerprint[key] = fingerprint.digest()
            system.key_answer[key] = answer.pack()
        return answer.response()

    def _apply(self, call: _Call) -> Answer:
        """The API's own semantics: create, read, replace or cancel, and the ledger entry of every change."""
        method, system, payload = call.method, call.system, call.payload
        if method == "POST":
            number = payload.get("order_number") if isinstance(payload, dict) else None
            if not isinstance(number, str) or not number:
                return _invalid("order_number", "is required (a non-empty string)")
            existing = system.by_number.get(number)
            if existing is not None and call.config.unique_order_numbers:
                return Answer.of(409, {"error": "conflict", "message": "order number exists", "id": existing})
            system.created += 1  # not the count of orders held: one forgotten (`post_lose`) leaves a gap, not a reuse
            order_id = f"{system.name}-{system.created}"
            system.number[order_id], system.status[order_id], system.version[order_id] = number, "open", 1
            system.body[order_id] = call.raw if self._keep_bodies else b"null"
            system.by_number[number] = order_id
            self._record_effect(call, order_id)
            return Answer.of(201, system.summary(order_id), location=f"/{system.name}/orders/{order_id}")
        match_info = call.request.match_info
        order_id = match_info.get("id") or system.by_number.get(match_info["number"], "")
        if order_id not in system.number:
            return NOT_FOUND
        if method == "GET":
            return Answer(200, system.view(order_id))
        if method == "PUT":
            if not isinstance(payload, dict):
                return _invalid("body", "must be a JSON object")
            if payload.get("order_number", system.number[order_id]) != system.number[order_id]:
                return _invalid("order_number", "does not match the order being replaced")
            if system.status[order_id] == "cancelled":
                return Answer.of(409, {"error": "conflict", "message": "the order is cancelled", "id": order_id})
            system.body[order_id] = call.raw if self._keep_bodies else b"null"
        else:
            system.status[order_id] = "cancelled"
        system.version[order_id] += 1
        self._record_effect(call, order_id)
        return Answer.of(200, system.summary(order_id)) if method == "PUT" else Answer(204)

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
        total = SystemState("", random.Random(), deque()).stats()
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

    async def post_lose(self, request: web.Request) -> web.Response:
        """Forget some orders of a system, as a restore from an older backup would: ``{"crm": ["SO-1", ...]}``.
        Their idempotency keys stay (a key store may outlive what it answered for); the ledger keeps its history."""
        data = await _json_body(request)
        if not isinstance(data, dict) or not all(
            isinstance(numbers, list) and all(isinstance(n, str) for n in numbers) for numbers in data.values()
        ):
            return _config_error('lose: expected {"<system>": ["<order number>", ...]}')
        lost = {name: _forget(self.systems.get(name), set(numbers)) for name, numbers in data.items()}
        return web.json_response(lost)

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

    # ---- the OAuth2 token endpoint (`daemon.sandbox.oauth`) ---------------------------------------------------------

    @property
    def oauth(self) -> dict[str, Any]:
        """What the token endpoint saw: ``token_requests``, ``issued``, ``refused`` and ``scopes``."""
        return self.tokens.stats

    async def oauth_token(self, request: web.Request) -> web.Response:
        """Issue a bearer token to a client named by some system's ``oauth2:`` auth spec (client credentials)."""
        return await self.tokens.token(request, (c.auth for c in self.config.values() if c.auth is not None))

    async def oauth_revoke(self, request: web.Request) -> web.Response:
        """Revoke every issued token, or one client's: their next use is a 401."""
        data = await _json_body(request, default={})
        client_id = data.get("client_id") if isinstance(data, dict) else None
        return web.json_response({"revoked": self.tokens.revoke(client_id)})


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
        ("POST", "/lose", sandbox.post_lose),
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


def _forget(state: SystemState | None, numbers: set[str]) -> int:
    """Drop the orders of `numbers` from `state` (a system's: None if it has none yet); how many there were."""
    if state is None:
        return 0
    gone = [order_id for order_id, number in state.number.items() if number in numbers]
    for order_id in gone:
        number = state.number.pop(order_id)
        for kept in (state.status, state.version, state.body):
            kept.pop(order_id, None)
        if state.by_number.get(number) == order_id:
            del state.by_number[number]
    return len(gone)


def _invalid(field_name: str, message: str) -> Answer:
    return Answer.of(400, {"error": "validation_failed", "errors": [{"field": field_name, "message": message}]})


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


__all__ = ["SANDBOX", "Sandbox", "build_sandbox_app"]
