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
Retry-After, 400, delays, connection resets; see `daemon.sandbox.faults`), then the API itself. Every applied
change is appended to the ledger: ``{seq, system, method, order_number, id, idempotency_key, event_id, at}``
(``event_id`` from the ``X-Event-Id`` header).

Control API (never faulted, never authenticated)::

    GET  /_sandbox/ledger?system=&since=&min_count=&wait=   applied effects in order; waits up to `wait` s
    GET  /_sandbox/requests?system=&since=                  raw request log (no Authorization header)
    GET  /_sandbox/stats                                    counts per system and in total
    GET  /_sandbox/orders?system=                           every order's current state, fault-free
    POST /_sandbox/reset            {"seed": n}?            forget everything; faults and config as at start
    POST /_sandbox/lose             {"crm": ["SO-1", ...]}  forget these orders (a restore from an older backup)
    GET|POST /_sandbox/faults       {"crm": {...}, "*": {...}}        replace faults (see `daemon.sandbox.faults`)
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
daemon's event loop in benchmarks. The modules: `records` (what the control API answers), `state` (a system's
state), `faults`, `oauth`, `server`, `client` and `process`. Nothing is logged per request: bodies hold personal
data and stay in memory only, for read-back.
"""

from daemon.sandbox.client import SandboxClient
from daemon.sandbox.process import SandboxProcess, main, start_sandbox_process
from daemon.sandbox.records import CONTROL, LedgerEntry, RequestRecord, SandboxError
from daemon.sandbox.server import SANDBOX, Sandbox, build_sandbox_app

__all__ = [
    "CONTROL",
    "SANDBOX",
    "LedgerEntry",
    "RequestRecord",
    "Sandbox",
    "SandboxClient",
    "SandboxError",
    "SandboxProcess",
    "build_sandbox_app",
    "main",
    "start_sandbox_process",
]
