"""The OpenAPI 3.1 document of the daemon's HTTP API, generated from the contract models.

`python -m daemon.openapi` rewrites ``daemon/openapi.json``; ``--check`` exits 1 when the file is stale.
The daemon serves the file at ``/openapi.json``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from daemon.app import OPENAPI_PATH
from daemon.problems import MAX_LISTED_ERRORS
from topics.catalogue import SINKS
from topics.envelope import OrderSubmission

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
# The last segment of every problem `type` the API answers with, for clients to branch on (a test keeps it whole).
PROBLEM_CODES = (
    "invalid-order",
    "invalid-idempotency-key",
    "unreadable-body",
    "invalid-signature",
    "body-timeout",
    "request-in-progress",
    "body-too-large",
    "expectation-failed",
    "unsupported-media-type",
    "unsupported-content-encoding",
    "idempotency-key-reused",
    "kafka-unavailable",
    "key-store-unavailable",
    "too-many-connections",
    "body-buffer-full",
    "not-found",
    "method-not-allowed",
    "unknown-component",
)


def _problem_response(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": _PROBLEM}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
        }
    return response


def document() -> dict[str, Any]:
    submission = OrderSubmission.model_json_schema(ref_template="#/components/schemas/{model}")
    components: dict[str, Any] = dict(submission.pop("$defs", {}))
    components["OrderSubmission"] = submission
    components["Accepted"] = {
        "type": "object",
        "required": ["event_id", "topic", "partition", "offset"],
        "properties": {
            "event_id": {"type": "string", "format": "uuid"},
            "topic": {"type": "string"},
            "partition": {"type": "integer"},
            "offset": {"type": "integer"},
        },
    }
    components["Problem"] = {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {
                "type": "string",
                "format": "uri",
                "description": "https://orderbus.dev/problems/ and one of: " + ", ".join(PROBLEM_CODES),
            },
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "maxItems": MAX_LISTED_ERRORS,
                "description": f"the first {MAX_LISTED_ERRORS} problems (detail says how many there were)",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    }
    header = {"in": "header", "required": False, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "orderbus ingest",
            "version": "1",
            "description": "Submit orders; each is published to Kafka with acks=all before the answer.",
        },
        "paths": {
            "/v1/orders": {
                "post": {
                    "operationId": "submitOrder",
                    "summary": "Submit one order event",
                    "parameters": [
                        {
                            **header,
                            "name": "Idempotency-Key",
                            "description": "repeat-safe key when webhooks are not signed (else webhook-id); "
                            "ignored when they are",
                        },
                        {
                            **header,
                            "name": "webhook-id",
                            "description": "Standard Webhooks message id; the idempotency key when webhooks are signed",
                        },
                        {
                            **header,
                            "name": "webhook-timestamp",
                            "description": "unix seconds, within 5 minutes",
                        },
                        {
                            **header,
                            "name": "webhook-signature",
                            # Not a security scheme: an apiKey is a fixed value to generators, and this one is
                            # computed for each request.
                            "description": "Standard Webhooks (https://www.standardwebhooks.com), required when the "
                            "daemon has ingest.webhook_secrets (then a request without a valid one is 401): `v1,` and "
                            "the base64 HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}` under the secret "
                            "(`whsec_` + base64 key); several space-separated during a key rotation. "
                            "`orderbus webhook sign BODY` prints the three headers",
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OrderSubmission"}}},
                    },
                    "responses": {
                        "202": {
                            "description": "published (acks=all); a repeat of the key returns this same answer",
                            "headers": {
                                "Idempotent-Replayed": {
                                    "description": "true on a repeat answered from the key store (nothing published)",
                                    "schema": {"type": "string", "enum": ["true"]},
                                }
                            },
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
                        },
                        "400": _problem_response(
                            "bad JSON, a bad order (field errors), a bad idempotency key, or an unreadable body"
                        ),
                        "401": _problem_response("missing or invalid webhook signature"),
                        "408": _problem_response(
                            "the body did not arrive within ingest.body_timeout (a body whose chunked encoding "
                            "breaks after it began may end so too)"
                        ),
                        "409": _problem_response(
                            "a request with this idempotency key is still in progress; send it again after Retry-After",
                            retry_after=True,
                        ),
                        "413": _problem_response("body too large"),
                        "415": _problem_response("not application/json, or a compressed body (Content-Encoding)"),
                        "417": _problem_response("an Expect header other than 100-continue"),
                        "422": _problem_response("this idempotency key was used with another body"),
                        "503": _problem_response(
                            "Kafka unreachable or slow to answer, or the key store failed; the bodies under way fill "
                            "the server's buffer (body-buffer-full); or the listener holds its limit of connections, "
                            "each busy (too-many-connections; the connection is closed): retry the same request",
                            retry_after=True,
                        ),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "process and event loop alive",
                    "responses": {"200": {"description": "ok"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "this instance can take and deliver orders (Kafka, key store, groups joined); the body "
                    "says why not, and which sinks' downstream systems fail (degraded, still 200)",
                    "parameters": [
                        {
                            "name": "component",
                            "in": "query",
                            "required": False,
                            "description": f"one part's readiness only: ingest, {', '.join(f'sink.{s}' for s in SINKS)}"
                            " (a webhook load balancer asks for the ingest's)",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "ready"},
                        "400": {"description": "no such component in this instance"},
                        "503": {"description": "not ready"},
                    },
                }
            },
        },
        "components": {"schemas": components},
    }


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OPENAPI_PATH.exists() or OPENAPI_PATH.read_text() != text:
            print(f"{OPENAPI_PATH} is stale: run `make schemas`", file=sys.stderr)
            return 1
        return 0
    OPENAPI_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
