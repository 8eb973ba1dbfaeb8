"""End to end, as a user runs it: ``orderbus run --config FILE`` as a process, orders in through the signed webhook,
out at the three sandbox systems, each system's ledger checked exactly; and ``orderbus demo`` as ``make run`` runs it.

The daemon reads a TOML file and takes its secrets from files named by ``ORDERBUS_*_FILE`` variables, as under
systemd. Each system demands its own credentials (bearer, basic, OAuth2 client credentials) and misbehaves a
little (503s, 429 + Retry-After, answers lost after the effect, rejected orders), so "exactly once, in order"
is measured against retries, not against a quiet downstream.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from support import apply_topics, committed_vs_end, free_port, make_events, orders_of, produce, settings_for

from daemon import kafka_local
from daemon.demo import _Progress
from daemon.demo_settings import DEMO_CONFIG, DemoOptions, demo_layout, sandbox_auth
from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.signature import sign
from topics.catalogue import SINKS, consumer_group
from topics.envelope import EventType, OrderSubmission
from topics.errors import ConfigError
from topics.samples import sample_submission

pytestmark = pytest.mark.integration

WEBHOOK_SECRET = "whsec_ZTJlLXRlc3Qtd2ViaG9vay1zZWNyZXQ"
CRM_TOKEN = "e2e-crm-bearer-token"
ACCOUNTING_PASSWORD = "e2e-accounting-password"
SHIPPING_SECRET = "e2e-shipping-client-secret"
ORDERS, UPDATED, CANCELLED, REPEATED = 300, 60, 30, 40
METHOD: Mapping[EventType, str] = {"order.created": "POST", "order.updated": "PUT", "order.cancelled": "DELETE"}


def write_config(path: Path, broker: BrokerInfo, prefix: str, state: Path, sandbox: SandboxProcess, port: int) -> None:
    """The user's file: no secret in it, only the auth types; secrets come as files (`secret_env`)."""
    auth = {
        "crm": ['type = "bearer"'],
        "accounting": ['type = "basic"', 'username = "orderbus"'],
        "shipping": ['type = "oauth2"', f'token_url = "{sandbox.token_url}"', 'client_id = "orderbus-shipping"'],
    }
    lines = [
        f'state_dir = "{state}"',
        'log_level = "INFO"',
        "[kafka]",
        f'bootstrap_servers = "{broker.bootstrap}"',
        "[topics]",
        f'prefix = "{prefix}"',
        "orders_partitions = 6",
        "[ingest]",
        f"port = {port}",
    ]
    for name in SINKS:
        lines += [
            f"[sinks.{name}]",
            "enabled = true",
            f'base_url = "{sandbox.system_url(name)}"',
            "backoff_base = 0.05",
            "backoff_cap = 0.5",
            "max_attempts = 100",
            "commit_interval = 0.2",
            "shutdown_grace = 5",
            "request_timeout = 5",
            f"[sinks.{name}.auth]",
            *auth[name],
        ]
    path.write_text("\n".join(lines) + "\n")


def secret_env(directory: Path) -> dict[str, str]:
    """Every secret in a file of its own, handed over the way systemd credentials are."""
    secrets = {
        "ORDERBUS_INGEST__WEBHOOK_SECRETS_FILE": WEBHOOK_SECRET,
        "ORDERBUS_SINKS__CRM__AUTH__TOKEN_FILE": CRM_TOKEN,
        "ORDERBUS_SINKS__ACCOUNTING__AUTH__PASSWORD_FILE": ACCOUNTING_PASSWORD,
        "ORDERBUS_SINKS__SHIPPING__AUTH__CLIENT_SECRET_FILE": SHIPPING_SECRET,
    }
    directory.mkdir()
    env = {}
    for name, value in secrets.items():
        file = directory / name.lower()
        file.write_text(value + "\n")
        env[name] = str(file)
    return env


def orderbus(*args: str, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", *args], env={**os.environ, **env}, stdout=out, stderr=out
        )


def orderbus_done(*args: str, env: Mapping[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def until_ready(base: str, daemon: subprocess.Popen[bytes], log: Path) -> None:
    """/readyz answers 200: Kafka answers and every sink has partitions."""
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert daemon.poll() is None, tail(log)
            try:
                async with session.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"not ready within 60 s:\n{tail(log)}")


def terminate(daemon: subprocess.Popen[bytes], log: Path) -> None:
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0, tail(log)


def tail(log: Path) -> str:
    return log.read_text()[-3000:]


@pytest.fixture
def daemons() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Daemons the test started; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@dataclass
class Shop:
    """Posts signed webhooks and remembers, per order, the event ids of the events the ingest accepted."""

    session: aiohttp.ClientSession
    url: str
    events: dict[str, list[tuple[EventType, str]]] = field(default_factory=dict)
    sent: dict[str, bytes] = field(default_factory=dict)  # webhook-id -> body
    answers: list[tuple[int, bool]] = field(default_factory=list)  # (status, replayed)

    async def post(self, msg_id: str, body: bytes) -> tuple[str, bool]:
        """(event id, replayed) of a signed POST; anything but 202 fails the test."""
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(WEBHOOK_SECRET, msg_id, timestamp, body),
        }
        async with self.session.post(self.url, data=body, headers=headers) as response:
            answer = await response.json()
            replayed = response.headers.get("Idempotent-Replayed") == "true"
            self.answers.append((response.status, replayed))
            assert response.status == 202, answer
            return str(answer["event_id"]), replayed

    async def send(self, submission: OrderSubmission, msg_id: str) -> None:
        body = submission.model_dump_json().encode()
        self.sent[msg_id] = body
        event_id, replayed = await self.post(msg_id, body)
        assert not replayed
        self.events.setdefault(submission.order.order_number, []).append((submission.event_type, event_id))

    async def repeat(self, msg_id: str) -> None:
        """The same webhook again (a retry after a lost answer): the first answer, nothing published."""
        event_id, replayed = await self.post(msg_id, self.sent[msg_id])
        assert replayed
        assert event_id in {seen for events in self.events.values() for _, seen in events}


async def send_orders(
    shop: Shop, rng: random.Random, created: dict[str, OrderSubmission] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Creates, then updates, then cancels (each phase once the previous was accepted), with repeats between."""
    numbers = [f"SO-E2E-{i:05d}" for i in range(ORDERS)]
    # With discounts and shipping charges: most orders have one or both (`topics.samples`).
    creates = {n: sample_submission(random.Random(i), order_number=n, charges=True) for i, n in enumerate(numbers)}
    create_ids = {n: f"msg_create_{n}" for n in numbers}
    if created is not None:
        created.update(creates)
    limit = asyncio.Semaphore(16)

    async def one(submission: OrderSubmission, msg_id: str) -> None:
        async with limit:
            await shop.send(submission, msg_id)

    async def again(msg_id: str) -> None:
        async with limit:
            await shop.repeat(msg_id)

    def change(number: str, event_type: EventType, seed: int) -> OrderSubmission:
        order = creates[number].order
        later = order.model_copy(update={"paid": True, "updated_at": order.updated_at.replace(year=2027)})
        fresh = sample_submission(random.Random(seed))
        return OrderSubmission(event_type=event_type, event_id=fresh.event_id, order=later)

    await asyncio.gather(*(one(creates[n], create_ids[n]) for n in numbers))
    updated = numbers[:UPDATED]
    cancelled = numbers[UPDATED - CANCELLED // 2 : UPDATED + CANCELLED // 2]  # half of them updated before
    repeats = rng.sample(numbers, REPEATED)
    await asyncio.gather(
        *(one(change(n, "order.updated", 1000 + i), f"msg_update_{n}") for i, n in enumerate(updated)),
        *(again(create_ids[n]) for n in repeats[: REPEATED // 2]),
    )
    await asyncio.gather(
        *(one(change(n, "order.cancelled", 2000 + i), f"msg_cancel_{n}") for i, n in enumerate(cancelled)),
        *(again(create_ids[n]) for n in repeats[REPEATED // 2 :]),
        *(again(f"msg_update_{n}") for n in updated[:5]),
    )
    return numbers, create_ids


async def test_orders_through_the_signed_webhook_reach_each_system_exactly_once_in_order(
    kafka_broker: BrokerInfo,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    unique_name: str,
    tmp_path: Path,
    daemons: list[subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    config, log, state = tmp_path / "orderbus.toml", tmp_path / "orderbus.log", tmp_path / "state"
    write_config(config, kafka_broker, f"{unique_name}.", state, sandbox_process, port)
    env = secret_env(tmp_path / "credentials")
    rejected = [f"SO-E2E-{i:05d}" for i in (10, 50, 200)]  # updated; updated and cancelled; created only
    await sandbox.configure_auth("crm", f"bearer:{CRM_TOKEN}")
    await sandbox.configure_auth("accounting", f"basic:orderbus:{ACCOUNTING_PASSWORD}")
    await sandbox.configure_auth("shipping", f"oauth2:orderbus-shipping:{SHIPPING_SECRET}:3600")
    flaky = {"p503": 0.05, "p_reset_after_effect": 0.02, "latency_ms": 2}
    await sandbox.script("crm", [{"status": 429, "retry_after": 1}])  # one for sure, more drawn below
    await sandbox.faults("crm", **flaky, p429=0.01, retry_after=1)
    await sandbox.faults("accounting", **flaky, reject_order_numbers=rejected)
    await sandbox.faults("shipping", **flaky)

    applied = orderbus_done("topics", "apply", "--config", str(config), env=env)
    assert applied.returncode == 0, applied.stderr
    daemons.append(daemon := orderbus("run", "--config", str(config), env=env, log=log))
    base = f"http://127.0.0.1:{port}"
    await until_ready(base, daemon, log)
    async with aiohttp.ClientSession() as session:
        shop = Shop(session, f"{base}/v1/orders")
        submitted: dict[str, OrderSubmission] = {}
        numbers, _ = await send_orders(shop, random.Random(4), submitted)
    assert len(shop.answers) == ORDERS + UPDATED + CANCELLED + REPEATED + 5
    assert sum(replayed for _, replayed in shop.answers) == REPEATED + 5

    expected = {
        name: {
            number: [(METHOD[event_type], event_id) for event_type, event_id in shop.events[number]]
            for number in numbers
            if not (name == "accounting" and number in rejected)
        }
        for name in SINKS
    }
    for name in SINKS:
        await sandbox.wait_ledger(name, sum(map(len, expected[name].values())), timeout=120)
    terminate(daemon, log)

    stats = await sandbox.stats()
    for name in SINKS:
        ledger = await sandbox.ledger(name)
        effects: dict[str, list[tuple[str, str | None]]] = {}
        for entry in ledger:  # in the order the system applied them
            effects.setdefault(entry["order_number"], []).append((entry["method"], entry["event_id"]))
        assert effects == expected[name], f"{name}: not each event exactly once, in order"
        keys = [entry["idempotency_key"] for entry in ledger]
        assert len(set(keys)) == len(keys)
        assert stats["systems"][name]["by_status"].get("503", 0) > 0, f"{name} really failed now and then"
    assert stats["total"]["duplicate_requests"] > 0, "lost answers were retried and absorbed by the keys"

    # The discounts and shipping charges reached accounting as sent, and the delivery method shipping.
    kept = set(numbers[UPDATED + CANCELLED // 2 :]) - set(rejected)  # created only: their bodies are the creates'
    booked = {order["order_number"]: order["body"] for order in await sandbox.orders("accounting")}
    shipped = {order["order_number"]: order["body"] for order in await sandbox.orders("shipping")}
    charged = [n for n in sorted(kept) if submitted[n].order.shipping is not None]
    discounted = [n for n in sorted(kept) if any(line.discount_amount for line in submitted[n].order.line_items)]
    assert charged
    assert discounted
    for number in kept:
        order = submitted[number].order
        sent = order.shipping
        assert booked[number]["shipping"] == (
            None
            if sent is None
            else {
                "net_amount": str(sent.net_amount),
                "tax_rate": str(sent.tax_rate),
                "tax_amount": str(sent.tax_amount),
            }
        )
        assert [line["discount_amount"] for line in booked[number]["line_items"]] == [
            str(line.discount_amount or Decimal("0.00"))
            for line in order.line_items  # EUR: no discount is "0.00"
        ]
        assert booked[number]["gross_total"] == str(order.gross_total)
        assert shipped[number]["method"] == (None if sent is None else sent.method)

    # Each system still has every order delivered to it: asked by GET with the sink's credentials (a flaky 503
    # asked again), cancelled ones included (the sandbox keeps them, cancelled).
    for name in SINKS:
        reconciled = orderbus_done(
            "reconcile",
            "--sink",
            name,
            "--concurrency",
            "16",
            "--rate",
            "2000",
            "--config",
            str(config),
            env=env,
            timeout=120,
        )
        assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
        delivered = len(expected[name])
        assert f"{name}: {delivered} order(s) delivered from this host" in reconciled.stdout
        assert f"  present  {delivered}\n  missing  0\n  unknown  0\n" in reconciled.stdout
    assert stats["systems"]["crm"]["by_status"].get("429", 0) > 0

    listed = orderbus_done("dlq", "list", "--sink", "accounting", "--config", str(config), env=env)
    assert listed.returncode == 0, listed.stderr
    dead = [re.findall(r"order=(\S+) reason=(\S+)", line)[0] for line in listed.stdout.splitlines()]
    # A rejected create takes the order's later events with it (reason: dead-lettered predecessor).
    later = {rejected[0]: 1, rejected[1]: 2, rejected[2]: 0}
    assert sorted(dead) == sorted(
        [(number, "rejected") for number in rejected]
        + [(number, "dead-lettered-predecessor") for number, count in later.items() for _ in range(count)]
    )

    # Restart and stop: the commits of the clean stop leave nothing to read again, so nothing reaches a system.
    before, ledger = await sandbox.stats(), await sandbox.ledger()
    daemons.append(daemon := orderbus("run", "--config", str(config), env=env, log=log))
    await until_ready(base, daemon, log)
    await asyncio.sleep(1.0)  # a daemon that re-reads records does so at once on assignment
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as response:
        metrics = await response.text()
    consumed = re.findall(r'^orderbus_records_consumed_total\{sink="(\w+)"\} (\S+)$', metrics, re.MULTILINE)
    assert sorted(consumed) == [("accounting", "0.0"), ("crm", "0.0"), ("shipping", "0.0")]
    terminate(daemon, log)
    after = await sandbox.stats()
    assert after["total"]["requests"] == before["total"]["requests"], "no request at all after the restart"
    assert await sandbox.ledger() == ledger


def test_the_demo_config_is_valid_for_orderbus_run() -> None:
    """``orderbus run --config deploy/dev/orderbus.toml`` takes the demo's file as it is (secrets masked)."""
    checked = orderbus_done("config", "check", str(DEMO_CONFIG), env={})
    assert checked.returncode == 0, checked.stderr
    settings = json.loads(checked.stdout)
    assert {name for name, sink in settings["sinks"].items() if sink["enabled"]} == set(SINKS)
    assert settings["sinks"]["crm"]["auth"] == {"type": "bearer", "token": "**********"}
    assert settings["ingest"]["webhook_secrets"] == ["**********"]


def test_the_demo_options_move_every_port_and_the_sandbox_demands_the_sinks_credentials() -> None:
    layout = demo_layout(DemoOptions(kafka_port=29092, sandbox_port=28700, ingest_port=28080), env={})
    assert (layout.kafka_port, layout.sandbox_port) == (29092, 28700)
    assert layout.ingest_url == "http://127.0.0.1:28080"
    assert {sink.base_url for sink in layout.settings.sinks.values()} == {
        f"http://127.0.0.1:28700/{name}" for name in SINKS
    }
    specs = {name: sandbox_auth(sink) for name, sink in layout.settings.sinks.items()}
    assert specs == {"crm": "bearer:dev-crm-token-not-a-secret", "accounting": None, "shipping": None}
    defaults = demo_layout(DemoOptions(), env={})
    assert (defaults.kafka_port, defaults.sandbox_port, defaults.ingest_url) == (19092, 18700, "http://127.0.0.1:8080")


def test_the_demo_refuses_settings_that_point_at_real_systems() -> None:
    real = {"ORDERBUS_SINKS__SHIPPING__BASE_URL": "https://api.carrier.example/v2"}
    with pytest.raises(ConfigError, match=r"sinks\.shipping\.base_url: the demo delivers to its local sandbox"):
        demo_layout(DemoOptions(), env=real)
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers: the demo starts one local broker"):
        demo_layout(DemoOptions(), env={"ORDERBUS_KAFKA__BOOTSTRAP_SERVERS": "kafka.example:9092"})
    with pytest.raises(ConfigError, match="--rate: expected a number > 0"):
        DemoOptions(rate=0)


DEMO_SECONDS = 20


def test_orderbus_demo_runs_delivers_to_all_three_systems_and_prints_the_summary(tmp_path: Path) -> None:
    """``make run`` with ports of its own, stopping by itself: orders reach every system within a minute."""
    # Distinct: three free_port() calls in a row may hand out one port twice (the sandbox once took the ingest's).
    kafka_port, sandbox_port, ingest_port = kafka_local.free_ports(3)
    argv = ["demo", "--duration", str(DEMO_SECONDS), "--kafka-dir", str(tmp_path / "kafka")]
    argv += ["--log-dir", str(tmp_path), "--kafka-port", str(kafka_port), "--sandbox-port", str(sandbox_port)]
    argv += ["--ingest-port", str(ingest_port)]
    began = time.monotonic()
    done = orderbus_done(*argv, env={"ORDERBUS_STATE_DIR": str(tmp_path / "state")}, timeout=DEMO_SECONDS + 90)
    took = time.monotonic() - began
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    output = done.stdout
    assert "\x1b" not in output, "no terminal: plain lines"
    frames = [line for line in output.splitlines() if re.match(r"^\d+:\d\d sent \d+ \|", line)]
    assert len(frames) >= DEMO_SECONDS, "a line per second"
    summary = output[output.index("orderbus demo: stopped after") :].splitlines()
    sent = re.search(r"orders sent: (\d+) new, (\d+) updates, (\d+) cancels = (\d+) events", summary[1])
    assert sent is not None, summary
    new, updates, cancels, events = map(int, sent.groups())
    assert new > DEMO_SECONDS * 10
    assert updates > 0
    assert cancels > 0
    rows = {
        line.split()[0]: line.split() for line in summary if line.split()[:1] in (["crm"], ["accounting"], ["shipping"])
    }
    assert set(rows) == set(SINKS)
    for name, row in rows.items():
        delivered, applied, dead, _, left, first = row[1:7]
        assert int(delivered) == int(applied), f"{name}: what orderbus delivered is what the system applied"
        assert int(delivered) + int(dead) == events, f"{name}: every event delivered or dead-lettered"
        assert int(left) == 0
        assert float(first) < 60, f"{name}: first delivery {first} s after the start"
    assert int(rows["accounting"][3]) > 0, "accounting rejected some orders"
    assert "dlq list --sink accounting --config" in output
    print(
        f"orderbus demo --duration {DEMO_SECONDS}: {took:.1f} s; first deliveries (s): {[r[6] for r in rows.values()]}"
    )


async def test_the_demo_starts_its_sinks_past_what_a_killed_run_left_undelivered(
    kafka_broker: BrokerInfo, unique_name: str, tmp_path: Path
) -> None:
    """Leftovers were meant for the killed run's sandbox: the new one would answer their updates 404."""
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path)
    await apply_topics(settings)
    await produce(kafka_broker.bootstrap, orders_of(settings), make_events(30, seed=14))
    group = consumer_group("crm", settings.topics.prefix)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:  # crm delivered part of it before the run was killed; the others nothing
        tp = TopicPartition(orders_of(settings), 0)
        consumer.assign([tp])
        await consumer.commit({tp: 2})
    finally:
        await consumer.stop()
    async with _Progress(settings, list(SINKS)) as progress:
        assert await progress.skip_to_end() == {"crm": 28, "accounting": 30, "shipping": 30}
        assert await progress.unfinished() == {"crm": 0, "accounting": 0, "shipping": 0}
        assert await progress.skip_to_end() == {"crm": 0, "accounting": 0, "shipping": 0}
    for name in SINKS:
        committed, ends = await committed_vs_end(
            kafka_broker.bootstrap, orders_of(settings), consumer_group(name, settings.topics.prefix)
        )
        assert committed == ends


@pytest.mark.parametrize("taken", ["kafka", "sandbox", "ingest"])
def test_a_demo_port_in_use_is_said_with_the_option_that_moves_it(tmp_path: Path, taken: str) -> None:
    ports = {"kafka": free_port(), "sandbox": free_port(), "ingest": free_port()}
    argv = ["demo", "--duration", "3", "--kafka-dir", str(tmp_path / "kafka"), "--log-dir", str(tmp_path)]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind, so the bind clashes
        holder.bind(("127.0.0.1", ports[taken]))
        holder.listen()
        done = orderbus_done(*argv, env={"ORDERBUS_STATE_DIR": str(tmp_path / "state")}, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[0 if taken == "sandbox" else -1]
    assert str(ports[taken]) in last
    assert f"--{taken}-port N" in last, done.stderr[-2000:]
