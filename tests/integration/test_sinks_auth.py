"""The three sinks with their own credentials, end to end in-process: real Kafka, the sandbox process, the daemon.

Each sandbox system demands another scheme (OAuth2 client credentials, bearer, API key, basic), and the daemon is
configured the way an operator does it (settings → sinks and credentials). Later events of an order address the
id its create returned.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from support import make_events, orders_of, produce, running_daemon, settings_for, with_type

from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from topics.catalogue import SINKS
from topics.envelope import OrderEvent

pytestmark = pytest.mark.integration

CRM_SECRET = "crm-Zq8-client-secret"
ACCOUNTING_TOKEN = "acc-Zq8-bearer-token"
SHIPPING_KEY = "shp-Zq8-api-key"
BASIC_PASSWORD = "basic-Zq8-password"

FAST: dict[str, Any] = {
    "backoff_base": 0.05,
    "backoff_cap": 0.5,
    "commit_interval": 0.3,
    "request_timeout": 5.0,
    "auth_pause": 1.0,
}


def lifecycle_of(created: list[OrderEvent], changed: int) -> list[OrderEvent]:
    """Every create, then an update and a cancel of the first `changed` orders (one key keeps its order)."""
    updates = [with_type(event, "order.updated", 100 + i) for i, event in enumerate(created[:changed])]
    cancels = [with_type(event, "order.cancelled", 200 + i) for i, event in enumerate(created[:changed])]
    return [*created, *updates, *cancels]


async def assert_later_events_used_the_created_id(sandbox: SandboxClient, system: str, numbers: set[str]) -> None:
    """Every PUT and DELETE of those orders went to ``/{system}/orders/{id}`` with the id the POST answered."""
    ledger = await sandbox.ledger(system)
    created = {entry["order_number"]: entry["id"] for entry in ledger if entry["method"] == "POST"}
    changes = [entry for entry in ledger if entry["method"] in ("PUT", "DELETE")]
    assert sorted((entry["order_number"], entry["method"]) for entry in changes) == sorted(
        (number, method) for number in numbers for method in ("PUT", "DELETE")
    )
    for entry in changes:
        assert entry["id"] == created[entry["order_number"]]
    requests = [r for r in await sandbox.requests(system) if r["method"] in ("PUT", "DELETE")]
    assert requests, f"{system}: no update or cancel reached the sandbox"
    for request in requests:
        assert request["order_number"] is not None
        assert request["path"] == f"/{system}/orders/{created[request['order_number']]}", request


async def test_three_sinks_with_three_schemes_deliver_and_oauth2_renews_once_after_a_revocation(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    await sandbox.configure_auth("crm", f"oauth2:orderbus-crm:{CRM_SECRET}:300")
    await sandbox.configure_auth("accounting", f"bearer:{ACCOUNTING_TOKEN}")
    await sandbox.configure_auth("shipping", f"header:X-Api-Key:{SHIPPING_KEY}")
    credentials = {
        "crm": {
            "type": "oauth2",
            "token_url": sandbox_process.token_url,
            "client_id": "orderbus-crm",
            "client_secret": CRM_SECRET,
            "scope": "orders",
        },
        "accounting": {"type": "bearer", "token": ACCOUNTING_TOKEN},
        "shipping": {"type": "api_key", "header": "X-Api-Key", "key": SHIPPING_KEY},
    }
    sinks: dict[str, dict[str, Any]] = {
        name: {"base_url": sandbox_process.system_url(name), "auth": credentials[name], **FAST} for name in SINKS
    }
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sinks)
    created = make_events(60, seed=21, prefix="SO-AUTH")
    later = make_events(20, seed=22, prefix="SO-AUTH-LATER")
    registry = CollectorRegistry()
    async with running_daemon(settings, registry):
        await produce(kafka_broker.bootstrap, orders_of(settings), lifecycle_of(created, changed=10))
        for name in SINKS:
            await sandbox.wait_ledger(name, 80, timeout=60)
        assert (await sandbox.stats())["oauth"]["token_requests"] == 1, "one token for every crm delivery"

        # The CRM's authorization server revokes the token: the next requests see 401, one renewal follows.
        assert await sandbox.revoke_tokens("orderbus-crm") == 1
        await produce(kafka_broker.bootstrap, orders_of(settings), later)
        for name in SINKS:
            await sandbox.wait_ledger(name, 100, timeout=60)

    stats = await sandbox.stats()
    assert stats["oauth"]["token_requests"] == 2, "exactly one renewal after the revocation"
    assert stats["oauth"]["scopes"] == {"orders": 2}
    assert stats["systems"]["crm"]["by_status"].get("401", 0) >= 1
    for name in ("accounting", "shipping"):
        assert "401" not in stats["systems"][name]["by_status"]
    assert (registry.get_sample_value("orderbus_auth_failures_total", {"sink": "crm"}) or 0) == 0, (
        "the 401s were answered by a renewal, not by a pause"
    )
    numbers = {event.order.order_number for event in created + later}
    for name in SINKS:
        ledger = await sandbox.ledger(name)
        assert Counter(entry["method"] for entry in ledger) == {"POST": 80, "PUT": 10, "DELETE": 10}
        assert {entry["order_number"] for entry in ledger} == numbers
        await assert_later_events_used_the_created_id(
            sandbox, name, {event.order.order_number for event in created[:10]}
        )
    logged = caplog.text + "".join(repr(vars(record)) for record in caplog.records)
    assert "oauth2 token obtained" in logged
    for secret in (CRM_SECRET, ACCOUNTING_TOKEN, SHIPPING_KEY):
        assert secret not in logged


async def test_basic_auth_and_the_downstream_id_across_a_restart(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    """The created ids are kept with the delivery state: after a restart, updates and cancels still use them."""
    for name in SINKS:
        await sandbox.configure_auth(name, f"basic:orderbus-{name}:{BASIC_PASSWORD}")
    sinks: dict[str, dict[str, Any]] = {
        name: {
            "base_url": sandbox_process.system_url(name),
            "auth": {"type": "basic", "username": f"orderbus-{name}", "password": BASIC_PASSWORD},
            **FAST,
        }
        for name in SINKS
    }
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sinks)
    created = make_events(12, seed=31, prefix="SO-IDS")
    async with running_daemon(settings):
        await produce(kafka_broker.bootstrap, orders_of(settings), created)
        for name in SINKS:
            await sandbox.wait_ledger(name, 12, timeout=60)
    changes = lifecycle_of(created, changed=6)[len(created) :]
    async with running_daemon(settings):
        await produce(kafka_broker.bootstrap, orders_of(settings), changes)
        for name in SINKS:
            await sandbox.wait_ledger(name, 24, timeout=60)
    for name in SINKS:
        await assert_later_events_used_the_created_id(sandbox, name, {e.order.order_number for e in created[:6]})
        assert all(r["status"] != 401 for r in await sandbox.requests(name))
