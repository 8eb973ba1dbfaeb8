"""Static membership against a real broker: a restart keeps an instance's partitions without moving anyone else's
(consumers alone, and two real daemons, one killed with SIGKILL and started again), a group of the same names is
dealt the same partitions again, and two daemons under one name say so."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import NoOffsetForPartitionError
from prometheus_client import CollectorRegistry
from support import create_topic, free_port, make_events, produce, running_daemon, settings_env, until

from consumers import membership
from consumers.expiry import Positions
from consumers.kafka_io import sink_consumer
from consumers.membership import Membership
from daemon.kafka_local import BrokerInfo
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.settings import Settings, load_settings
from topics.admin import apply_catalogue
from topics.catalogue import TopicLayout, catalogue, orders_topic

pytestmark = pytest.mark.integration

PARTITIONS = 6


class Watched(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no types
    """Counts what the group does to one member, and holds what it was last assigned: the consumer's own
    `assignment()` changes before its listener is called, so a test settled by that would count a late call."""

    def __init__(self) -> None:
        self.revokes = 0
        self.assigns = 0
        self.partitions: list[int] = []

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.revokes += 1
        self.partitions = []

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.assigns += 1
        self.partitions = sorted(tp.partition for tp in assigned)


class Member:
    """One instance's consumer of the crm sink's group, polled in the background as the engine polls it."""

    def __init__(self, consumer: AIOKafkaConsumer, name: str) -> None:
        self.consumer = consumer
        self.name = name
        self.watched = Watched()
        self._poll: asyncio.Task[None] | None = None

    async def start(self, topic: str) -> None:
        self.consumer.subscribe([topic], listener=self.watched)
        await self.consumer.start()
        self._poll = asyncio.create_task(self._polling())

    async def _polling(self) -> None:
        positions = Positions(self.consumer, "crm")
        while True:
            try:
                await self.consumer.getmany(timeout_ms=200)
            except NoOffsetForPartitionError as exc:  # a new group: the engine's port settles it so
                await positions.settle(exc)

    def partitions(self) -> list[int]:
        return self.watched.partitions

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
        await self.consumer.stop()


@pytest.fixture
async def group(kafka_broker: BrokerInfo, unique_name: str) -> AsyncIterator[Callable[..., Any]]:
    """`join(name, ...)`: a started member of one group reading a fresh topic of `PARTITIONS` partitions."""
    await create_topic(kafka_broker.bootstrap, unique_name, PARTITIONS)
    async with AsyncExitStack() as stack:

        async def join(name: str, *, session_timeout: float | None = None) -> Member:
            membership = Membership(name, session_timeout)
            options = {"bootstrap_servers": kafka_broker.bootstrap}
            member = Member(sink_consumer(options, "crm", prefix=f"{unique_name}.", membership=membership), name)
            stack.push_async_callback(member.stop)
            await member.start(unique_name)
            return member

        yield join


async def settled(members: list[Member], expected: dict[str, list[int]] | None = None, timeout: float = 60) -> None:
    """Until the members hold every partition between them (as `expected` says, by name, when given)."""
    async with asyncio.timeout(timeout):
        while True:
            held = [member.partitions() for member in members]
            whole = sorted(p for ps in held for p in ps) == list(range(PARTITIONS))
            if whole and (expected is None or {m.name: ps for m, ps in zip(members, held, strict=True)} == expected):
                return
            await asyncio.sleep(0.1)


async def test_a_restarted_static_member_gets_its_partitions_back_and_no_one_else_moves(
    group: Callable[..., Any],
) -> None:
    members = {name: await group(name) for name in ("host-a", "host-b")}
    dealt = {"host-a": [0, 2, 4], "host-b": [1, 3, 5]}  # round robin over the names in order
    await settled(list(members.values()), dealt)
    # A follower's restart, then the other's; each pass looks its members up afresh (review: a tuple built before
    # the loop left the second pass watching the stopped member, whose counters never move).
    for leaving, staying in (("host-b", "host-a"), ("host-a", "host-b")):
        seen = (members[staying].watched.revokes, members[staying].watched.assigns)
        await members[leaving].stop()  # a static member does not leave: as a kill -9, but without waiting for it
        members[leaving] = await group(leaving)
        await settled([members["host-a"], members["host-b"]], dealt)
        assert members[leaving].watched.assigns == 1
        # Its session never ended, so the group did not rebalance: the other member was left alone throughout.
        assert (members[staying].watched.revokes, members[staying].watched.assigns) == seen


async def test_the_same_names_are_dealt_the_same_partitions_after_one_was_gone(group: Callable[..., Any]) -> None:
    # A short session, so that the group gives up on the stopped member within the test.
    members = [await group(name, session_timeout=6) for name in ("host-b", "host-c", "host-a")]
    dealt = {"host-a": [0, 3], "host-b": [1, 4], "host-c": [2, 5]}
    await settled(members, dealt)
    b, c, a = members
    await c.stop()
    await settled([a, b])  # its session timed out: the two others hold all six
    assert sorted(a.partitions() + b.partitions()) == list(range(PARTITIONS))
    assert len(a.partitions()) == len(b.partitions()) == 3
    c = await group("host-c", session_timeout=6)  # a new member id, which the broker begins with its name
    await settled([a, b, c], dealt)


def _named(broker: BrokerInfo, prefix: str, state_dir: Path, name: str) -> Settings:
    """Settings of a daemon with the crm sink (no orders: nothing is sent), its group_instance_id given as a pod's
    name is: by a variable."""
    sinks = {"crm": {"base_url": "http://127.0.0.1:1"}}
    env = settings_env(broker, f"{prefix}.", state_dir, sinks=sinks)
    return load_settings(None, env={**env, "ORDERBUS_KAFKA__GROUP_INSTANCE_ID": name})


async def _crm_reason(session: aiohttp.ClientSession, base: str) -> tuple[int, str]:
    """A daemon's /readyz status and the crm sink's reason there (empty when it has none)."""
    async with session.get(f"{base}/readyz") as response:
        return response.status, (await response.json())["reasons"].get("sink.crm", "")


NAMED = "kafka.group_instance_id 'orderbus-0'"


async def test_two_daemons_under_one_name_are_told_apart_by_their_readiness(
    kafka_broker: BrokerInfo, unique_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """The second joins the group the first holds: they fence each other in turn and both say why, or the broker
    then refuses the second for good, and it says why while the first holds the group."""
    monkeypatch.setattr(membership, "CHURN_LIMIT", 4)  # fenced in turn at every heartbeat: 4 take about 8 s
    monkeypatch.setattr(membership, "JOIN_WAIT", 8.0)  # a join here takes a second at most
    first, second = (_named(kafka_broker, unique_name, tmp_path / name, "orderbus-0") for name in ("first", "second"))
    assert first.kafka.group_instance_id == second.kafka.group_instance_id == "orderbus-0"
    async with running_daemon(first, CollectorRegistry()) as one, aiohttp.ClientSession() as session:

        async def ready() -> bool:
            return (await _crm_reason(session, one))[0] == 200

        await until(ready, timeout=30)  # the first has joined before the second comes
        async with session.get(f"{one}/status") as response:
            member = (await response.json())["sinks"]["crm"]["membership"]
        assert member == {"group_instance_id": "orderbus-0", "session_timeout": 45.0}, "as orderbus status shows it"
        async with running_daemon(second, CollectorRegistry(), apply=False) as two:
            said: dict[str, str] = {}

            async def told() -> bool:
                for base in (one, two):
                    status, reason = await _crm_reason(session, base)
                    if NAMED in reason:
                        assert status == 503
                        said[base] = reason
                refused = any(reason.startswith("not in consumer group") for reason in said.values())
                return len(said) == 2 or refused

            await until(told, timeout=60, every=0.2)
    churned = [reason for reason in said.values() if reason.startswith("assigned ")]
    assert churned or len(said) == 1, said
    if churned:  # said once an episode, at ERROR
        logged = [r for r in caplog.records if r.getMessage() == "group membership contested"]
        assert logged
        assert all(r.levelname == "ERROR" for r in logged)


async def test_two_daemons_started_at_once_under_one_name_are_told_apart_too(
    kafka_broker: BrokerInfo, unique_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker refuses one (or they fence each other in turn, as above): either way one at least says why.
    monkeypatch.setattr(membership, "CHURN_LIMIT", 4)
    monkeypatch.setattr(membership, "JOIN_WAIT", 8.0)  # a join here takes a second at most
    first, second = (_named(kafka_broker, unique_name, tmp_path / name, "orderbus-0") for name in ("first", "second"))
    async with (
        running_daemon(first, CollectorRegistry()) as one,
        running_daemon(second, CollectorRegistry(), apply=False) as two,
        aiohttp.ClientSession() as session,
    ):

        async def told() -> bool:
            reasons = [(await _crm_reason(session, base))[1] for base in (one, two)]
            return any(NAMED in reason for reason in reasons)

        await until(told, timeout=60, every=0.2)


def _events(log: Path, message: str) -> list[dict[str, Any]]:
    """The daemon's JSON log events with `message`, in order."""
    events = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("msg") == message:
                events.append(event)
    return events


async def test_a_daemon_killed_and_started_again_under_its_name_moves_no_partition(
    kafka_broker: BrokerInfo, sandbox_process: SandboxProcess, sandbox: SandboxClient, unique_name: str, tmp_path: Path
) -> None:
    # The promise of a name, with real processes: kill -9 one of two daemons mid-stream and start it again (as
    # systemd does): neither sees a rebalance, it gets its own partitions back, and every order is applied once.
    prefix = f"{unique_name}."
    await apply_catalogue(
        catalogue(TopicLayout(prefix=prefix, orders_partitions=PARTITIONS)),
        {"bootstrap_servers": kafka_broker.bootstrap},
    )
    await sandbox.faults("crm", latency_ms=5)
    configs = {}
    for name in ("host-a", "host-b"):
        configs[name] = tmp_path / f"{name}.toml"
        configs[name].write_text(
            f'state_dir = "{tmp_path / name}"\nlog_level = "INFO"\n'
            f'[kafka]\nbootstrap_servers = "{kafka_broker.bootstrap}"\ngroup_instance_id = "{name}"\n'
            f'[topics]\nprefix = "{prefix}"\norders_partitions = {PARTITIONS}\n'
            f"[ingest]\nenabled = false\nport = {free_port()}\n"
            f'[sinks.crm]\nenabled = true\nbase_url = "{sandbox_process.system_url("crm")}"\nmax_in_flight = 4\n'
            "commit_interval = 0.2\nbackoff_base = 0.05\nbackoff_cap = 0.5\nmax_attempts = 100\n"
        )
    logs = {name: tmp_path / f"{name}.log" for name in configs}

    def start(name: str) -> subprocess.Popen[bytes]:
        with logs[name].open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "--config", str(configs[name])], stdout=out, stderr=out
            )

    def assigned(name: str) -> list[list[int]]:
        return [event["partitions"] for event in _events(logs[name], "partitions assigned")]

    def revoked(name: str) -> list[list[int]]:  # aiokafka revokes nothing at every join: those say nothing
        return [event["partitions"] for event in _events(logs[name], "partitions revoked") if event["partitions"]]

    daemons = {"host-a": start("host-a")}
    try:
        await until(lambda: bool(assigned("host-a")))
        daemons["host-b"] = start("host-b")
        await until(lambda: bool(assigned("host-b")) and len(assigned("host-a")) == 2)  # b joined: a gave half
        theirs = {name: assigned(name)[-1] for name in daemons}
        assert sorted(theirs["host-a"] + theirs["host-b"]) == list(range(PARTITIONS))
        seen_a = (len(assigned("host-a")), len(revoked("host-a")))
        orders = 600
        await produce(kafka_broker.bootstrap, orders_topic(prefix), make_events(orders, seed=31))
        await sandbox.wait_ledger("crm", orders // 3, timeout=60)
        daemons["host-b"].send_signal(signal.SIGKILL)
        daemons["host-b"].wait(10)
        daemons["host-b"] = start("host-b")
        await until(lambda: len(assigned("host-b")) == 2)
        await sandbox.wait_ledger("crm", orders, timeout=120)
        for daemon in daemons.values():
            daemon.send_signal(signal.SIGTERM)
        for name, daemon in daemons.items():
            assert daemon.wait(30) == 0, logs[name].read_text()[-3000:]
    finally:
        for daemon in daemons.values():
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    assert assigned("host-b")[-1] == theirs["host-b"], "its own partitions back"
    assert (len(assigned("host-a")), len(revoked("host-a"))) == seen_a, "the other daemon never moved"
    applied = Counter(entry["order_number"] for entry in await sandbox.ledger("crm"))
    assert len(applied) == orders
    assert max(applied.values()) == 1
