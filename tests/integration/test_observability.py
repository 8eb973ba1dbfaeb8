"""Observability end to end: promtool on the shipped rules and on a real scrape, a real Prometheus answering every
dashboard query, /readyz following the broker, and logs that never carry personal data or secrets.

promtool and prometheus come from Debian's ``prometheus`` package (``make test`` installs it). Like Kafka, they
are never skipped: a missing binary fails the test with what to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import random
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from support import (
    PERSONAL_TOKENS,
    free_port,
    orders_of,
    personal_event,
    personal_submission,
    produce_raw,
    running_daemon,
    sandbox_sinks,
    settings_env,
    settings_for,
)

from daemon import kafka_local
from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.settings import AdminSettings, load_settings
from daemon.signature import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from daemon.status import render_status
from topics.catalogue import SINKS
from topics.samples import sample_submission

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "orderbus.json"
WEBHOOK_SECRET = "whsec_UXVhY2tlbmJ1c2hXZWJob29rU2VjcmV0MTIzNDU="
SINK_TOKEN = "sink-token-Tr0ub4dor-and-3"
SANDBOX_TOKEN = "sandbox-token-c0rrect-h0rse"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install prometheus (make test does it)", pytrace=False)
    return path


def run(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin.decode() if stdin else None, capture_output=True, text=True, timeout=30, cwd=RULES
    )


# ---------------------------------------------------------------------------------------------------- promtool


def test_promtool_accepts_the_scrape_config_and_the_rules_and_their_tests_pass() -> None:
    promtool = tool("promtool")
    for argv in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "rules.yml"),
        ("test", "rules", "rules_test.yml"),
    ):
        result = run(promtool, *argv)
        assert result.returncode == 0, f"promtool {' '.join(argv)}:\n{result.stdout}{result.stderr}"
        assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", (RULES / "rules.yml").read_text(), re.MULTILINE))
    assert alerts == {
        "OrderbusDown",
        "OrderbusConsumerLagGrowing",
        "OrderbusDeadLettersGrowing",
        "OrderbusCircuitOpen",
        "OrderbusSinkAuthFailing",
        "OrderbusSinkStalled",
        "OrderbusSinkPaused",
        "OrderbusSinkUnassigned",
        "OrderbusRecordUnreadable",
        "OrderbusBacklogNearRetention",
        "OrderbusRecordsExpired",
        "OrderbusStateReadFailed",
        "OrderbusIngestErrors",
        "OrderbusIngestConnectionLimit",
        "OrderbusNotReady",
        "OrderbusWebhookCertificateExpiring",
        "OrderbusWebhookCertificateExpiresSoon",
        "OrderbusKafkaCertificateExpiring",
        "OrderbusKafkaCertificateExpiresSoon",
    }
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", (RULES / "rules_test.yml").read_text())
    firing = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}
    assert firing == alerts
    assert quiet == alerts
    for rule in re.split(r"\n\s+- alert: ", (RULES / "rules.yml").read_text())[1:]:
        assert re.search(r"\n\s+for: \d+m\n", rule), rule.splitlines()[0]
        for annotation in ("summary", "description", "runbook"):
            assert f"{annotation}:" in rule, f"{rule.splitlines()[0]}: no {annotation}"


# ---------------------------------------------------------------------------------------------------- a real Prometheus


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    """A real Prometheus scraping `target` every second (with the shipped alert rules); yields its base URL."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(RULES / "rules.yml")],
        "scrape_configs": [{"job_name": "orderbus", "static_configs": [{"targets": [target]}]}],
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    log_file = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> list[dict[str, Any]]:
    async with session.get(f"{base}/api/v1/query", params={"query": promql}) as response:
        answer = await response.json()
    assert answer["status"] == "success", f"{promql}: {answer}"
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, sink or "", PromQL) for every target of every panel, variables substituted as Grafana does."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "15s").replace("$job", "orderbus")
            for sink in SINKS if "$sink" in expr else [""]:
                promql = expr.replace("$sink", sink)
                assert "$" not in promql, f"{panel['title']}: an unknown variable in {promql}"
                queries.append((panel["title"], sink, promql))
    return queries


def finite(result: list[dict[str, Any]]) -> list[float]:
    return [value for value in (float(series["value"][1]) for series in result) if math.isfinite(value)]


# Panels that must show something above zero once orders flow with the faults scripted below (others may be 0:
# no lag, a closed circuit, no commit failures).
# Panels whose series exist only with what this daemon runs without: HTTPS on the webhook, a Kafka client certificate
# (their metrics are read in test_https_daemon.py and test_kafka_security.py). Their queries must still run.
WITHOUT_DATA_HERE = {"Certificates: days left"}
MUST_MOVE = {
    "Ingest requests/s by status code",
    "Ingest publish latency (acks=all)",
    "Daemons up, ready, and their build",
    "Throughput (records/s)",
    "Outcomes (records/s)",
    "HTTP responses by status class (/s)",
    "Retries by reason (/s)",
    "Attempt latency",
    "End-to-end latency",
}


@contextlib.asynccontextmanager
async def order_traffic(base: str, per_second: float, *, prefix: str) -> AsyncIterator[list[int]]:
    """POST orders (and every tenth an invalid one) to the ingest until the block ends; yields the statuses."""
    statuses: list[int] = []

    async def post_forever(session: aiohttp.ClientSession) -> None:
        for n in range(1_000_000):
            if n % 10 == 9:
                body = b'{"order": {}}'
            else:
                number = f"{prefix}-{n:06d}"
                body = sample_submission(random.Random(n), order_number=number).model_dump_json().encode()
            headers = {"Content-Type": "application/json"}
            async with session.post(f"{base}/v1/orders", data=body, headers=headers) as response:
                statuses.append(response.status)
            await asyncio.sleep(1 / per_second)

    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(post_forever(session))
        try:
            yield statuses
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_real_prometheus_gets_data_for_every_dashboard_query_and_the_scrape_is_clean(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    prefix = "SO-OBS"
    rejected = [f"{prefix}-{n:06d}" for n in range(3, 400, 40)]
    await sandbox.faults("crm", p503=0.05, latency_ms=3, latency_jitter_ms=10)
    await sandbox.faults("accounting", p503=0.03, latency_ms=2, reject_order_numbers=rejected)
    await sandbox.faults("shipping", p503=0.02, p429=0.01, retry_after=1, latency_ms=4, latency_jitter_ms=5)
    settings = settings_for(
        kafka_broker,
        f"{unique_name}.",
        tmp_path / "state",
        sinks=sandbox_sinks(sandbox_process, backoff_cap=0.3, auth_pause=0.5),
    )
    # The metrics on a listener of their own (admin.port), as a host that takes webhooks from the internet has them.
    settings = settings.model_copy(update={"admin": AdminSettings(port=free_port())})
    admin = f"127.0.0.1:{settings.admin.port}"
    registry = CollectorRegistry()
    async with (
        running_daemon(settings, registry) as base,
        order_traffic(base, 40, prefix=prefix) as statuses,
        aiohttp.ClientSession() as session,
    ):
        with prometheus(tmp_path / "prometheus", admin) as prom:
            for name in SINKS:
                await sandbox.wait_ledger(name, 20, timeout=30)

            for path in ("/metrics", "/status"):
                async with session.get(f"{base}{path}") as response:
                    assert response.status == 404, f"{path} on the webhook's port"
            async with session.get(f"http://{admin}/metrics") as response:
                scrape = await response.read()
            lint = run(tool("promtool"), "check", "metrics", stdin=scrape)
            assert (lint.returncode, lint.stdout + lint.stderr) == (0, ""), "promtool check metrics"

            missing: list[str] = []
            for _ in range(60):
                missing = []
                for title, sink, promql in dashboard_queries():
                    values = finite(await query(session, prom, promql))  # a query that does not run fails here
                    if title in WITHOUT_DATA_HERE:
                        continue
                    if not values or (title in MUST_MOVE and max(values) <= 0):
                        missing.append(f"{title} [{sink}]: {promql} -> {values}")
                if not missing:
                    break
                await asyncio.sleep(0.5)
            assert missing == [], "\n".join(missing)

            async with session.get(f"{prom}/api/v1/rules") as response:
                groups = (await response.json())["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert (
                len(rules) == len(re.findall(r"^\s*- alert: ", (RULES / "rules.yml").read_text(), re.MULTILINE)) == 19
            )
            assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert {202, 400} <= set(statuses)
    for name in SINKS:
        assert (registry.get_sample_value("orderbus_retries_total", {"sink": name, "reason": "5xx"}) or 0) > 0
    labels = {"sink": "accounting", "reason": "rejected"}
    assert (registry.get_sample_value("orderbus_dead_letters_total", labels) or 0) > 0


# ---------------------------------------------------------------------------------------------------- /readyz


async def readiness(session: aiohttp.ClientSession, base: str, path: str = "/readyz") -> tuple[int, dict[str, Any]]:
    async with session.get(f"{base}{path}") as response:
        return response.status, await response.json()


async def wait_for(
    session: aiohttp.ClientSession,
    base: str,
    done: Callable[[int, dict[str, Any]], bool],
    timeout: float,
    path: str = "/readyz",
) -> tuple[int, dict[str, Any]]:
    """`path`'s answer (status, document) once `done` says so, or when `timeout` has passed."""
    deadline = time.monotonic() + timeout
    status, body = await readiness(session, base, path)
    while not done(status, body) and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        status, body = await readiness(session, base, path)
    return status, body


async def test_readyz_says_why_while_the_broker_is_down_and_recovers_when_it_is_back(
    private_broker: Callable[[], BrokerInfo], sandbox_process: SandboxProcess, unique_name: str, tmp_path: Path
) -> None:
    broker = private_broker()
    settings = settings_for(
        broker, f"{unique_name}.", tmp_path, sinks=sandbox_sinks(sandbox_process, backoff_cap=0.3, auth_pause=0.5)
    )
    expected = {"ingest", *(f"sink.{name}" for name in SINKS)}
    async with running_daemon(settings) as base, aiohttp.ClientSession() as session:
        status, body = await wait_for(session, base, lambda status, _: status == 200, 30)
        assert (status, body) == (200, {"status": "ready", "reasons": {}, "degraded": {}})

        await asyncio.to_thread(kafka_local.stop, broker.data_dir)
        status, body = await wait_for(session, base, lambda _, body: set(body["reasons"]) >= expected, 20)
        assert status == 503
        assert body["status"] == "not ready"
        assert set(body["reasons"]) == expected, body
        assert all("kafka" in reason for reason in body["reasons"].values()), body
        scraped = await (await session.get(f"{base}/metrics")).text()
        for component in expected:  # what OrderbusNotReady reads: the lag gauges keep their last figures
            assert f'orderbus_ready{{component="{component}"}} 0.0' in scraped, component

        await asyncio.to_thread(kafka_local.start, broker.data_dir)
        status, body = await wait_for(session, base, lambda status, _: status == 200, 45)
        assert (status, body) == (200, {"status": "ready", "reasons": {}, "degraded": {}})
        scraped = await (await session.get(f"{base}/metrics")).text()
        assert all(f'orderbus_ready{{component="{component}"}} 1.0' in scraped for component in expected)


async def test_without_the_ingest_the_status_says_why_the_sinks_kafka_is_unreachable(
    private_broker: Callable[[], BrokerInfo], sandbox_process: SandboxProcess, unique_name: str, tmp_path: Path
) -> None:
    # A sinks-only daemon has no publisher to say it: `daemon.kafka_watch` asks once a sink hears nothing.
    broker = private_broker()
    settings = settings_for(broker, f"{unique_name}.", tmp_path, sinks=sandbox_sinks(sandbox_process), enabled=False)
    async with running_daemon(settings) as base, aiohttp.ClientSession() as session:
        status, _ = await wait_for(session, base, lambda status, _: status == 200, 30)
        assert status == 200
        assert (await (await session.get(f"{base}/status")).json())["kafka_unreachable"] is None
        await asyncio.to_thread(kafka_local.stop, broker.data_dir)
        # Silent for 10 s, then looked at every 2 s.
        _, document = await wait_for(session, base, lambda _, body: bool(body["kafka_unreachable"]), 30, "/status")
        assert document["kafka_unreachable"] == (
            "connection refused: no broker listens there (kafka.bootstrap_servers), or it is down"
        )
        assert f"kafka: UNREACHABLE: {document['kafka_unreachable']}" in render_status(document).splitlines()
        await asyncio.to_thread(kafka_local.start, broker.data_dir)
        status, _ = await wait_for(session, base, lambda status, _: status == 200, 45)
        assert status == 200
        _, document = await wait_for(session, base, lambda _, body: body["kafka_unreachable"] is None, 10, "/status")
        assert document["kafka_unreachable"] is None


async def test_an_instance_without_partitions_is_ready(
    kafka_broker: BrokerInfo, sandbox_process: SandboxProcess, unique_name: str, tmp_path: Path
) -> None:
    # One partition of orders and one of crm's replay topic, three instances: the group gives two of them nothing
    # (the range assignor gives both partitions 0 to the first member). A member without partitions waits for
    # work, as every member does during a rebalance: not an instance to take out of a load balancer.
    sinks = {"crm": sandbox_sinks(sandbox_process)["crm"]}
    env = {"ORDERBUS_TOPICS__DLQ_PARTITIONS": "1"}
    settings = [
        load_settings(
            None, env={**settings_env(kafka_broker, f"{unique_name}.", tmp_path / n, partitions=1, sinks=sinks), **env}
        )
        for n in "abc"
    ]
    async with contextlib.AsyncExitStack() as stack:
        bases = [await stack.enter_async_context(running_daemon(s, CollectorRegistry())) for s in settings]
        session = await stack.enter_async_context(aiohttp.ClientSession())

        async def assignments() -> list[list[int]]:
            assigned = []
            for base in bases:
                async with session.get(f"{base}/status") as response:
                    assigned.append((await response.json())["sinks"]["crm"]["assigned_partitions"])
            return sorted(assigned)

        deadline = time.monotonic() + 60
        while (assigned := await assignments()) != [[], [], [0]] and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.25)  # each instance's join is a rebalance of all
        assert assigned == [[], [], [0]]
        for base in bases:  # those without a partition too, once their join is complete
            ready = await wait_for(session, base, lambda status, _: status == 200, 30)
            assert ready == (200, {"status": "ready", "reasons": {}, "degraded": {}}), ready


# ---------------------------------------------------------------------------------------------------- logs


def signed(key: str, body: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    now = int(time.time())
    return {
        "Content-Type": "application/json",
        "Idempotency-Key": key,
        ID_HEADER: key,
        TIMESTAMP_HEADER: str(now),
        SIGNATURE_HEADER: sign(secret, key, now, body),
    }


async def test_no_log_line_carries_personal_data_or_a_secret_on_any_path(
    json_logs: io.StringIO,
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
) -> None:
    orders = [personal_submission(n, order_number=f"SO-PII-{n}") for n in range(6)]
    # Without event ids of their own: the idempotency keys say which request repeats which.
    bodies = [order.model_dump_json(exclude={"event_id"}).encode() for order in orders]
    await sandbox.script("crm", [{"status": 503, "times": 2, "match": {"order_number": "SO-PII-1"}}])
    await sandbox.faults("accounting", reject_order_numbers=["SO-PII-2"])
    await sandbox.configure_auth("shipping", f"bearer:{SANDBOX_TOKEN}")  # not what orderbus sends: 401
    bearer = {"auth": {"type": "bearer", "token": SINK_TOKEN}}
    settings = settings_for(
        kafka_broker,
        f"{unique_name}.",
        tmp_path,
        sinks=sandbox_sinks(sandbox_process, backoff_cap=0.3, auth_pause=0.5, **bearer),
        webhook_secrets=json.dumps([WEBHOOK_SECRET]),
    )
    registry = CollectorRegistry()

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    async with running_daemon(settings, registry) as base, aiohttp.ClientSession() as session:

        async def post(body: bytes, headers: dict[str, str]) -> int:
            async with session.post(f"{base}/v1/orders", data=body, headers=headers) as response:
                return response.status

        statuses = [await post(body, signed(f"key-{n}", body)) for n, body in enumerate(bodies)]
        statuses.append(await post(bodies[1], signed("key-0", bodies[1])))  # another body: 422
        same = personal_submission(6, order_number="SO-PII-6").model_dump_json(exclude={"event_id"}).encode()
        statuses += await asyncio.gather(*(post(same, signed("key-6", same)) for _ in range(20)))
        invalid = json.loads(bodies[3])
        invalid["order"]["customer"]["email"] = "Zebulon Quackenbush at private-mailbox"
        invalid_body = json.dumps(invalid).encode()
        statuses.append(await post(invalid_body, signed("key-7", invalid_body)))
        statuses.append(await post(bodies[3], signed("key-8", bodies[3], secret="whsec_" + "QQ" * 16)))
        poison = json.loads(personal_event(9, order_number="SO-PII-POISON").model_dump_json())
        del poison["schema_version"]
        await produce_raw(
            kafka_broker.bootstrap, orders_of(settings), [(b"SO-PII-POISON", json.dumps(poison).encode())]
        )

        for _ in range(200):
            if sample("orderbus_auth_failures_total", sink="shipping") > 0:
                break
            await asyncio.sleep(0.05)
        await sandbox.configure_auth("shipping", None)  # credentials accepted again: the pause ends
        await sandbox.wait_ledger("crm", 7, timeout=30)
        await sandbox.wait_ledger("accounting", 6, timeout=30)
        await sandbox.wait_ledger("shipping", 7, timeout=30)
        for _ in range(200):
            if all(sample("orderbus_dead_letters_total", sink=name, reason="invalid") for name in SINKS):
                break
            await asyncio.sleep(0.05)

    assert {202, 400, 401, 409, 422} <= set(statuses), statuses
    assert sample("orderbus_retries_total", sink="crm", reason="5xx") == 2
    assert sample("orderbus_dead_letters_total", sink="accounting", reason="rejected") == 1
    assert sample("orderbus_auth_failures_total", sink="shipping") >= 1
    text = json_logs.getvalue()
    events = [json.loads(line) for line in text.splitlines()]
    readable = "\n".join(json.dumps(event, ensure_ascii=False) for event in events).lower()
    for token in PERSONAL_TOKENS:
        assert token.lower() not in readable, f"{token!r} was logged"
    for secret in (WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_"), SINK_TOKEN, SANDBOX_TOKEN):
        assert secret not in text, "a secret was logged"

    def logged(msg: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in events if e["msg"] == msg and all(e.get(k) == v for k, v in fields.items())]

    assert logged("starting"), "the effective settings are logged once, masked"
    for status in (400, 401, 409, 422):
        assert logged("order refused", status=status), status
    assert len(logged("order published", status=202)) == 7
    for name in SINKS:
        assert logged("delivered", sink=name, status=201)
        assert logged("dead-lettered", sink=name, reason="invalid", order="SO-PII-POISON")
    [retry, _] = logged("attempt failed, will retry", sink="crm", order="SO-PII-1")
    assert (retry["attempt"], retry["status"]) == (1, 503)
    assert logged("dead-lettered", sink="accounting", reason="rejected", order="SO-PII-2", status=400)
    assert logged("downstream refused our credentials; sink paused", sink="shipping", status=401)
    for event in logged("delivered") + logged("dead-lettered", reason="rejected"):
        assert {"sink", "event_id", "order", "attempt", "status"} <= set(event), event
