"""A sink down while orders keep coming: the daemon process's memory stays flat while that sink's lag grows.

The daemon runs as a process (its own RSS, not the test's); crm answers 503 (or 429) to everything; accounting and
shipping deliver every wave, so the orders really flow. crm's buffer holds `max_buffered` (1,000) records, each its raw
bytes and the prepared request (not the decoded event), and its partitions stay paused while lag grows.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from support import committed_vs_end, make_events, produce
from test_crash import start_daemon, write_config

from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from topics.admin import apply_catalogue
from topics.catalogue import TopicLayout, catalogue, consumer_group, orders_topic

pytestmark = pytest.mark.integration

WAVE = 2000


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# 503: failures dominate, the circuit opens and pauses crm's partitions. 429 with Retry-After: the server sets
# the pace, the circuit stays closed, and only `max_buffered` stops the fetching.
DOWN = {"503": {"p503": 1.0}, "429": {"p429": 1.0, "retry_after": 1}}


@pytest.mark.parametrize("answer", sorted(DOWN))
async def test_memory_stays_flat_while_one_sink_is_down_and_orders_flow(
    answer: str,
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    prefix = f"{unique_name}."
    config = tmp_path / "orderbus.toml"
    write_config(config, kafka_broker, prefix, tmp_path / "state", sandbox_process)
    layout = TopicLayout(prefix=prefix, orders_partitions=6)
    await apply_catalogue(catalogue(layout), {"bootstrap_servers": kafka_broker.bootstrap})
    await sandbox.faults("crm", **DOWN[answer])
    daemon = start_daemon(config, tmp_path / "daemon.log")
    samples = []
    try:
        for wave in range(8):
            await produce(kafka_broker.bootstrap, orders_topic(prefix), make_events(WAVE, seed=wave, prefix=f"W{wave}"))
            for name in ("accounting", "shipping"):
                await sandbox.wait_ledger(name, WAVE * (wave + 1), timeout=120)
            samples.append(rss_mb(daemon.pid))
        committed, ends = await committed_vs_end(
            kafka_broker.bootstrap, orders_topic(prefix), consumer_group("crm", prefix)
        )
        assert sum(ends.values()) - sum(committed.values()) == 8 * WAVE, "crm's lag grew through the outage"
        assert await sandbox.ledger("crm") == []
    finally:
        daemon.terminate()
        daemon.wait(30)
    # The first wave fills crm's bounded buffer; from then on, 14,000 more orders change nothing that grows. Medians
    # of three samples, because the allocator's high-water marks move RSS by a few MB either way.
    early, late = statistics.median(samples[1:4]), statistics.median(samples[-3:])
    assert late <= early * 1.10, f"RSS per wave (MB): {samples}"
