"""The sandbox downstream systems in-process, through aiohttp's test client, on a fixed clock.

Each answer of the resource API, each scripted step and each probabilistic fault (at p=1.0) has a test here. The
only real waits are the injected latencies under test, a few milliseconds each. The separate process is covered
by tests/integration/test_sandbox_process.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon.sandbox import (
    SANDBOX,
    Sandbox,
    SandboxClient,
    SandboxError,
    build_sandbox_app,
)
from daemon.sandbox.faults import Auth, Faults, SystemConfig, parse_faults, parse_scripts
from daemon.sandbox.process import _auth_options, _load_faults
from topics.errors import ConfigError
from topics.samples import sample_submission

Client = TestClient[web.Request, web.Application]
NOW = 1_800_000_000.0
NOW_PLUS_2_HTTP_DATE = "Fri, 15 Jan 2027 08:00:02 GMT"


@pytest.fixture
def sandbox() -> Sandbox:
    return Sandbox(seed=7, clock=lambda: NOW)


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[Client]:
    async with TestClient(TestServer(build_sandbox_app(sandbox))) as test_client:
        yield test_client


@pytest.fixture
async def control(client: Client) -> AsyncIterator[SandboxClient]:
    async with SandboxClient(str(client.make_url("")), session=client.session) as sandbox_client:
        yield sandbox_client


def order_body(number: str = "SO-1", seed: int = 1) -> dict[str, Any]:
    """The kind of body a sink sends: the contract's order as JSON (the sandbox needs only ``order_number``)."""
    order = sample_submission(random.Random(seed), order_number=number).order
    body: dict[str, Any] = json.loads(order.model_dump_json())
    return body


async def create(
    client: Client, number: str = "SO-1", key: str | None = None, **headers: str
) -> aiohttp.ClientResponse:
    if key is not None:
        headers["Idempotency-Key"] = key
    return await client.post("/crm/orders", json=order_body(number), headers=headers)


# ---- the resource API ---------------------------------------------------------------------------------------------


async def test_create_replace_cancel_and_read_back(client: Client, sandbox: Sandbox) -> None:
    created = await create(client, "SO-1", key="k-create", **{"X-Event-Id": "event-1"})
    assert created.status == 201
    assert created.headers["Location"] == "/crm/orders/crm-1"
    assert await created.json() == {"id": "crm-1", "order_number": "SO-1", "status": "open", "version": 1}

    changed = order_body("SO-1", seed=2)
    replaced = await client.put("/crm/orders/crm-1", json=changed, headers={"Idempotency-Key": "k-update"})
    assert replaced.status == 200
    assert (await replaced.json())["version"] == 2

    read = await client.get("/crm/orders/crm-1")
    assert await read.json() == {"id": "crm-1", "order_number": "SO-1", "status": "open", "version": 2, "body": changed}

    cancelled = await client.delete("/crm/orders/crm-1", headers={"Idempotency-Key": "k-cancel"})
    assert cancelled.status == 204
    assert await cancelled.read() == b""
    assert (await (await client.get("/crm/orders/crm-1")).json())["status"] == "cancelled"

    ledger = sandbox.ledger("crm")
    assert [(e["seq"], e["method"], e["id"], e["order_number"]) for e in ledger] == [
        (1, "POST", "crm-1", "SO-1"),
        (2, "PUT", "crm-1", "SO-1"),
        (3, "DELETE", "crm-1", "SO-1"),
    ]
    assert [e["idempotency_key"] for e in ledger] == ["k-create", "k-update", "k-cancel"]
    assert ledger[0]["event_id"] == "event-1"
    assert ledger[0]["at"] == NOW


async def test_by_number_routes_address_the_same_order(client: Client, sandbox: Sandbox) -> None:
    await create(client, "SO-7")
    assert (await client.put("/crm/orders/by-number/SO-7", json=order_body("SO-7", seed=3))).status == 200
    assert (await (await client.get("/crm/orders/by-number/SO-7")).json())["version"] == 2
    assert (await client.delete("/crm/orders/by-number/SO-7")).status == 204
    assert [e["method"] for e in sandbox.ledger()] == ["POST", "PUT", "DELETE"]


async def test_each_system_has_its_own_ids_and_state(client: Client) -> None:
    await create(client, "SO-1")
    shipped = await client.post("/shipping/orders", json={"order_number": "SO-1"})
    assert (await shipped.json())["id"] == "shipping-1"
    assert (await client.get("/accounting/orders/crm-1")).status == 404


async def test_a_system_can_lose_orders_as_a_restore_from_an_older_backup_would(
    client: Client, control: SandboxClient, sandbox: Sandbox
) -> None:
    for number in ("SO-1", "SO-2", "SO-3"):
        await create(client, number, key=f"k-{number}")
    assert await control.lose("crm", ["SO-2", "SO-9"]) == 1
    assert (await client.get("/crm/orders/crm-2")).status == 404
    assert (await client.get("/crm/orders/by-number/SO-2")).status == 404
    assert [order["order_number"] for order in await control.orders("crm")] == ["SO-1", "SO-3"]
    again = await create(client, "SO-2", key="k-again")
    assert (await again.json())["id"] == "crm-4", "a new id: crm-3 is still another order's"
    assert (await create(client, "SO-2", key="k-SO-2")).status == 201, "its old key answers from memory"
    assert [e["method"] for e in sandbox.ledger("crm")] == ["POST"] * 4
    refused = await client.post("/_sandbox/lose", json={"crm": "SO-1"})
    assert refused.status == 400
    assert "lose: expected" in (await refused.json())["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/crm/orders/crm-9"), ("DELETE", "/crm/orders/crm-9"), ("GET", "/crm/orders/crm-9"),
     ("PUT", "/crm/orders/by-number/SO-9"), ("DELETE", "/crm/orders/by-number/SO-9")],
)  # fmt: skip
async def test_unknown_orders_are_404(client: Client, sandbox: Sandbox, method: str, path: str) -> None:
    response = await client.request(method, path, json={"order_number": "SO-9"})
    assert response.status == 404
    assert await response.json() == {"error": "not_found"}
    assert sandbox.ledger() == []


async def test_a_second_create_for_a_number_is_409_with_the_existing_id(client: Client) -> None:
    await create(client, "SO-1")
    again = await create(client, "SO-1")
    assert again.status == 409
    assert (await again.json())["id"] == "crm-1"


async def test_replacing_a_cancelled_order_is_409(client: Client) -> None:
    await create(client, "SO-1")
    await client.delete("/crm/orders/crm-1")
    assert (await client.put("/crm/orders/crm-1", json=order_body("SO-1"))).status == 409


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/crm/orders", b'{"customer": {}}', "order_number"),
        ("POST", "/crm/orders", b'["SO-1"]', "order_number"),
        ("PUT", "/crm/orders/crm-1", b'{"order_number": "SO-2"}', "order_number"),
        ("PUT", "/crm/orders/crm-1", b"[]", "body"),
    ],
)
async def test_invalid_bodies_are_400_naming_the_field(
    client: Client, sandbox: Sandbox, method: str, path: str, body: bytes, field: str
) -> None:
    await create(client, "SO-1")
    response = await client.request(method, path, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["errors"][0]["field"] == field
    assert len(sandbox.ledger()) == 1


async def test_malformed_json_is_400(client: Client) -> None:
    response = await client.post("/crm/orders", data=b"{not json", headers={"Idempotency-Key": "k"})
    assert response.status == 400
    assert (await response.json())["error"] == "malformed_json"


# ---- idempotency keys ---------------------------------------------------------------------------------------------


async def test_a_repeated_key_replays_the_stored_answer_and_applies_nothing(client: Client, sandbox: Sandbox) -> None:
    first = await create(client, "SO-1", key="k-1")
    again = await create(client, "SO-1", key="k-1")
    assert again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert await again.json() == await first.json()
    for method in ("PUT", "DELETE"):
        for _ in range(2):
            answer = await client.request(
                method, "/crm/orders/crm-1", json=order_body(), headers={"Idempotency-Key": method}
            )
            assert answer.status in (200, 204)
    assert [e["method"] for e in sandbox.ledger()] == ["POST", "PUT", "DELETE"]
    stats = sandbox.systems["crm"].stats()
    assert (stats["requests"], stats["applied"], stats["duplicate_requests"]) == (6, 3, 3)
    assert [r["outcome"] for r in sandbox.systems["crm"].requests] == ["answered", "replayed"] * 3


@pytest.mark.parametrize(
    ("method", "path", "number"), [("POST", "/crm/orders", "SO-2"), ("PUT", "/crm/orders/crm-1", "SO-1")]
)
async def test_a_key_reused_for_another_request_is_422(
    client: Client, sandbox: Sandbox, method: str, path: str, number: str
) -> None:
    await create(client, "SO-1", key="k-1")
    reused = await client.request(method, path, json=order_body(number), headers={"Idempotency-Key": "k-1"})
    assert reused.status == 422
    assert (await reused.json())["error"] == "idempotency_key_reused"
    assert sandbox.systems["crm"].stats()["key_conflicts"] == 1
    assert len(sandbox.ledger("crm")) == 1


async def test_keys_are_per_system(client: Client) -> None:
    await create(client, "SO-1", key="k-1")
    shipped = await client.post("/shipping/orders", json=order_body("SO-1"), headers={"Idempotency-Key": "k-1"})
    assert (shipped.status, shipped.headers.get("Idempotent-Replayed")) == (201, None)


async def test_requests_without_a_key_apply_every_time(client: Client, sandbox: Sandbox) -> None:
    await create(client, "SO-1")
    for _ in range(2):
        assert (await client.put("/crm/orders/crm-1", json=order_body())).status == 200
    assert [e["method"] for e in sandbox.ledger()] == ["POST", "PUT", "PUT"]
    assert sandbox.systems["crm"].stats()["duplicate_requests"] == 0


async def test_a_system_without_key_support_applies_duplicates(client: Client, control: SandboxClient) -> None:
    await control.configure("crm", idempotency=False, unique_order_numbers=False)
    for _ in range(2):
        assert (await create(client, "SO-1", key="k-1")).status == 201
    assert [e["id"] for e in await control.ledger("crm")] == ["crm-1", "crm-2"]


async def test_an_error_answer_is_not_stored_under_its_key(client: Client) -> None:
    missing = await client.put("/crm/orders/by-number/SO-1", json=order_body(), headers={"Idempotency-Key": "k"})
    assert missing.status == 404
    await create(client, "SO-1")
    retried = await client.put("/crm/orders/by-number/SO-1", json=order_body(), headers={"Idempotency-Key": "k"})
    assert retried.status == 200


# ---- authentication -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "good", "bad"),
    [
        ("bearer:s3cret", {"Authorization": "Bearer s3cret"}, {"Authorization": "Bearer wrong"}),
        ("basic:api:pw", {"Authorization": "Basic YXBpOnB3"}, {"Authorization": "Basic YXBpOng="}),
        ("header:X-Api-Key:k3y", {"X-Api-Key": "k3y"}, {"X-Api-Key": "nope"}),
    ],
)
async def test_auth_rejects_missing_or_wrong_credentials_before_applying(
    client: Client, control: SandboxClient, sandbox: Sandbox, spec: str, good: dict[str, str], bad: dict[str, str]
) -> None:
    await control.configure_auth("crm", spec)
    for headers in ({}, bad):
        refused = await create(client, "SO-1", key="k-1", **headers)
        assert refused.status == 401
        assert "WWW-Authenticate" in refused.headers
    assert sandbox.ledger() == []
    assert (await create(client, "SO-1", key="k-1", **good)).status == 201
    assert (await client.post("/shipping/orders", json={"order_number": "SO-1"})).status == 201  # crm only
    config = json.dumps(await (await client.get("/_sandbox/config")).json())
    assert spec.rsplit(":", 1)[1] not in config
    assert "Authorization" not in json.dumps(await control.requests("crm"))


async def test_auth_can_be_switched_off_again(client: Client, control: SandboxClient) -> None:
    await control.configure_auth("crm", "bearer:t")
    await control.configure_auth("crm", None)
    assert (await create(client)).status == 201


# ---- scripted steps -----------------------------------------------------------------------------------------------


async def test_scripted_statuses_are_consumed_in_order_then_requests_proceed(
    client: Client, control: SandboxClient, sandbox: Sandbox
) -> None:
    await control.script("crm", [{"status": 503, "times": 2}, {"status": 429, "retry_after": 2}, {"status": 500}])
    statuses = [(await create(client, "SO-1", key="k")).status for _ in range(5)]
    assert statuses == [503, 503, 429, 500, 201]
    assert await control.remaining_script("crm") == []
    assert len(sandbox.ledger()) == 1
    assert [r["fault"] for r in await control.requests("crm")] == ["script"] * 4 + [None]


async def test_scripted_429_sends_retry_after_in_seconds_or_as_http_date(
    client: Client, control: SandboxClient
) -> None:
    await control.script(
        "crm",
        [
            {"status": 429, "retry_after": 2},
            {"status": 503, "retry_after": 2, "retry_after_http_date": True},
            {"status": 503, "retry_after": "soon"},
        ],
    )
    headers = [(await create(client)).headers.get("Retry-After") for _ in range(3)]
    assert headers == ["2", NOW_PLUS_2_HTTP_DATE, "soon"]


async def test_scripted_400_returns_the_given_body(client: Client, control: SandboxClient) -> None:
    body = {"error": "invalid", "errors": [{"field": "customer.vat_id", "message": "unknown VAT id"}]}
    await control.script("crm", [{"status": 400, "body": body}])
    rejected = await create(client)
    assert (rejected.status, await rejected.json()) == (400, body)


async def test_scripted_steps_match_method_and_order_number(client: Client, control: SandboxClient) -> None:
    await control.script("crm", [{"status": 503, "match": {"method": "put", "order_number": "SO-2"}}])
    assert (await create(client, "SO-1")).status == 201
    assert (await create(client, "SO-2")).status == 201
    assert (await client.put("/crm/orders/crm-1", json=order_body("SO-1"))).status == 200
    assert (await client.put("/crm/orders/crm-2", json=order_body("SO-2"))).status == 503
    assert (await client.put("/crm/orders/crm-2", json=order_body("SO-2"))).status == 200


async def test_scripted_reset_after_effect_aborts_but_records_the_effect(
    client: Client, control: SandboxClient, sandbox: Sandbox
) -> None:
    await control.script("crm", [{"reset_after_effect": True}])
    with pytest.raises(aiohttp.ClientConnectionError):
        await create(client, "SO-1", key="k-1")
    assert [e["method"] for e in sandbox.ledger()] == ["POST"]
    retried = await create(client, "SO-1", key="k-1")
    assert (retried.status, retried.headers["Idempotent-Replayed"]) == (201, "true")
    assert [(r["outcome"], r["status"]) for r in await control.requests("crm")] == [("reset", None), ("replayed", 201)]
    stats = (await control.stats())["systems"]["crm"]
    assert (stats["resets"], stats["applied"], stats["duplicate_requests"]) == (1, 1, 1)


async def test_scripted_reset_aborts_before_applying(client: Client, control: SandboxClient, sandbox: Sandbox) -> None:
    await control.script("crm", [{"reset": True}])
    with pytest.raises(aiohttp.ClientConnectionError):
        await create(client, "SO-1", key="k-1")
    assert sandbox.ledger() == []
    assert (await create(client, "SO-1", key="k-1")).status == 201


async def test_scripted_delay_holds_the_request_then_applies_it(client: Client, control: SandboxClient) -> None:
    await control.script("crm", [{"delay_ms": 20}])
    started = time.monotonic()
    assert (await create(client)).status == 201
    assert time.monotonic() - started >= 0.02


@pytest.mark.parametrize(
    "steps",
    [
        [{"status": 503, "reset": True}],
        [{"times": 0, "status": 503}],
        [{"status": 42}],
        [{"sattus": 503}],
        [{"status": 503, "match": {"path": "/x"}}],
        [{}],
        {"status": 503},
    ],
)
async def test_invalid_scripts_are_refused_naming_the_key(control: SandboxClient, steps: Any) -> None:
    with pytest.raises(SandboxError, match=r"400 .*script\.crm"):
        await control.script("crm", steps)


# ---- probabilistic faults at p=1.0 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("faults", "status", "retry_after"),
    [
        ({"p503": 1.0}, 503, None),
        ({"p503": 1.0, "retry_after_on_503": True, "retry_after": 3}, 503, "3"),
        ({"p500": 1.0}, 500, None),
        ({"p429": 1.0, "retry_after": 2}, 429, "2"),
        ({"p429": 1.0, "retry_after": 2, "retry_after_http_date": True}, 429, NOW_PLUS_2_HTTP_DATE),
    ],
)
async def test_probabilistic_statuses_apply_nothing(
    client: Client,
    control: SandboxClient,
    sandbox: Sandbox,
    faults: dict[str, Any],
    status: int,
    retry_after: str | None,
) -> None:
    await control.faults("crm", **faults)
    answer = await create(client, key="k-1")
    assert answer.status == status
    assert answer.headers.get("Retry-After") == retry_after
    assert "error" in await answer.json()
    assert sandbox.ledger() == []
    await control.faults("crm")
    assert (await create(client, key="k-1")).status == 201  # the fault was not stored under the key


async def test_p400_names_a_field_like_a_real_api(client: Client, control: SandboxClient) -> None:
    await control.faults("crm", p400=1.0, p400_field="customer.email")
    answer = await create(client)
    assert answer.status == 400
    assert (await answer.json())["errors"][0]["field"] == "customer.email"


async def test_p_timeout_holds_then_answers_504(client: Client, control: SandboxClient, sandbox: Sandbox) -> None:
    await control.faults("crm", p_timeout=1.0, timeout_s=0.02)
    started = time.monotonic()
    assert (await create(client)).status == 504
    assert time.monotonic() - started >= 0.02
    assert sandbox.ledger() == []


async def test_p_reset_after_effect_aborts_and_still_records_the_effect(
    client: Client, control: SandboxClient, sandbox: Sandbox
) -> None:
    await control.faults("crm", p_reset_after_effect=1.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await create(client, "SO-1", key="k-1")
    with pytest.raises(aiohttp.ClientConnectionError):
        await create(client, "SO-1", key="k-1")  # the replay is lost as well: p=1.0
    assert [e["method"] for e in sandbox.ledger()] == ["POST"]
    assert sandbox.systems["crm"].stats()["resets"] == 2


async def test_latency_and_jitter_delay_every_request(client: Client, control: SandboxClient) -> None:
    await control.faults("crm", latency_ms=10, latency_jitter_ms=5)
    started = time.monotonic()
    assert (await create(client)).status == 201
    assert time.monotonic() - started >= 0.01


async def test_rejected_order_numbers_are_always_400(client: Client, control: SandboxClient) -> None:
    await control.faults("crm", reject_order_numbers=["SO-BAD"])
    for _ in range(2):
        rejected = await create(client, "SO-BAD")
        assert rejected.status == 400
        assert (await rejected.json())["errors"][0]["field"] == "order_number"
    assert (await create(client, "SO-GOOD")).status == 201


async def test_star_faults_apply_to_systems_without_their_own(client: Client, control: SandboxClient) -> None:
    await control.faults("*", p503=1.0)
    await control.faults("crm")
    assert (await client.post("/shipping/orders", json={"order_number": "SO-1"})).status == 503
    assert (await create(client)).status == 201


async def test_faults_never_apply_to_the_control_api(client: Client, control: SandboxClient) -> None:
    await control.faults("*", p503=1.0, latency_ms=10_000)
    await control.configure_auth("*", "bearer:t")
    assert (await control.stats())["total"]["requests"] == 0
    assert await control.ledger() == []


async def test_draws_are_fixed_by_the_seed_and_the_order_of_arrival() -> None:
    faults = Faults(p503=0.3, p429=0.2, latency_ms=1, latency_jitter_ms=4)

    def answers(seed: int) -> list[tuple[int | None, float]]:
        rng = random.Random(f"{seed}:crm")
        outcomes = [faults.draw(rng, "SO-1", NOW) for _ in range(50)]
        return [(o.status, o.delay_s) if o else (None, 0.0) for o in outcomes]

    assert answers(1) == answers(1)
    assert answers(1) != answers(2)
    statuses = [status for status, _ in answers(1)]
    assert {503, 429, None} == set(statuses)


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        ({"p503": 0.6, "p500": 0.5}, "must not exceed 1"),
        ({"p503": 1.5}, r"faults\.crm\.p503: 1\.5 is out of range"),
        ({"p503": "often"}, r"faults\.crm\.p503: expected a number"),
        ({"latency": 10}, r"faults\.crm\.latency: unknown fault"),
        ({"retry_after": 1.5}, r"faults\.crm\.retry_after: expected an integer"),
        ({"reject_order_numbers": "SO-1"}, r"faults\.crm\.reject_order_numbers: expected a list"),
        ({"retry_after_http_date": 1}, "expected true or false"),
    ],
)
async def test_invalid_faults_are_refused_naming_the_key(
    control: SandboxClient, faults: dict[str, Any], message: str
) -> None:
    with pytest.raises(SandboxError, match=message):
        await control.faults("crm", **faults)
    with pytest.raises(ConfigError, match=message):
        parse_faults({"crm": faults})


# ---- the control API ----------------------------------------------------------------------------------------------


async def test_ledger_filters_by_system_and_since(client: Client, control: SandboxClient) -> None:
    await create(client, "SO-1")
    await client.post("/shipping/orders", json={"order_number": "SO-1"})
    await create(client, "SO-2")
    assert [e["seq"] for e in await control.ledger()] == [1, 2, 3]
    assert [e["seq"] for e in await control.ledger("crm")] == [1, 3]
    assert [e["seq"] for e in await control.ledger("crm", since=1)] == [3]
    assert [e["seq"] for e in await control.ledger(since=2)] == [3]
    assert await control.ledger("accounting") == []


async def test_wait_ledger_answers_as_soon_as_the_effects_arrive(
    client: Client, control: SandboxClient, sandbox: Sandbox
) -> None:
    await create(client, "SO-1")
    waiting = asyncio.create_task(control.wait_ledger("crm", 2, timeout=30))
    # ASYNC110: the server offers no event for "a long poll arrived"; sleep(0) only lets the request reach it.
    while not sandbox._ledger_waiters:  # noqa: ASYNC110
        await asyncio.sleep(0)
    await create(client, "SO-2")
    entries = await asyncio.wait_for(waiting, 5)
    assert [e["order_number"] for e in entries] == ["SO-1", "SO-2"]


async def test_wait_ledger_raises_with_what_arrived_after_the_timeout(client: Client, control: SandboxClient) -> None:
    await create(client, "SO-1")
    with pytest.raises(SandboxError, match="1 of 5 effects"):
        await control.wait_ledger("crm", 5, timeout=0)


async def test_request_log_keeps_headers_but_not_credentials(client: Client, control: SandboxClient) -> None:
    await control.configure_auth("crm", "bearer:t")
    await create(client, "SO-1", key="k-1", Authorization="Bearer t", **{"X-Event-Id": "e-1"})
    [record] = await control.requests("crm")
    assert record["headers"]["Idempotency-Key"] == "k-1"
    assert "Authorization" not in record["headers"]
    assert (record["method"], record["path"], record["status"], record["outcome"]) == (
        "POST",
        "/crm/orders",
        201,
        "answered",
    )
    assert (record["idempotency_key"], record["event_id"], record["order_number"]) == ("k-1", "e-1", "SO-1")
    assert record["received_at"] == record["answered_at"] == NOW
    assert await control.requests("crm", since=record["seq"]) == []


async def test_stats_count_per_system_and_in_total(client: Client, control: SandboxClient) -> None:
    await control.script("crm", [{"status": 503}])
    await create(client, "SO-1", key="k")
    await create(client, "SO-1", key="k")
    await create(client, "SO-1", key="k")
    await client.post("/shipping/orders", json={"order_number": "SO-1"})
    stats = await control.stats()
    crm = stats["systems"]["crm"]
    assert crm == {
        "requests": 3,
        "applied": 1,
        "duplicate_requests": 1,
        "key_conflicts": 0,
        "resets": 0,
        "client_gone": 0,
        "by_status": {"201": 2, "503": 1},
        "in_flight": 0,
        "max_concurrent": 1,
    }
    assert (stats["total"]["requests"], stats["total"]["by_status"]) == (4, {"201": 3, "503": 1})


async def test_max_concurrent_counts_requests_held_at_once(client: Client, control: SandboxClient) -> None:
    await control.faults("crm", latency_ms=20)
    await asyncio.gather(*(create(client, f"SO-{i}") for i in range(5)))
    assert (await control.stats())["systems"]["crm"]["max_concurrent"] == 5


async def test_orders_lists_every_order_without_faults(client: Client, control: SandboxClient) -> None:
    await create(client, "SO-1")
    await control.faults("crm", p503=1.0)
    [order] = await control.orders("crm")
    assert (order["id"], order["order_number"], order["body"]) == ("crm-1", "SO-1", order_body("SO-1"))
    assert await control.orders("nobody") == []


async def test_reset_forgets_everything_and_restores_start_up_faults(client: Client) -> None:
    sandbox = Sandbox(faults={"crm": Faults(p503=1.0)}, config={"crm": SystemConfig(idempotency=False)})
    async with TestClient(TestServer(build_sandbox_app(sandbox))) as own:
        control = SandboxClient(str(own.make_url("")), session=own.session)
        await control.faults("crm")
        await control.configure("crm", idempotency=True)
        assert (await own.post("/crm/orders", json={"order_number": "SO-1"})).status == 201
        await control.script("crm", [{"status": 500}])
        await control.reset(seed=3)
        assert own.app[SANDBOX].seed == 3
        assert await control.ledger() == []
        assert await control.requests() == []
        assert (await control.stats())["systems"] == {}
        assert await control.remaining_script("crm") == []
        assert (await (await own.get("/_sandbox/faults")).json())["crm"]["p503"] == 1.0
        assert (await (await own.get("/_sandbox/config")).json())["crm"]["idempotency"] is False
        assert (await own.post("/crm/orders", json={"order_number": "SO-1"})).status == 503


async def test_control_api_refuses_bad_input(client: Client) -> None:
    assert (await client.post("/_sandbox/reset", json={"seed": "x"})).status == 400
    assert (await client.post("/_sandbox/faults", data=b"{nope")).status == 400
    assert (await client.post("/_sandbox/config", json={"crm": {"auth": "token"}})).status == 400
    assert (await client.post("/_sandbox/config", json=["crm"])).status == 400
    assert (await client.get("/_sandbox/ledger?since=-1")).status == 400
    assert (await client.get("/_sandbox/ledger?wait=forever")).status == 400


# ---- configuration parsing ----------------------------------------------------------------------------------------


def test_auth_specs_parse_and_refuse_nonsense() -> None:
    assert Auth.parse("bearer:t", "x").expected == "Bearer t"
    assert Auth.parse("header:X-Key:v", "x").header == "X-Key"
    for bad in ("bearer:", "basic:user", "token:x", "header:X-Key"):
        with pytest.raises(ConfigError, match="expected bearer:TOKEN"):
            Auth.parse(bad, "auth.crm")


def test_command_line_faults_and_auth(tmp_path: Path) -> None:
    path = tmp_path / "faults.json"
    path.write_text('{"crm": {"p503": 0.25}}')
    assert _load_faults(str(path))["crm"].p503 == 0.25
    assert _load_faults('{"*": {"latency_ms": 5}}')["*"].latency_ms == 5
    with pytest.raises(ConfigError, match="--faults: not JSON"):
        _load_faults("{oops")
    with pytest.raises(ConfigError, match="--faults: cannot read"):
        _load_faults(str(tmp_path / "missing.json"))
    assert _auth_options(["crm=bearer:t"])["crm"].auth == Auth("bearer", "Authorization", "Bearer t")
    with pytest.raises(ConfigError, match="expected SYSTEM=SPEC"):
        _auth_options(["crm:bearer:t"])


def test_scripts_parse_per_system() -> None:
    scripts = parse_scripts({"crm": [{"status": 503, "times": 2}], "shipping": []})
    assert scripts["crm"].remaining()[0]["times"] == 2
    assert not scripts["shipping"]


async def test_without_bodies_read_back_answers_null() -> None:
    async with TestClient(TestServer(build_sandbox_app(Sandbox(keep_bodies=False)))) as own:
        await own.post("/crm/orders", json={"order_number": "SO-1", "customer": {"name": "Erika Mustermann"}})
        read = await (await own.get("/crm/orders/by-number/SO-1")).json()
        assert (read["order_number"], read["body"]) == ("SO-1", None)
