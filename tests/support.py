"""Helpers shared by the integration tests: free ports, settings for a test, a daemon in-process, topic reads."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import random
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import CollectorRegistry

from consumers.engine import SETTLE_FLOOR, EngineConfig
from consumers.kafka_close import CLEANUP, DEAD_LETTER_CLOSE_GRACE, LEAVE_TIMEOUT
from consumers.order_state import Entry, Fetched
from daemon.app import ADMIN_SHUTDOWN, INGEST_SHUTDOWN
from daemon.kafka_local import BrokerInfo
from daemon.kafka_options import client_options, topic_layout
from daemon.lifecycle import serve
from daemon.publisher import CLOSE_GRACE
from daemon.sandbox import SandboxProcess
from daemon.settings import Settings, load_settings
from topics.admin import apply_catalogue, partition_ids
from topics.catalogue import SINKS, catalogue, orders_topic
from topics.codec import encode
from topics.envelope import EventType, OrderEvent, OrderSubmission
from topics.errors import SharedStateError
from topics.samples import sample_event, sample_submission


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


FAST_RETRIES: dict[str, Any] = {
    "backoff_base": 0.05,
    "backoff_cap": 0.5,
    "max_attempts": 100,
    "commit_interval": 0.3,
    "request_timeout": 2.0,
    "circuit_window": 100,
    "circuit_min_calls": 50,
    "circuit_open_for": 0.5,
}
"""Sink settings for tests: retries and probes in fractions of a second, commits often, no early dead letters."""


def sandbox_sinks(sandbox: SandboxProcess, **extra: Any) -> dict[str, dict[str, Any]]:
    """The three sinks pointed at the sandbox process, with `FAST_RETRIES` and `extra` on top."""
    return {name: {"base_url": sandbox.system_url(name), **FAST_RETRIES, **extra} for name in SINKS}


# A sink's settings in tests that replay dead letters: quick retries and commits, so a replay is read at once.
def at(partition: int, offset: int = 0, topic: str = "orders") -> tuple[str, int, int]:
    """The origin of a state write (`consumers.dedup.DedupStore.put_downstream_id`): the record's place."""
    return (topic, partition, offset)


class FakeStateTopic:
    """`consumers.order_state.StateTopic` in memory: every entry written, in order (a partition's offsets are the
    places of its entries among them), and the partitions each read asked for; while `failing` holds a reason,
    writes and reads raise `SharedStateError` with it."""

    def __init__(self, topic: str = "orders.state.crm") -> None:
        self.topic = topic
        self.entries: list[Entry] = []
        self.read_partitions: list[list[int]] = []
        self.failing: str | None = None
        self.on_read: Callable[[], object] | None = None  # called as a read begins

    async def write(self, entries: Sequence[Entry]) -> None:
        await asyncio.sleep(0)  # a yield, not a wait: a broker's acknowledgement is never immediate
        if self.failing is not None:
            raise SharedStateError(self.failing)
        self.entries.extend(entries)

    async def read(self, partitions: Iterable[int], starts: Mapping[int, int]) -> AsyncIterator[Fetched]:
        wanted = sorted(set(partitions))
        self.read_partitions.append(wanted)
        if self.on_read is not None:
            self.on_read()
        if self.failing is not None:
            raise SharedStateError(self.failing)
        for partition in wanted:  # as KafkaStateTopic: a start beyond the end (a topic made again) is the beginning
            held = [entry for entry in self.entries if entry.partition == partition]
            start = starts.get(partition, 0) if starts.get(partition, 0) <= len(held) else 0
            yield Fetched(partition, [], start)
            yield Fetched(partition, held[start:], len(held))


QUICK_SINK: dict[str, float] = {"backoff_base": 0.05, "backoff_cap": 0.2, "commit_interval": 0.2}


def settings_env(
    broker: BrokerInfo | str,
    prefix: str,
    state_dir: Path,
    *,
    partitions: int = 6,
    sinks: Mapping[str, Mapping[str, Any]] | None = None,
    **ingest: object,
) -> dict[str, str]:
    """The ORDERBUS_* variables of a daemon under test (the way an operator overrides a file); `broker`, or its
    bootstrap servers."""
    env = {
        "ORDERBUS_KAFKA__BOOTSTRAP_SERVERS": broker if isinstance(broker, str) else broker.bootstrap,
        "ORDERBUS_TOPICS__PREFIX": prefix,
        "ORDERBUS_TOPICS__ORDERS_PARTITIONS": str(partitions),
        "ORDERBUS_STATE_DIR": str(state_dir),
        "ORDERBUS_INGEST__PORT": str(free_port()),
    }
    env.update({f"ORDERBUS_INGEST__{key.upper()}": str(value) for key, value in ingest.items()})
    if "webhook_secrets" not in ingest:
        env["ORDERBUS_INGEST__ALLOW_UNSIGNED"] = "true"  # the tests' own traffic, on loopback
    for name, values in (sinks or {}).items():
        env[f"ORDERBUS_SINKS__{name.upper()}"] = json.dumps({"enabled": True, **values})
    return env


def settings_for(
    broker: BrokerInfo,
    prefix: str,
    state_dir: Path,
    *,
    partitions: int = 6,
    sinks: Mapping[str, Mapping[str, Any]] | None = None,
    **ingest: object,
) -> Settings:
    """Settings of a daemon under test, from `settings_env`."""
    return load_settings(
        None, env=settings_env(broker, prefix, state_dir, partitions=partitions, sinks=sinks, **ingest)
    )


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 60.0, every: float = 0.1) -> None:
    """Return once `condition` (plain or async) holds, asked every `every` seconds; `TimeoutError` after `timeout`."""
    async with asyncio.timeout(timeout):
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await asyncio.sleep(every)


async def orderbus_cli(*args: str, env: Mapping[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`orderbus ARGS` run to its end with the ORDERBUS_* variables `env`, on a thread: a daemon in this process
    goes on serving meanwhile."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "daemon", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    """A plain topic of `partitions` partitions (one replica), outside the catalogue."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def apply_topics(settings: Settings) -> None:
    await apply_catalogue(catalogue(topic_layout(settings.topics)), client_options(settings.kafka))


@contextlib.asynccontextmanager
async def running_daemon(
    settings: Settings, registry: CollectorRegistry | None = None, *, apply: bool = True
) -> AsyncIterator[str]:
    """The whole daemon in this process until the block ends (then a clean stop); yields its base URL. `apply`:
    create the topics first."""
    if apply:
        await apply_topics(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, registry=registry))
    base = f"http://127.0.0.1:{settings.ingest.port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(f"{base}/healthz") as response:
                    if response.status == 200:
                        break
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
    try:
        yield base
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def make_events(count: int, *, seed: int = 0, prefix: str = "SO") -> list[OrderEvent]:
    """`count` order.created events with distinct order numbers."""
    return [sample_event(random.Random(seed * 1_000_003 + i), order_number=f"{prefix}-{i:06d}") for i in range(count)]


def with_type(event: OrderEvent, event_type: EventType, seed: int) -> OrderEvent:
    """Another event of the same order (a new event id)."""
    fresh = sample_event(random.Random(seed), order_number=event.order.order_number)
    return event.model_copy(update={"event_type": event_type, "event_id": fresh.event_id})


async def produce(bootstrap: str, topic: str, events: list[OrderEvent], *, compression: str | None = None) -> None:
    """Publish `events` the way an upstream system would: keyed by order number, acks=all, batches compressed with
    `compression` (gzip, snappy, lz4, zstd) or not at all."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5, compression_type=compression
    )
    await producer.start()
    try:
        sends = []
        for event in events:
            record = encode(event)
            sends.append(await producer.send(topic, value=record.value, key=record.key, headers=record.headers))
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def produce_raw(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


# A producer that writes a header name that is not UTF-8, as a client sending raw bytes can (Kafka's Java clients
# cannot): aiokafka's pure-Python record builder encodes header names with `str.encode`, which a subclass answers.
# The records (JSON on stdin) go to one partition in one batch; the one marked "bad" gets such a header.
_UNREADABLE_PRODUCER = """
import asyncio, base64, json, sys
from aiokafka import AIOKafkaProducer

class RawName(str):
    def encode(self, *args, **kwargs):
        return b"\\xff\\xfe"

async def main(job):
    producer = AIOKafkaProducer(bootstrap_servers=job["bootstrap"], acks="all", linger_ms=200)
    await producer.start()
    try:
        sent = []
        for record in job["records"]:
            headers = [(name, base64.b64decode(value)) for name, value in record["headers"]]
            if record["bad"]:
                headers.append((RawName("x"), b"1"))
            value = base64.b64decode(record["value"])
            sent.append(await producer.send(
                job["topic"], value, key=record["key"].encode(), partition=job["partition"], headers=headers
            ))
        offsets = [(await future).offset for future in sent]
    finally:
        await producer.stop()
    print(json.dumps(offsets))

asyncio.run(main(json.load(sys.stdin)))
"""


async def produce_unreadable(
    bootstrap: str, topic: str, partition: int, events: list[OrderEvent], *, bad: int
) -> list[int]:
    """`events` to `partition` of `topic` in one batch, the one at index `bad` with a header name that is not UTF-8
    (aiokafka's consumer cannot decode it); their offsets."""
    records = []
    for index, event in enumerate(events):
        record = encode(event)
        records.append(
            {
                "key": event.order.order_number,
                "value": base64.b64encode(record.value).decode(),
                "headers": [(name, base64.b64encode(value).decode()) for name, value in record.headers],
                "bad": index == bad,
            }
        )
    job = {"bootstrap": bootstrap, "topic": topic, "partition": partition, "records": records}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _UNREADABLE_PRODUCER,
        env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate(json.dumps(job).encode())
    assert process.returncode == 0, stderr.decode()
    offsets: list[int] = json.loads(stdout)
    return offsets


async def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """Every record of `topic` from the beginning to the end offsets, as (key, value, headers)."""
    partitions = [TopicPartition(topic, p) for p in await partition_ids(topic, {"bootstrap_servers": bootstrap})]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            batch = await consumer.getmany(timeout_ms=1000)
            for messages in batch.values():
                records.extend((m.key, m.value, list(m.headers or ())) for m in messages)
        return records
    finally:
        await consumer.stop()


async def committed_vs_end(bootstrap: str, topic: str, group: str) -> tuple[dict[int, int], dict[int, int]]:
    """The group's committed offsets and the topic's end offsets, per partition."""
    partitions = [TopicPartition(topic, p) for p in await partition_ids(topic, {"bootstrap_servers": bootstrap})]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
        committed = {tp.partition: (await consumer.committed(tp)) or 0 for tp in partitions}
        return committed, {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def orders_of(settings: Settings) -> str:
    return orders_topic(settings.topics.prefix)


# Personal data no log line may contain: distinctive, ASCII (so an escaped JSON string cannot hide it).
PERSONAL_TOKENS = (
    "Zebulon",
    "Quackenbush",
    "private-mailbox",
    "Wombatweg",
    "Quokka",
    "Ostwombatien",
    "QZ-4711-WB",
    "4915112345",
    "DE887766",
    "Privatier",
)


def _with_personal_data(data: dict[str, Any], n: int) -> dict[str, Any]:
    address = {
        "line1": f"Wombatweg {n}",
        "line2": "Hinterhaus Quokka",
        "postal_code": "QZ-4711-WB",
        "city": "Quokkahausen",
        "region": "Ostwombatien",
        "country": "DE",
    }
    data["order"]["customer"] = {
        "customer_id": f"C-{n}",
        "name": f"Zebulon Quackenbush {n}",
        "email": f"zebulon.quackenbush.{n}@private-mailbox.example",
        "phone": f"+4915112345{n % 1000:03d}",
        "company": "Quackenbush Privatier GmbH",
        "vat_id": f"DE887766{n % 1000:03d}",
    }
    data["order"]["billing_address"] = address
    data["order"]["shipping_address"] = {**address, "line1": f"Wombatweg {n + 1}"}
    return data


def personal_submission(n: int, *, order_number: str | None = None) -> OrderSubmission:
    """A webhook body whose customer and addresses are full of `PERSONAL_TOKENS`."""
    data = sample_submission(random.Random(n), order_number=order_number).model_dump(mode="json")
    return OrderSubmission.model_validate_json(json.dumps(_with_personal_data(data, n)))


def personal_event(n: int, *, order_number: str | None = None) -> OrderEvent:
    """An order.created event whose customer and addresses are full of `PERSONAL_TOKENS`."""
    data = sample_event(random.Random(n), order_number=order_number).model_dump(mode="json")
    return OrderEvent.model_validate_json(json.dumps(_with_personal_data(data, n)))


def longest_shutdown(settings: Settings) -> float:
    """The longest stop `settings` allow, the broker gone included: drain (the sinks drain at once, each up to its
    grace), record the last outcomes, commit (`consumers.engine.SinkEngine.drain`); then the webhook requests under
    way and the admin listener's (`daemon.app`); each sink leaves its group, one after another, and the dead-letter
    producer closes (`consumers.kafka_close`); the ingest's unacknowledged records (`daemon.publisher`)."""
    sinks = settings.enabled_sinks()
    grace = max((sink.shutdown_grace for sink in sinks.values()), default=0.0)
    listeners = INGEST_SHUTDOWN + (ADMIN_SHUTDOWN if settings.admin.port is not None else 0.0)
    leaves = len(sinks) * (LEAVE_TIMEOUT + CLEANUP)
    kafka = leaves + (DEAD_LETTER_CLOSE_GRACE + CLEANUP if sinks else 0.0) + CLOSE_GRACE + CLEANUP
    return grace + SETTLE_FLOOR + EngineConfig().commit_timeout + listeners + kafka


def certificate(
    directory: Path, name: str, *, days: int = 2, issuer: tuple[Path, Path] | None = None
) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (EC P-256) and its unencrypted key, made by openssl as `name`.crt and `name`.key
    in `directory`: self-signed, or signed by `issuer` (a certificate and its key)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subject = ["-subj", f"/CN={name}.orderbus.test", "-addext", "subjectAltName=IP:127.0.0.1"]
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key)]
    if issuer is None:
        _openssl("req", "-x509", *new_key, "-days", str(days), *subject, "-out", str(cert))
    else:
        request = directory / f"{name}.csr"
        _openssl("req", *new_key, *subject, "-out", str(request))
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(issuer[0]), "-CAkey", str(issuer[1]), "-CAcreateserial",
            "-days", str(days), "-copy_extensions", "copy", "-out", str(cert),
        )  # fmt: skip
    return cert, key


def encrypted_key(key: Path) -> Path:
    """`key` encrypted with a password (``x``), as ``<name>.encrypted.key`` beside it: a key orderbus must refuse."""
    encrypted = key.with_suffix(".encrypted.key")
    _openssl("pkey", "-in", str(key), "-aes256", "-passout", "pass:x", "-out", str(encrypted))
    return encrypted


def _openssl(*argv: str) -> None:
    subprocess.run(["openssl", *argv], check=True, capture_output=True)


def tls_client(trusted: Path) -> ssl.SSLContext:
    """A TLS client's context trusting `trusted` (our test certificates name 127.0.0.1; names are not checked)."""
    context = ssl.create_default_context(cafile=str(trusted))
    context.check_hostname = False
    return context


async def peer_certificate(port: int, trusted: Path, server_name: str | None = None) -> bytes:
    """The certificate a new TLS connection to 127.0.0.1:`port` is shown (one the client trusts, or the handshake
    fails); `server_name` is sent as SNI (a client connecting to an address sends none)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_client(trusted), server_hostname=server_name)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert isinstance(der, bytes)
        return der
    finally:
        writer.close()


async def log_line(stream: asyncio.StreamReader, text: str) -> str:
    """The next line of a daemon's output (`stream`) that holds `text`; `AssertionError` if the output ends first."""
    while line := await stream.readline():
        if text in line.decode():
            return line.decode()
    raise AssertionError(f"the daemon ended before logging {text!r}")
