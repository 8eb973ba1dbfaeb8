"""The daemon's aiohttp application: routes only. Resources are opened and closed by `daemon.lifecycle`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from daemon.connection_gate import ConnectionGate, Handler
from daemon.ingest import Ingest
from daemon.problems import problem

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
# What one listener serves: everything (no admin port), or its half of it.
Listener = Literal["all", "webhook", "admin"]

# How the daemon serves the application (`web.AppRunner` keywords). Bodies are not inflated: the ingest refuses a
# Content-Encoding (415), because a webhook's signature and the body limit are about the bytes as sent; inflated by
# aiohttp, a compressed body was read by its compressed length, and a mislabelled one failed in the parser.
# Handlers are not cancelled when their client goes away: a claimed key is then published and answered all the same.
# An idle connection, or one whose request head never ends, is closed after `keepalive_timeout` (aiohttp's own
# default is an hour: a client that opens connections and sends nothing held them that long); longer than a proxy's
# or load balancer's idle timeout (60 s at most of them), so it is they who close a connection they keep. At a stop,
# webhook requests under way get `shutdown_timeout` to be answered (a retry is safe under its key).
INGEST_SHUTDOWN: Final = 5.0
ADMIN_SHUTDOWN: Final = 1.0  # a scrape or a status under way at a stop: no one retries those
# Connections the kernel completes and queues for the listener while the event loop is busy (aiohttp's default, 128,
# as `TCPSite` keyword): after a broker outage, the clients' retries of their 503s arrive at once, and the
# connections beyond the queue are dropped at the handshake, which each client's kernel retries after 1, 3, 7, 15,
# 31 s: webhooks waited a minute and more for an answer (a 90 s broker freeze, 100 orders/s). The kernel caps it at
# net.core.somaxconn (4096 by default since Linux 5.4).
LISTEN_BACKLOG: Final = 1024
RUNNER_OPTIONS: Final[dict[str, Any]] = {
    "access_log": None,
    "handler_cancellation": False,
    "auto_decompress": False,
    "keepalive_timeout": 75.0,
    "shutdown_timeout": INGEST_SHUTDOWN,
}


def build_app(
    *,
    ingest: Ingest | None,
    readiness: Callable[[], dict[str, str]],
    max_body_bytes: int = 1_048_576,
    registry: CollectorRegistry | None = None,
    status: Callable[[], dict[str, object]] | None = None,
    degraded: Callable[[], dict[str, str]] = dict,
    serves: Listener = "all",
    components: Sequence[str] = (),
    gate: ConnectionGate | None = None,
) -> web.Application:
    """The HTTP surface: the ingest (when enabled), the OpenAPI document, health and readiness, metrics and status.

    `readiness` returns the reasons the daemon is not ready (empty when it is); `degraded`, what is wrong downstream
    of it, which /readyz reports without answering 503 (see `daemon.lifecycle`). `serves` splits it between two
    listeners (``admin.port``): "webhook" leaves out /metrics and /status, "admin" the ingest and the OpenAPI
    document; both answer /healthz and /readyz. With `gate` (the listener's `daemon.connection_gate`), every route
    tells it when its request ends (its connection is idle again).
    """
    # The ingest reads the body itself against its own limit; leave aiohttp's a little above it.
    app = web.Application(client_max_size=max_body_bytes + 1)
    track: Callable[[Handler], Handler] = gate.tracking if gate is not None else _untracked
    if ingest is not None and serves != "admin":
        app.router.add_post("/v1/orders", track(ingest.post_order), expect_handler=ingest.expect)
    openapi = OPENAPI_PATH.read_bytes() if serves != "admin" else b""  # the admin listener does not serve it

    async def openapi_document(_: web.Request) -> web.Response:
        return web.Response(body=openapi, content_type="application/json")

    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the process and its event loop are alive.
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reasons = readiness()
        if (component := request.query.get("component")) is not None:
            # One part's readiness: a load balancer in front of the webhook asks for the ingest's alone, which takes
            # orders while a sink still joins its group (and answers 503 with Retry-After itself while Kafka is away).
            if component not in components:
                detail = f"no component {component!r} here; the components are: {', '.join(components) or 'none'}"
                return problem(400, "unknown-component", detail)
            reasons = {name: reason for name, reason in reasons.items() if name == component}
        status = 200 if not reasons else 503
        body = {"status": "ready" if not reasons else "not ready", "reasons": reasons, "degraded": degraded()}
        return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry) if registry is not None else b""
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status_document(_: web.Request) -> web.Response:
        # For `orderbus status`: counts and states only, never order data.
        return web.json_response(status() if status is not None else {})

    if serves != "webhook":
        app.router.add_get("/metrics", track(metrics))
        app.router.add_get("/status", track(status_document))
    if serves != "admin":
        app.router.add_get("/openapi.json", track(openapi_document))
    app.router.add_get("/healthz", track(healthz))
    app.router.add_get("/readyz", track(readyz))
    allowed = {resource.canonical: sorted({route.method for route in resource}) for resource in app.router.resources()}

    async def unrouted(request: web.Request) -> web.Response:
        # Matched only when no route is (the ingest's path resolves first): 404 and 405 as problem documents too.
        if methods := allowed.get(request.path):
            detail = f"{request.path} takes {', '.join(methods)}"
            return problem(405, "method-not-allowed", detail, headers={"Allow": ", ".join(methods)})
        if serves == "admin":
            return problem(404, "not-found", "no such resource; this listener serves /metrics, /status and health")
        return problem(404, "not-found", "no such resource; the API is described at /openapi.json")

    app.router.add_route("*", "/{path:.*}", track(unrouted))
    return app


def _untracked(handler: Handler) -> Handler:
    return handler
