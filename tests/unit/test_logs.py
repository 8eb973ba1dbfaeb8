"""Logging as JSON lines: the formatter, `configure`, and the ingest's events, which name statuses and ids only.

The delivery paths (engine, lanes) are checked end to end in tests/integration/test_observability.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiokafka.client
import aiokafka.conn
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.consumer import fetcher, group_coordinator
from aiokafka.producer import sender
from support import PERSONAL_TOKENS, personal_submission

from daemon import logs
from daemon.app import build_app
from daemon.ingest import Ingest, IngestConfig
from daemon.ingest_keys import MemoryIngestKeyStore
from daemon.publisher import BrokerUnavailable, Published
from daemon.signature import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookVerifier, sign
from topics.codec import EncodedRecord

Client = TestClient[web.Request, web.Application]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NOW = 1_800_000_000


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line of `stream` as JSON: a line that is not one JSON object fails the test."""
    parsed = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert all(isinstance(event, dict) for event in parsed)
    return parsed


def test_an_event_is_one_json_line_with_its_extra_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("tests.logs.formatter")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.info("delivered\nin %d attempts", 2, extra={"sink": "crm", "attempt": 2, "status": 201})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", extra={"sink": "crm"})
    finally:
        logger.removeHandler(handler)
    first, second = events(stream)
    assert first["msg"] == "delivered\nin 2 attempts"
    assert (first["level"], first["logger"]) == ("info", "tests.logs.formatter")
    assert (first["sink"], first["attempt"], first["status"]) == ("crm", 2, 201)
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "error"
    assert "ValueError: boom" in second["exc"]


def test_configure_takes_the_level_and_quiets_chatty_libraries(json_logs: io.StringIO) -> None:
    stream = io.StringIO()
    logs.configure("WARNING", stream)
    logging.getLogger("orderbus.test").info("not shown")
    logging.getLogger("orderbus.test").warning("shown")
    assert [event["msg"] for event in events(stream)] == ["shown"]
    assert logging.getLogger().level == logging.WARNING
    logs.configure("DEBUG", json_logs)
    assert logging.getLogger("aiosqlite").level == logging.INFO
    assert logging.getLogger("aiokafka").level == logging.ERROR


def test_kafkas_reconnection_errors_are_said_once_per_five_minutes_with_the_count(json_logs: io.StringIO) -> None:
    # Review (operator): aiokafka's "Unable connect" at ERROR every 5 s of an outage, 17,000 lines a day.
    stream = io.StringIO()
    logs.configure("INFO", stream)
    # Through aiokafka's own loggers (aiokafka.client logs as "aiokafka"; one by its name was never limited).
    # And each sink's fetcher and coordinator lookup (review: ~200 lines in a 14 s outage with three sinks).
    loggers = (aiokafka.client.log, aiokafka.conn.log, fetcher.log, group_coordinator.log, sender.log)
    for log in loggers:
        for _ in range(60):
            log.error('Unable connect to "%s:%s": %s', "kafka-1", 9092, f"refused to {log.name}")
    lines = events(stream)
    assert [line["msg"] for line in lines] == [
        f'Unable connect to "kafka-1:9092": refused to {log.name}' for log in loggers
    ]
    assert all("limited" in line for line in lines)
    logging.getLogger("orderbus.test").error("ours")
    assert events(stream)[-1]["msg"] == "ours", "only aiokafka's reconnection loggers are limited so"
    logs.configure("INFO", json_logs)


@dataclass
class Publisher:
    """`daemon.publisher.Publisher`: holds publishes while `gate` is clear; refuses all while `down`."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    down: bool = False
    records: list[EncodedRecord] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return not self.down

    async def publish(self, record: EncodedRecord, *, timeout: float) -> Published:
        if self.down:
            raise BrokerUnavailable("kafka is unreachable")
        self.entered.set()
        await self.gate.wait()
        self.records.append(record)
        return Published("orders", 0, len(self.records) - 1)


@pytest.fixture
async def signed_client() -> AsyncIterator[tuple[Client, Publisher]]:
    publisher = Publisher()
    ingest = Ingest(
        publisher,
        MemoryIngestKeyStore(),
        IngestConfig(max_body_bytes=16 * 1024),
        verifier=WebhookVerifier([SECRET], clock=lambda: NOW),
        clock=lambda: NOW,
    )
    async with TestClient(TestServer(build_app(ingest=ingest, readiness=dict, max_body_bytes=16 * 1024))) as client:
        yield client, publisher


def signed(key: str, body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        ID_HEADER: key,
        TIMESTAMP_HEADER: str(NOW),
        SIGNATURE_HEADER: sign(secret, key, NOW, body),
    }


async def test_the_ingest_logs_every_answer_with_ids_and_never_personal_data(
    json_logs: io.StringIO, signed_client: tuple[Client, Publisher]
) -> None:
    client, publisher = signed_client
    # Client-chosen idempotency keys may be built from personal data too; they are never logged.
    keys = [f"Zebulon-Quackenbush-{n}" for n in range(4)]
    bodies = [personal_submission(n).model_dump_json(exclude={"event_id"}).encode() for n in range(4)]
    invalid = json.loads(bodies[3])
    invalid["order"]["customer"]["email"] = "Zebulon Quackenbush at private-mailbox"
    invalid["zebulon.quackenbush@private-mailbox.example"] = "an unknown key"
    invalid_body = json.dumps(invalid).encode()

    publisher.gate.set()
    statuses = [(await client.post("/v1/orders", data=bodies[0], headers=signed(keys[0], bodies[0]))).status]
    statuses.append((await client.post("/v1/orders", data=bodies[1], headers=signed(keys[0], bodies[1]))).status)
    publisher.gate.clear()
    publisher.entered.clear()
    held = asyncio.ensure_future(client.post("/v1/orders", data=bodies[2], headers=signed(keys[2], bodies[2])))
    await publisher.entered.wait()
    statuses.append((await client.post("/v1/orders", data=bodies[2], headers=signed(keys[2], bodies[2]))).status)
    publisher.gate.set()
    statuses.append((await held).status)
    statuses.append((await client.post("/v1/orders", data=invalid_body, headers=signed(keys[3], invalid_body))).status)
    forged = signed(keys[3], bodies[3], secret="whsec_" + "A" * 32)
    statuses.append((await client.post("/v1/orders", data=bodies[3], headers=forged)).status)
    statuses.append((await client.post("/v1/orders", data=bodies[3], headers={"Content-Type": "text/plain"})).status)
    big = bodies[3] + b" " * 16 * 1024
    statuses.append((await client.post("/v1/orders", data=big, headers=signed(keys[3], big))).status)
    publisher.down = True
    statuses.append((await client.post("/v1/orders", data=bodies[3], headers=signed(keys[3], bodies[3]))).status)
    assert statuses == [202, 422, 409, 202, 400, 401, 415, 413, 503]

    text = json_logs.getvalue()
    for secret in (SECRET, *keys):
        assert secret not in text
    for token in PERSONAL_TOKENS:
        assert token.lower() not in text.lower(), token
    answered = [event for event in events(json_logs) if event["msg"] in ("order published", "order refused")]
    assert sorted(event["status"] for event in answered) == sorted(statuses)
    for event in answered:
        if event["status"] == 202:
            assert event["event_id"], event
            assert event["order"].startswith("SO-"), event
        else:
            assert event["problem"], event
        if event["status"] in (409, 422, 503):
            assert event["order"].startswith("SO-"), event
    [invalid_order] = [event for event in answered if event["status"] == 400]
    assert invalid_order["fields"] == 2


@pytest.mark.parametrize("framing", ["longer-than-declared", "broken-chunk"])
async def test_a_request_aiohttp_cannot_parse_is_one_info_line_without_the_bytes_it_choked_on(
    json_logs: io.StringIO, signed_client: tuple[Client, Publisher], framing: str
) -> None:
    # Review (sender): aiohttp logged it at ERROR with a traceback quoting the body: names, e-mails, addresses.
    client, _ = signed_client
    body = personal_submission(7).model_dump_json().encode()
    head = "POST /v1/orders HTTP/1.1\r\nHost: orders\r\nContent-Type: application/json\r\nConnection: close\r\n"
    if framing == "longer-than-declared":
        raw = f"{head}Content-Length: {len(body) - 10}\r\n\r\n".encode() + body
    else:
        raw = f"{head}Transfer-Encoding: chunked\r\n\r\n10\r\n".encode() + body + b"\r\n0\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(raw)
        answer = await reader.read()
    finally:
        writer.close()
    assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request"), answer[:100]
    lines = [event for event in events(json_logs) if event["logger"] == "aiohttp.server"]
    assert lines == [{**lines[0], "level": "info", "msg": "malformed HTTP request refused (400): BadHttpMessage"}], (
        "one line, at INFO, without a traceback"
    )
    assert "exc" not in json.dumps(lines[0])
    for token in PERSONAL_TOKENS:
        assert token.lower() not in json_logs.getvalue().lower(), token


async def test_at_info_an_accepted_order_is_not_logged_and_a_refusal_is(
    json_logs: io.StringIO, signed_client: tuple[Client, Publisher]
) -> None:
    # One INFO line per accepted order would outrun journald's rate limit at a few hundred orders a second.
    logs.configure("INFO", json_logs)
    client, publisher = signed_client
    publisher.gate.set()
    body = personal_submission(0).model_dump_json().encode()
    accepted = await client.post("/v1/orders", data=body, headers=signed("key-1", body))
    refused = await client.post("/v1/orders", data=body, headers=signed("key-1", body, secret="whsec_" + "A" * 32))
    assert (accepted.status, refused.status) == (202, 401)
    ours = [(event["msg"], event["status"]) for event in events(json_logs) if event["logger"] == "daemon.ingest"]
    assert ours == [("order refused", 401)]


@pytest.mark.parametrize(
    "created",
    [
        0.0,
        1_800_000_000.0,
        1_800_000_000.0004995,  # rounds down to .000
        1_800_000_000.0009995,  # rounds up to the next millisecond
        1_800_000_000.9999996,  # rounds up to the next second
        1_800_000_059.9999999,  # ... and the next minute
        -0.5,
        -86_400.0000004,
        *(random.Random(7).uniform(-1e9, 4e9) for _ in range(200)),
    ],
)
def test_the_timestamp_is_datetimes_isoformat_to_the_millisecond(created: float) -> None:
    # The formatter formats the date and time once per second; the text must not change for that.
    formatter = logs.JsonFormatter()
    record = logging.makeLogRecord({"created": created - 1})
    formatter.format(record)  # the second before is cached
    record.created = created
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert json.loads(formatter.format(record))["ts"] == expected


def test_configure_stops_collecting_what_no_event_shows(json_logs: io.StringIO) -> None:
    logging.getLogger("orderbus.test").info("one", extra={"status": 202})
    [event] = events(json_logs)
    assert set(event) == {"ts", "level", "logger", "msg", "status"}
    assert logging._srcfile is None
    assert (logging.logThreads, logging.logProcesses, logging.logMultiprocessing) == (False, False, False)


class Recorder(io.StringIO):
    """A stream that records what had been written at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def tick_logger(stream: Recorder) -> logging.Logger:
    handler = logs.TickFlushingHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(f"tests.logs.tick.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


async def test_lines_written_in_one_turn_of_the_loop_are_flushed_together_at_its_end() -> None:
    stream = Recorder()
    logger = tick_logger(stream)
    logger.info("one")
    logger.debug("two")
    assert stream.flushed == []  # written, not flushed yet
    await asyncio.sleep(0)  # the loop turns
    [flushed] = stream.flushed
    assert [json.loads(line)["msg"] for line in flushed.splitlines()] == ["one", "two"]
    logger.info("three")
    await asyncio.sleep(0)
    assert len(stream.flushed) == 2
    assert stream.flushed[-1].endswith('"msg": "three"}\n')


async def test_a_warning_is_flushed_at_once_with_what_came_before() -> None:
    stream = Recorder()
    logger = tick_logger(stream)
    logger.info("before")
    logger.warning("trouble")
    [flushed] = stream.flushed
    assert [json.loads(line)["msg"] for line in flushed.splitlines()] == ["before", "trouble"]


def test_a_line_written_outside_a_loop_is_flushed_at_once() -> None:
    stream = Recorder()
    tick_logger(stream).info("no loop here")
    assert len(stream.flushed) == 1


def test_a_flush_due_on_a_loop_that_closed_does_not_stop_later_flushes() -> None:
    stream = Recorder()
    logger = tick_logger(stream)

    def log_only() -> None:
        logger.info("last line of a loop")
        first.stop()  # stops before the turn the flush was scheduled for

    first = asyncio.new_event_loop()
    first.call_soon(log_only)
    first.run_forever()
    first.close()
    assert stream.flushed == []  # the loop stopped before the flush's turn: its callback was left behind

    async def log_and_turn() -> None:
        logger.info("first line of the next loop")
        await asyncio.sleep(0)

    asyncio.run(log_and_turn())
    assert "first line of the next loop" in stream.flushed[-1]
