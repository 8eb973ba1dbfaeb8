"""The ingest against the real broker: exactly one record per idempotency key, and honest 503s while Kafka is down."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from support import apply_topics, orderbus_cli, read_topic, running_daemon, settings_env, settings_for

from daemon import kafka_local
from daemon.kafka_local import BrokerInfo
from daemon.kafka_options import client_options, topic_layout
from daemon.lifecycle import replay_partition_notes
from daemon.settings import load_settings
from topics.admin import apply_catalogue, missing_topics, partition_counts, partition_ids
from topics.catalogue import catalogue, orders_topic, replay_topic
from topics.codec import decode
from topics.samples import sample_submission

pytestmark = pytest.mark.integration


async def test_topics_apply_creates_then_reports_no_change_then_drift(
    kafka_broker: BrokerInfo, unique_name: str
) -> None:
    options = {"bootstrap_servers": kafka_broker.bootstrap}
    specs = catalogue(topic_layout(settings_for(kafka_broker, f"{unique_name}.", Path(".")).topics))
    first = await apply_catalogue(specs, options)
    assert sorted(first.created) == sorted(spec.name for spec in specs)
    second = await apply_catalogue(specs, options)
    assert second.created == []
    assert second.drift == []
    assert sorted(second.unchanged) == sorted(spec.name for spec in specs)
    drifted = [
        spec.__class__(spec.name, spec.partitions + 2, 1, {**spec.configs, "retention.ms": "1234"})
        for spec in specs[:1]
    ]
    third = await apply_catalogue(drifted, options)
    assert {d.setting for d in third.drift} == {"partitions", "retention.ms"}
    fourth = await apply_catalogue(specs, options)
    assert fourth.drift == []  # nothing was changed by the drifted run


async def test_topics_apply_grows_replay_topics_to_the_orders_topics_partitions(
    kafka_broker: BrokerInfo, unique_name: str
) -> None:
    """Made before replay topics had the orders topic's partition count (3 by earlier versions): `run` and `config
    check --connect` say so, and `orderbus topics apply` grows them to the orders topic's count as it is, not as a
    setting changed since says (`consumers.assignment`)."""
    sinks = {name: {"base_url": "http://127.0.0.1:1"} for name in ("crm", "shipping")}
    env = settings_env(kafka_broker, f"{unique_name}.", Path("."), sinks=sinks)  # 6 partitions
    settings = load_settings(None, env=env)
    options = client_options(settings.kafka)
    specs = catalogue(topic_layout(settings.topics))
    replays = [spec.name for spec in specs if spec.follows is not None and ".replay." in spec.name]
    assert len(replays) == 3
    await apply_catalogue([dataclasses.replace(s, partitions=3) if s.name in replays else s for s in specs], options)
    notes = await replay_partition_notes(settings, options)
    assert [note.split(" has ")[0] for note in notes] == [replay_topic(n, settings.topics.prefix) for n in sinks]
    assert all(
        " has 3 partitions, " in note and "run `orderbus topics apply`, which grows it" in note for note in notes
    )
    checked = await orderbus_cli("config", "check", "--connect", env=env)
    assert checked.returncode == 0, checked.stderr
    warned = [line.removeprefix("warning: ") for line in checked.stderr.splitlines() if line.startswith("warning: ")]
    assert [note for note in warned if " partitions, " in note] == notes

    raised = {**env, "ORDERBUS_TOPICS__ORDERS_PARTITIONS": "12"}  # the setting changed, the topic not (yet)
    applied = await orderbus_cli("topics", "apply", env=raised)
    assert applied.returncode == 0, applied.stderr
    grown = sorted(line for line in applied.stdout.splitlines() if line.startswith("grown"))
    assert grown == sorted(f"grown     {name}: 3 -> 6 partitions, as many as the orders topic" for name in replays)
    drift = [line for line in applied.stdout.splitlines() if line.startswith("DRIFT")]
    assert drift == [f"DRIFT     {orders_topic(settings.topics.prefix)}: partitions is 6, catalogue says 12"]
    for name in replays:
        assert await partition_ids(name, options) == list(range(6))
    assert await replay_partition_notes(settings, options) == []
    again = await apply_catalogue(specs, options)
    assert again.grown == []
    assert again.drift == []
    assert sorted(again.unchanged) == sorted(spec.name for spec in specs)


async def test_looking_for_a_topic_does_not_create_it(kafka_broker: BrokerInfo, unique_name: str) -> None:
    # The local broker creates a topic a metadata request names (Kafka's default): the operator commands, which look
    # for topics by name (trace, dlq, topics show, reconcile --resend), created what they did not find.
    options = {"bootstrap_servers": kafka_broker.bootstrap}
    name = f"{unique_name}.never"
    assert await partition_ids(name, options) == []
    assert await partition_counts([name], options) == {}
    await asyncio.sleep(3.0)  # the broker creates such a topic a moment after the request (1 to 2 s here)
    assert await missing_topics([name], options) == [name]


async def test_one_record_per_key_under_1000_concurrent_posts(
    kafka_broker: BrokerInfo, unique_name: str, tmp_path: Path
) -> None:
    settings = settings_for(kafka_broker, f"{unique_name}.", tmp_path)
    rng = random.Random(7)
    bodies = {f"key-{i}": sample_submission(random.Random(i)).model_dump_json().encode() for i in range(400)}
    posts = [key for key in bodies for _ in range(rng.randint(1, 4))]
    posts = (posts + list(bodies))[:1000] if len(posts) < 1000 else posts[:1000]
    rng.shuffle(posts)
    distinct = set(posts)
    async with running_daemon(settings) as base, aiohttp.ClientSession() as session:

        async def post(key: str) -> tuple[str, int]:
            headers = {"Content-Type": "application/json", "Idempotency-Key": key}
            async with session.post(f"{base}/v1/orders", data=bodies[key], headers=headers) as response:
                return key, response.status

        answers = await asyncio.gather(*(post(key) for key in posts))
    statuses = Counter(status for _, status in answers)
    assert set(statuses) <= {202, 409}, statuses
    assert {key for key, status in answers if status == 202} == distinct
    records = await read_topic(kafka_broker.bootstrap, orders_topic(f"{unique_name}."))
    event_ids = Counter(str(decode(value).event_id) for _, value, _ in records)
    assert len(records) == len(distinct)
    assert all(count == 1 for count in event_ids.values())


async def test_broker_down_gives_503_then_success_and_no_duplicate(
    private_broker: Callable[[], BrokerInfo], unique_name: str, tmp_path: Path
) -> None:
    broker = private_broker()
    settings = settings_for(broker, f"{unique_name}.", tmp_path / "state", publish_timeout=2, retry_after=1)
    body = sample_submission(random.Random(3)).model_dump_json(exclude={"event_id"}).encode()  # keyed by the header
    headers = {"Content-Type": "application/json", "Idempotency-Key": "during-outage"}
    async with running_daemon(settings) as base, aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/orders", data=body, headers={**headers, "Idempotency-Key": "before"}) as r:
            assert r.status == 202
        await asyncio.to_thread(kafka_local.stop, broker.data_dir)

        down_answers = []
        for _ in range(3):
            async with session.post(f"{base}/v1/orders", data=body, headers=headers) as response:
                down_answers.append((response.status, response.headers.get("Retry-After")))
        assert all(status == 503 and retry == "1" for status, retry in down_answers), down_answers
        async with session.get(f"{base}/readyz") as ready:
            assert ready.status == 503
            assert "ingest" in (await ready.json())["reasons"]

        await asyncio.to_thread(kafka_local.start, broker.data_dir)
        final = None
        for _ in range(120):
            async with session.post(f"{base}/v1/orders", data=body, headers=headers) as response:
                final = response.status
                if final == 202:
                    answer = await response.json()
                    break
            await asyncio.sleep(0.5)
        assert final == 202
        async with session.get(f"{base}/readyz") as ready:
            assert ready.status == 200
    records = await read_topic(broker.bootstrap, orders_topic(f"{unique_name}."))
    assert len(records) == 2, [json.loads(value or b"{}").get("event_id") for _, value, _ in records]
    assert (
        str(decode(records[-1][1]).event_id) == answer["event_id"]
        or str(decode(records[0][1]).event_id) == answer["event_id"]
    )


async def test_an_ingest_started_while_kafka_is_down_publishes_only_once_its_topic_exists(
    private_broker: Callable[[], BrokerInfo], unique_name: str, tmp_path: Path
) -> None:
    # Kafka down at start: the topic check could not run. Had the producer asked for the topic's metadata once the
    # broker was back, the broker would have created it with its own defaults: one partition, not the catalogue's.
    broker = private_broker()
    await asyncio.to_thread(kafka_local.stop, broker.data_dir)
    settings = settings_for(broker, f"{unique_name}.", tmp_path / "state", retry_after=1)
    topic = orders_topic(f"{unique_name}.")
    options = {"bootstrap_servers": broker.bootstrap}
    body = sample_submission(random.Random(5)).model_dump_json().encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": "while-no-topic"}

    async def answers(session: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, str]]:
        async with session.post(f"{base}/v1/orders", data=body, headers=headers) as posted:
            status = posted.status
        async with session.get(f"{base}/readyz") as ready:
            return status, (await ready.json())["reasons"]

    async with running_daemon(settings, apply=False) as base, aiohttp.ClientSession() as session:
        assert await answers(session, base) == (503, {"ingest": "kafka is unreachable: the ingest cannot publish"})
        await asyncio.to_thread(kafka_local.start, broker.data_dir)
        missing = {"ingest": f"topic {topic} does not exist: run `orderbus topics apply` with these settings"}
        for _ in range(60):  # the reconnect probe's interval grows to 5 s
            if (answer := await answers(session, base)) == (503, missing):
                break
            await asyncio.sleep(0.5)
        assert answer == (503, missing)
        assert await missing_topics([topic], options) == [topic], "not created by the broker on our behalf"

        await apply_topics(settings)
        for _ in range(60):
            if (answer := await answers(session, base)) == (202, {}):
                break
            await asyncio.sleep(0.5)
        assert answer == (202, {})
    assert await partition_ids(topic, options) == list(range(settings.topics.orders_partitions))
    assert len(await read_topic(broker.bootstrap, topic)) == 1
