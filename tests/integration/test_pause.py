"""A sink paused by its settings, in the whole daemon: real Kafka, the sandbox systems, a reload that lets it go."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from support import apply_topics, committed_vs_end, make_events, orders_of, produce, sandbox_sinks, settings_for, until

from daemon.kafka_local import BrokerInfo
from daemon.lifecycle import serve
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.settings import Settings
from topics.catalogue import consumer_group

pytestmark = pytest.mark.integration

ORDERS = 20


async def test_a_paused_sink_sends_nothing_while_the_others_deliver_and_a_reload_lets_it_go(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    def settings(*, paused: bool) -> Settings:
        sinks = sandbox_sinks(sandbox_process)
        sinks["crm"] = {**sinks["crm"], "paused": paused}  # the CRM's maintenance window
        return settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sinks)

    running = settings(paused=True)
    await apply_topics(running)
    registry, stop, reload = CollectorRegistry(), asyncio.Event(), asyncio.Event()
    fresh = [settings(paused=False)]
    daemon = asyncio.create_task(serve(running, stop, registry=registry, reload=reload, load=fresh.pop))
    base = f"http://127.0.0.1:{running.ingest.port}"

    async def received(system: str) -> int:
        return len(await sandbox.orders(system))

    try:

        async def crm_holds_its_partitions() -> bool:
            try:
                async with aiohttp.ClientSession() as session, session.get(f"{base}/status") as response:
                    crm = (await response.json())["sinks"]["crm"]
            except aiohttp.ClientConnectionError:  # not listening yet
                return False
            return bool(crm["assigned_partitions"]) and crm["paused_by_settings"] is True

        await until(crm_holds_its_partitions)  # joined, and would deliver now were it not paused
        loop = asyncio.get_running_loop()
        began = loop.time()
        await produce(kafka_broker.bootstrap, orders_of(running), make_events(ORDERS, seed=3))

        async def others_have_all() -> bool:
            return await received("accounting") == await received("shipping") == ORDERS

        await until(others_have_all)
        # An absence is shown by waiting: as long again as the others took to deliver them all.
        await asyncio.sleep(loop.time() - began)
        assert await received("crm") == 0
        committed, ends = await committed_vs_end(
            kafka_broker.bootstrap, orders_of(running), consumer_group("crm", f"{unique_name}.")
        )
        assert sum(ends.values()) == ORDERS
        assert set(committed.values()) == {0}, "nothing fetched, nothing committed: the orders wait in Kafka"
        assert registry.get_sample_value("orderbus_sink_paused", {"sink": "crm"}) == 1
        assert registry.get_sample_value("orderbus_sink_paused", {"sink": "accounting"}) == 0
        async with aiohttp.ClientSession() as session, session.get(f"{base}/readyz") as response:
            ready = await response.json()
        assert response.status == 200, "paused on purpose: still ready, as a failing downstream leaves it"
        assert ready["degraded"] == {
            "sink.crm": "paused by its settings (sinks.crm.paused): nothing is sent; its orders wait in Kafka"
        }

        reload.set()  # `systemctl reload orderbus` after setting paused = false

        async def crm_has_all() -> bool:
            return await received("crm") == ORDERS

        await until(crm_has_all)
        assert registry.get_sample_value("orderbus_sink_paused", {"sink": "crm"}) == 0
        assert registry.get_sample_value("orderbus_deliveries_total", {"sink": "crm", "outcome": "delivered"}) == ORDERS
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(daemon, 60)
    assert daemon.done()
    daemon.result()
