"""The delivery engine end to end, in-process: real Kafka, the sandbox systems in their own process, SQLite files.

Each test runs the whole daemon (`daemon.lifecycle.serve`) with the three sinks pointed at the sandbox.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry
from support import (
    committed_vs_end,
    make_events,
    orders_of,
    produce,
    produce_raw,
    produce_unreadable,
    read_topic,
    running_daemon,
    sandbox_sinks,
    settings_for,
    with_type,
)

from consumers.deadletter import read_headers
from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.trace import trace
from topics.catalogue import SINKS, consumer_group, dlq_topic

pytestmark = pytest.mark.integration


async def settle_commits(settings: Any, bootstrap: str) -> None:
    """Every sink group has committed up to the end of the orders topic."""
    for sink in SINKS:
        committed, ends = await committed_vs_end(
            bootstrap, orders_of(settings), consumer_group(sink, settings.topics.prefix)
        )
        assert committed == ends, f"{sink}: committed {committed} != end {ends}"


async def until_committed(settings: Any, bootstrap: str, timeout: float = 60.0) -> None:
    """While the daemon runs: until every sink has committed the whole orders topic. A record whose effect is in
    a ledger may still be finishing (a lost answer's resend, parked in its backoff), and a clean stop commits only
    what is finished: stopped at that moment, the group would rightly stop short of it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await settle_commits(settings, bootstrap)
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.3)


async def unreadable_gauges(registry: CollectorRegistry, expected: float) -> list[float | None]:
    """Every sink's `orderbus_unreadable_partitions` once all show `expected`, or as they are after 10 s."""
    for _ in range(100):
        gauges = [registry.get_sample_value("orderbus_unreadable_partitions", {"sink": s}) for s in SINKS]
        if gauges == [expected] * len(SINKS):
            break
        await asyncio.sleep(0.1)
    return gauges


async def test_mixed_faults_over_5000_orders_apply_each_exactly_once_per_sink(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    events = make_events(5000, seed=11)
    rng = random.Random(5)
    rejected = {name: sorted(rng.sample([e.order.order_number for e in events], 15)) for name in SINKS}
    for name in SINKS:
        await sandbox.faults(
            name,
            p503=0.05,
            p429=0.002,
            retry_after=1,
            p_reset_after_effect=0.01,
            p_timeout=0.002,
            timeout_s=3,
            reject_order_numbers=rejected[name],
        )
    poison: list[tuple[bytes | None, bytes | None]] = [
        (b"SO-POISON-1", b"not json"),
        (b"SO-POISON-2", b'{"schema_version": 1}'),
        (None, b"\xff"),
    ]
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sandbox_sinks(sandbox_process))
    async with running_daemon(settings):
        await produce(kafka_broker.bootstrap, orders_of(settings), events)
        await produce_raw(kafka_broker.bootstrap, orders_of(settings), poison)
        for name in SINKS:
            await sandbox.wait_ledger(name, 5000 - 15, timeout=240)
        dead = {}
        for name in SINKS:
            for _ in range(200):
                dead[name] = await read_topic(kafka_broker.bootstrap, dlq_topic(name, settings.topics.prefix))
                if len(dead[name]) >= 15 + len(poison):
                    break
                await asyncio.sleep(0.2)
        await until_committed(settings, kafka_broker.bootstrap)
    stats = await sandbox.stats()
    for name in SINKS:
        ledger = await sandbox.ledger(name)
        applied = Counter(entry["order_number"] for entry in ledger)
        expected = {e.order.order_number for e in events} - set(rejected[name])
        assert set(applied) == expected, f"{name}: lost {len(expected - set(applied))}"
        assert max(applied.values()) == 1, f"{name}: applied twice: {[k for k, v in applied.items() if v > 1][:5]}"
        reasons = Counter(read_headers(headers)["reason"] for _, _, headers in dead[name])
        assert reasons == {"rejected": 15, "invalid": len(poison)}, reasons
        dead_orders = sorted(
            (key or b"").decode() for key, _, headers in dead[name] if read_headers(headers)["reason"] == "rejected"
        )
        assert dead_orders == rejected[name]
        assert stats["systems"][name]["resets"] > 0, "the run really had ambiguous outcomes"
    await settle_commits(settings, kafka_broker.bootstrap)


async def test_retry_after_holds_that_sink_while_the_others_deliver(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    await sandbox.script("crm", [{"status": 429, "retry_after": 2}])
    await sandbox.faults("*", latency_ms=20)
    events = make_events(300, seed=2)
    # One request at a time, so no request is already on the wire when the 429 arrives.
    settings = settings_for(
        kafka_broker, f"{unique_name}.", tmp_path, sinks=sandbox_sinks(sandbox_process, max_in_flight=1)
    )
    async with running_daemon(settings):
        await produce(kafka_broker.bootstrap, orders_of(settings), events)
        for name in SINKS:
            await sandbox.wait_ledger(name, 300, timeout=60)
    crm = sorted(await sandbox.requests("crm"), key=lambda r: r["received_at"])
    throttled = next(r for r in crm if r["status"] == 429)
    answered = throttled["answered_at"]
    assert answered is not None
    later = [r["received_at"] for r in crm if r["received_at"] > throttled["received_at"]]
    assert later
    assert min(later) >= answered + 2.0, "crm was held for the whole Retry-After"
    others = [
        r for name in ("accounting", "shipping") for r in await sandbox.requests(name)
        if answered < r["received_at"] < answered + 2.0
    ]  # fmt: skip
    assert len(others) > 10, "accounting and shipping kept delivering meanwhile"


async def test_one_orders_events_reach_each_sink_in_order_across_retries(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    [created] = make_events(1, seed=9, prefix="SO-ORDER")
    events = [created, with_type(created, "order.updated", 1), with_type(created, "order.cancelled", 2)]
    others = make_events(50, seed=10)
    number = created.order.order_number
    await sandbox.script("crm", [{"status": 503, "times": 3, "match": {"method": "POST", "order_number": number}}])
    await sandbox.script(
        "shipping", [{"reset_after_effect": True, "match": {"method": "POST", "order_number": number}}]
    )
    await sandbox.script(
        "accounting", [{"status": 500, "times": 2, "match": {"method": "PUT", "order_number": number}}]
    )
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sandbox_sinks(sandbox_process))
    async with running_daemon(settings):
        await produce(
            kafka_broker.bootstrap, orders_of(settings), [events[0], *others[:25], events[1], *others[25:], events[2]]
        )
        for name in SINKS:
            await sandbox.wait_ledger(name, 53, timeout=60)
    for name in SINKS:
        methods = [e["method"] for e in await sandbox.ledger(name) if e["order_number"] == number]
        assert methods == ["POST", "PUT", "DELETE"], f"{name}: {methods}"
        requests = [r for r in await sandbox.requests(name) if r["order_number"] == number]
        first_put = next(i for i, r in enumerate(requests) if r["method"] == "PUT")
        assert all(r["method"] == "POST" for r in requests[:first_put]), f"{name}: nothing overtook the create"


async def test_a_sink_down_for_the_whole_run_stays_bounded_then_catches_up(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    await sandbox.faults("crm", p503=1.0)
    events = make_events(1500, seed=4)
    registry = CollectorRegistry()
    settings = settings_for(
        kafka_broker, f"{unique_name}.", tmp_path, sinks=sandbox_sinks(sandbox_process, max_buffered=100)
    )

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"sink": "crm", **labels}) or 0.0

    async with running_daemon(settings, registry) as base:
        await produce(kafka_broker.bootstrap, orders_of(settings), events)
        await sandbox.wait_ledger("accounting", 1500, timeout=90)
        await sandbox.wait_ledger("shipping", 1500, timeout=90)
        async with aiohttp.ClientSession() as session:
            for _ in range(100):  # the circuit is open between its probes
                async with session.get(f"{base}/readyz") as response:
                    assert response.status == 200, "ready: the CRM's outage is no reason to refuse webhooks"
                    degraded = (await response.json())["degraded"]
                if degraded:
                    break
                await asyncio.sleep(0.1)
        assert degraded == {"sink.crm": "circuit open: the downstream keeps failing"}

        def crm_lag() -> float:
            return sum(sample("orderbus_consumer_lag", partition=str(p)) for p in range(6))

        for _ in range(100):  # the lag is measured every 2 s
            if crm_lag() >= 1400:
                break
            await asyncio.sleep(0.1)
        buffered, lag = [], []
        for _ in range(20):
            buffered.append(sample("orderbus_buffered_records"))
            lag.append(crm_lag())
            await asyncio.sleep(0.1)
        assert max(buffered) <= 100
        assert min(lag) >= 1400, "the lag shows the outage"
        assert await sandbox.ledger("crm") == []
        await sandbox.faults("crm", latency_ms=100)  # back, answering in 100 ms: the slow start lasts ~1 s
        limits: list[int] = []
        async with aiohttp.ClientSession() as session:
            for _ in range(1800):  # the next probe comes after the circuit's pause, doubled by each failed probe
                async with session.get(f"{base}/status") as response:
                    limit = (await response.json())["sinks"]["crm"]["ramp_limit"]
                if limit is not None:
                    limits.append(limit)
                elif limits:
                    break
                await asyncio.sleep(0.05)
        assert limits, "the sink ramped up after its circuit closed"
        assert limits[0] <= 8, limits
        assert limits == sorted(limits), "no failures: it only widens"
        await sandbox.wait_ledger("crm", 1500, timeout=120)
        for _ in range(100):
            if crm_lag() == 0:
                break
            await asyncio.sleep(0.1)
        assert crm_lag() == 0
    await settle_commits(settings, kafka_broker.bootstrap)


async def test_batches_compressed_by_the_producer_or_the_broker_are_delivered(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    """Upstream producers compress their batches (Kafka's clients offer gzip, snappy, lz4 and zstd), and a topic's
    ``compression.type`` makes the broker recompress whatever it is sent: a sink that could not decompress a codec
    would stop at its partition's first such batch."""
    codecs = ("gzip", "snappy", "lz4", "zstd")
    events = make_events(200, seed=12)
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sandbox_sinks(sandbox_process))
    async with running_daemon(settings):
        for i, codec in enumerate(codecs):
            await produce(kafka_broker.bootstrap, orders_of(settings), events[i * 40 : (i + 1) * 40], compression=codec)
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
        await admin.start()
        try:  # the broker now compresses what it is sent (the last slice, sent uncompressed) with lz4
            topic = ConfigResource(ConfigResourceType.TOPIC, orders_of(settings), {"compression.type": "lz4"})
            await admin.alter_configs([topic])
        finally:
            await admin.close()
        await produce(kafka_broker.bootstrap, orders_of(settings), events[160:])
        for name in SINKS:
            ledger = await sandbox.wait_ledger(name, 200, timeout=60)
            assert sorted(e["order_number"] for e in ledger) == sorted(e.order.order_number for e in events), name
    await settle_commits(settings, kafka_broker.bootstrap)


async def test_a_record_the_client_cannot_read_holds_its_partition_and_nothing_else(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A header name that is not UTF-8 makes aiokafka's `getmany` raise: the sinks deliver every other partition
    and this one up to the record (the records before it in its own batch too), hold it there, say where, and the
    daemon runs on."""
    events = make_events(240, seed=13)
    batch = make_events(4, seed=15, prefix="SO-BATCH")  # one batch on the held partition: two, the bad one, one
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=sandbox_sinks(sandbox_process))
    partitions = list(range(6))
    partition_of = {
        e.order.order_number: DefaultPartitioner()(e.order.order_number.encode(), partitions, partitions)
        for e in events
    }
    before, after = events[:120], events[120:]
    held = 2
    expected = sorted(n for n in partition_of if partition_of[n] != held) + sorted(
        [e.order.order_number for e in before if partition_of[e.order.order_number] == held]
        + [e.order.order_number for e in batch[:2]]
    )
    registry = CollectorRegistry()
    async with running_daemon(settings, registry) as base:
        await produce(kafka_broker.bootstrap, orders_of(settings), before)
        offsets = await produce_unreadable(kafka_broker.bootstrap, orders_of(settings), held, batch, bad=2)
        offset = offsets[2]
        await produce(kafka_broker.bootstrap, orders_of(settings), after)
        for name in SINKS:
            ledger = await sandbox.wait_ledger(name, len(expected), timeout=60)
            assert sorted(e["order_number"] for e in ledger) == sorted(expected), name
        assert await unreadable_gauges(registry, 1.0) == [1.0] * 3
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200, "the daemon runs on"
            async with session.get(f"{base}/readyz") as response:
                assert response.status == 200, "ready: the ingest and the other partitions work"
                degraded = (await response.json())["degraded"]
            async with session.get(f"{base}/status") as response:
                status = await response.json()
        where = f"{orders_of(settings)}:{held}"
        for name in SINKS:
            assert f"{where} at {offset}" in degraded[f"sink.{name}"]
            assert status["sinks"][name]["unreadable"] == {where: offset}
        for name in SINKS:
            assert len(await sandbox.ledger(name)) == len(expected), f"{name}: nothing past the unreadable record"
    assert offsets == list(range(offsets[0], offsets[0] + 4)), "one batch, in order"
    holds = [r for r in caplog.records if r.getMessage() == "records cannot be read: partition held"]
    assert {(r.sink, r.partition, r.offset) for r in holds} == {(s, held, offset) for s in SINKS}  # type: ignore[attr-defined]
    assert all("UnicodeDecodeError" in r.error for r in holds)  # type: ignore[attr-defined]

    # The operator skips it, as `orderbus status` named it: restarted with the setting (a reload applies it too), each
    # sink dead-letters the record in its place and delivers the rest of the partition. The record after it in its
    # batch goes too: aiokafka decodes a fetched batch whole, so it cannot be read past the bad record either.
    skip = sandbox_sinks(sandbox_process, skip_unreadable=[f"{where}@{offset}"])
    skipping = settings_for(kafka_broker, f"{unique_name}.", tmp_path, sinks=skip)
    everything = sorted(e.order.order_number for e in [*events, batch[0], batch[1]])
    registry = CollectorRegistry()
    async with running_daemon(skipping, registry):
        for name in SINKS:
            ledger = await sandbox.wait_ledger(name, len(everything), timeout=60)
            assert sorted(e["order_number"] for e in ledger) == everything, name
        assert await unreadable_gauges(registry, 0.0) == [0.0] * 3
    for name in SINKS:
        letters = [
            read_headers(headers)
            for _, _, headers in await read_topic(kafka_broker.bootstrap, dlq_topic(name, settings.topics.prefix))
        ]
        assert [(m["reason"], m["topic"], m["partition"], m["offset"]) for m in letters] == [
            ("invalid", orders_of(settings), str(held), str(offset)),
            ("invalid", orders_of(settings), str(held), str(offset + 1)),
        ], name
        assert "cannot read the record at or after this offset (UnicodeDecodeError" in letters[0]["detail"]
        assert "its batch holds one it cannot" in letters[1]["detail"]
    # `orderbus trace` over the partition whose bytes are still there: it says where it stopped, not a traceback.
    found, _ = await trace(skipping, batch[3].order.order_number, all_partitions=True)
    assert found.unreadable is not None
    assert "UnicodeDecodeError" in found.unreadable
