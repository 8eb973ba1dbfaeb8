"""orderbus on a cluster that authorizes its clients: a real broker with Kafka's StandardAuthorizer.

The daemon's principal (SASL user ``orderbus``) gets exactly what `orderbus topics acls` prints, and everything
works: a webhook's order reaches every sink, a bad record is dead-lettered, the orders topic's retention is read.
With a grant missing, the daemon says which, instead of "the topics do not exist" or "joining its group".
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import CreateAclsRequest, DescribeAclsRequest
from prometheus_client import CollectorRegistry
from support import (
    orderbus_cli,
    produce_raw,
    running_daemon,
    sandbox_sinks,
    settings_env,
    until,
)

from daemon import kafka_local
from daemon.kafka_options import client_options, topic_layout
from daemon.lifecycle import check_topics
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.settings import Settings, load_settings
from daemon.status import fetch_status, render_status
from topics.acls import Acl, daemon_acls
from topics.admin import apply_catalogue, missing_topics, topic_configs
from topics.catalogue import SINKS, catalogue, dlq_topic, replay_topic, state_topic
from topics.errors import NotYetError, RefusedError
from topics.samples import sample_submission

pytestmark = pytest.mark.integration

PASSWORD = "acl-secret-for-tests"
PRINCIPAL = "User:orderbus"
# Kafka's protocol codes (org.apache.kafka.common.acl / resource): resource types, operations, pattern, permission.
_RESOURCE = {"topic": 2, "group": 3}
_OPERATION = {"Read": 3, "Write": 4, "Describe": 8, "DescribeConfigs": 10}
_ANY, _LITERAL, _ALLOW = 1, 3, 3


@dataclass(frozen=True)
class AclBroker:
    admin: str  # PLAINTEXT: ANONYMOUS, a super user (the test's own hand)
    daemon: str  # SASL_PLAINTEXT: PLAIN user orderbus, with only what it is granted


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclBroker]:
    plain, controller, sasl = kafka_local.free_ports(3)
    data_dir = tmp_path_factory.mktemp("kafka-acl")
    jaas = "org.apache.kafka.common.security.plain.PlainLoginModule"
    extra = {
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": "User:ANONYMOUS",  # the PLAINTEXT and controller listeners' principal
        "sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_plaintext.plain.sasl.jaas.config": f'{jaas} required user_orderbus="{PASSWORD}";',
        "listeners": f"PLAINTEXT://127.0.0.1:{plain},CONTROLLER://127.0.0.1:{controller},"
        f"SASL_PLAINTEXT://127.0.0.1:{sasl}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{plain},SASL_PLAINTEXT://127.0.0.1:{sasl}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
    }
    try:
        kafka_local.start(data_dir, port=plain, controller_port=controller, heap="256m", extra_properties=extra)
        yield AclBroker(f"127.0.0.1:{plain}", f"127.0.0.1:{sasl}")
    finally:
        kafka_local.stop(data_dir, grace=20.0)


@dataclass(frozen=True)
class Daemon:
    """A daemon's settings as the principal ``orderbus`` (and their variables, for the CLI), its topics made by the
    admin, and the grants `orderbus topics acls` prints for them (none given yet)."""

    env: dict[str, str]
    settings: Settings
    acls: list[Acl]


async def prepared(broker: AclBroker, sandbox: SandboxProcess, state: Path) -> Daemon:
    env = settings_env(broker.daemon, f"acl-{uuid.uuid4().hex[:8]}.", state, partitions=3, sinks=sandbox_sinks(sandbox))
    env |= {
        "ORDERBUS_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "ORDERBUS_KAFKA__SASL_MECHANISM": "PLAIN",
        "ORDERBUS_KAFKA__SASL_USERNAME": "orderbus",
        "ORDERBUS_KAFKA__SASL_PASSWORD": PASSWORD,
    }
    settings = load_settings(None, env=env)
    # `orderbus topics apply`, as the cluster's admin runs it.
    await apply_catalogue(catalogue(topic_layout(settings.topics)), {"bootstrap_servers": broker.admin})
    return Daemon(env, settings, daemon_acls(settings.topics.prefix, list(settings.enabled_sinks()), ingest=True))


async def grant(broker: AclBroker, acls: Sequence[Acl]) -> None:
    """What kafka-acls.sh --add does for each of `acls`, through the super user's listener; returns once the broker
    applies them (it takes them from its metadata log a moment later)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.admin)
    await admin.start()
    try:
        wanted = await _count(admin) + sum(len(acl.operations) for acl in acls)
        for acl in acls:
            for operation in acl.operations:
                request = CreateAclsRequest(
                    _RESOURCE[acl.resource], acl.name, _LITERAL, PRINCIPAL, "*", _OPERATION[operation], _ALLOW
                )
                answer = await admin._send_request(request)  # aiokafka has no ACL API
                [created] = answer.to_object()["creation_responses"]
                assert created["error_code"] == 0, created

        async def applied() -> bool:
            return await _count(admin) >= wanted

        await until(applied)
    finally:
        await admin.close()


async def _count(admin: AIOKafkaAdminClient) -> int:
    """How many ACLs the broker applies to `PRINCIPAL`."""
    request = DescribeAclsRequest(_ANY, None, _ANY, PRINCIPAL, None, _ANY, _ANY)
    answer = (await admin._send_request(request)).to_object()  # aiokafka has no ACL API
    assert answer["error_code"] == 0, answer
    return sum(len(resource["acls"]) for resource in answer["resources"])


async def test_with_what_topics_acls_prints_the_daemon_publishes_delivers_and_dead_letters(
    acl_broker: AclBroker,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    daemon = await prepared(acl_broker, sandbox_process, tmp_path / "state")
    settings, prefix = daemon.settings, daemon.settings.topics.prefix
    await grant(acl_broker, daemon.acls)
    # What the CLI prints is that list, for the principal of the settings.
    printed = await orderbus_cli("topics", "acls", env=daemon.env)
    assert printed.returncode == 0, printed.stderr
    commands = [line for line in printed.stdout.splitlines() if line.startswith("kafka-acls.sh")]
    assert len(commands) == 1 + 4 * len(SINKS)  # the orders topic; per sink its dlq, replay and state topics, its group
    assert all(f"--add --allow-principal {PRINCIPAL} --operation" in line for line in commands)
    assert f"--operation Write --operation Read --operation DescribeConfigs --topic {prefix}orders" in commands[0]

    submission = sample_submission(random.Random(3), order_number=f"ACL-{uuid.uuid4().hex[:10]}")
    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING):
        async with running_daemon(settings, registry, apply=False) as base, aiohttp.ClientSession() as session:
            headers = {"Content-Type": "application/json", "Idempotency-Key": "acl-1"}
            async with session.post(f"{base}/v1/orders", data=submission.model_dump_json(), headers=headers) as sent:
                assert sent.status == 202, await sent.text()
            for system in SINKS:
                [effect] = await sandbox.wait_ledger(system, 1, timeout=30)
                assert effect["order_number"] == submission.order.order_number
            # A record no sink can read, from an upstream producer: each sink writes its dead letter.
            await produce_raw(acl_broker.admin, f"{prefix}orders", [(b"ACL-BAD", b"not json")])
            invalid = [{"sink": sink, "reason": "invalid"} for sink in SINKS]
            await until(
                lambda: all(registry.get_sample_value("orderbus_dead_letters_total", at) == 1 for at in invalid)
            )
    refused = [r.getMessage() for r in caplog.records if "uthoriz" in r.getMessage() or "retention" in r.getMessage()]
    assert refused == [], "nothing refused, the retention read"
    consumer = AIOKafkaConsumer(
        dlq_topic("crm", prefix), bootstrap_servers=acl_broker.admin, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        letters = await asyncio.wait_for(consumer.getone(), 30)
    finally:
        await consumer.stop()
    assert letters.key == b"ACL-BAD"


async def test_topics_it_may_not_see_are_said_so_not_missing(
    acl_broker: AclBroker, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    # Kafka lists only the topics a principal may describe: without a grant, they read as missing, and the start
    # said "run `orderbus topics apply`", which the admin had run.
    settings = (await prepared(acl_broker, sandbox_process, tmp_path / "state")).settings
    orders = f"{settings.topics.prefix}orders"
    await grant(acl_broker, [Acl("topic", orders, ("Read",), "only the orders topic")])
    options = client_options(settings.kafka)
    with pytest.raises(NotYetError) as refused:  # exit 1: the daemon comes up by itself once they are granted
        await check_topics(settings, options)
    prefix = settings.topics.prefix
    hidden = [
        name
        for sink in SINKS
        for name in (dlq_topic(sink, prefix), replay_topic(sink, prefix), state_topic(sink, prefix))
    ]
    assert str(refused.value) == (
        f"the brokers do not let this daemon's principal (User:orderbus) see topics {', '.join(hidden)} "
        "(TopicAuthorizationFailedError: not authorized to describe; they may well exist): grant it what "
        "`orderbus topics acls` prints for these settings"
    )
    # Its retention, read for the backlog alert, is refused as such, not as a broker gone (`daemon.topic_retention`).
    with pytest.raises(RefusedError, match=f"{orders}: TopicAuthorizationFailedError"):
        await topic_configs([orders], options)
    assert await missing_topics([f"{orders}.none"], {"bootstrap_servers": acl_broker.admin}) == [f"{orders}.none"]
    assert await missing_topics([f"{orders}.none"], {"bootstrap_servers": acl_broker.admin}) == [f"{orders}.none"], (
        "and not created by asking"
    )


async def test_a_sink_without_its_group_says_why_on_readyz_and_delivers_once_it_is_granted(
    acl_broker: AclBroker,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It said "joining its consumer group (or kafka unreachable)", and logged a failed fetch 5 times a second.
    daemon = await prepared(acl_broker, sandbox_process, tmp_path / "state")
    settings, prefix, acls = daemon.settings, daemon.settings.topics.prefix, daemon.acls
    crm_group = Acl("group", f"{prefix}orderbus.crm", ("Read",), "sink crm's consumer group")
    assert crm_group in acls
    await grant(acl_broker, [acl for acl in acls if acl != crm_group])
    submission = sample_submission(random.Random(4), order_number=f"ACL-{uuid.uuid4().hex[:10]}")
    with caplog.at_level(logging.INFO, "consumers.engine"):
        async with running_daemon(settings, apply=False) as base, aiohttp.ClientSession() as session:
            headers = {"Content-Type": "application/json", "Idempotency-Key": "acl-group"}
            async with session.post(f"{base}/v1/orders", data=submission.model_dump_json(), headers=headers) as sent:
                assert sent.status == 202, await sent.text()
            for system in ("accounting", "shipping"):
                await sandbox.wait_ledger(system, 1, timeout=30)

            async def reasons() -> dict[str, str]:
                async with session.get(f"{base}/readyz") as answer:
                    return dict(json.loads(await answer.text())["reasons"])

            await until(lambda: _said(reasons, "sink.crm"))
            assert (await reasons())["sink.crm"] == (
                f"kafka does not let this daemon's principal use consumer group {prefix}orderbus.crm "
                "(GroupAuthorizationFailedError): grant it what `orderbus topics acls` prints for these settings"
            )
            await grant(acl_broker, [crm_group])
            [effect] = await sandbox.wait_ledger("crm", 1, timeout=30)
            assert effect["order_number"] == submission.order.order_number
            await until(lambda: _said(reasons, "sink.crm", present=False))
    said = [r.getMessage() for r in caplog.records if getattr(r, "sink", None) == "crm" and "kafka" in r.getMessage()]
    assert said[0].startswith("kafka refuses this sink's fetch: kafka does not let"), said
    assert said[-1] == "kafka allows this sink's fetch again", said
    assert len(said) <= 4, "said when it changed, not at every retry"


async def _said(reasons: Callable[[], Awaitable[dict[str, str]]], component: str, *, present: bool = True) -> bool:
    return (component in await reasons()) == present


async def test_an_ingest_without_write_says_so_to_the_operator_and_publishes_once_it_is_granted(
    acl_broker: AclBroker, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    # It answered 503 "kafka is unreachable" to every webhook while /readyz and the status said all was well.
    daemon = await prepared(acl_broker, sandbox_process, tmp_path / "state")
    settings, prefix, acls = daemon.settings, daemon.settings.topics.prefix, daemon.acls
    write = Acl("topic", f"{prefix}orders", ("Write",), "the ingest publishes orders")
    await grant(acl_broker, [Acl("topic", acls[0].name, ("Read", "DescribeConfigs"), "the sinks"), *acls[1:]])
    body = sample_submission(random.Random(5), order_number=f"ACL-{uuid.uuid4().hex[:10]}").model_dump_json()
    headers = {"Content-Type": "application/json", "Idempotency-Key": "acl-write"}
    async with running_daemon(settings, apply=False) as base, aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/orders", data=body, headers=headers) as sent:
            assert sent.status == 503
            assert json.loads(await sent.text())["detail"] == (
                "kafka does not let this server publish orders (its operators are told why); nothing was published"
            )
        # Ready, but degraded: not ready, a load balancer would send it no webhook, and none would find the grant.
        async with session.get(f"{base}/readyz?component=ingest") as ready:
            assert ready.status == 200
            assert json.loads(await ready.text())["degraded"]["ingest"] == (
                "kafka refuses the ingest's records (an ACL): webhooks get 503; orderbus status says which"
            )
        document = await asyncio.to_thread(fetch_status, base)
        [line] = [line for line in render_status(document).splitlines() if line.startswith("ingest:")]
        assert line.startswith(
            f"ingest: KAFKA REFUSES: kafka does not let this daemon's principal use topic {prefix}orders "
            "(TopicAuthorizationFailedError): grant it what `orderbus topics acls` prints for these settings; "
        )
        await grant(acl_broker, [write])
        async with session.post(f"{base}/v1/orders", data=body, headers=headers) as sent:
            assert sent.status == 202, await sent.text()
        async with session.get(f"{base}/readyz") as ready:
            assert "ingest" not in json.loads(await ready.text())["degraded"]
