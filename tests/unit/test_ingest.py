"""The ingest handler through aiohttp's test client, with a fake publisher and the in-memory key store.

Every answer code of ``POST /v1/orders`` has a test here; the real-broker behaviour is in
tests/integration/test_ingest_kafka.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from support import until

from consumers.clock import FakeClock
from consumers.deadlines import Deadlines
from daemon.app import RUNNER_OPTIONS, build_app
from daemon.ingest import EVENT_ID_NAMESPACE, Ingest, IngestConfig, _answer
from daemon.ingest_keys import Claim, IngestKeyStore, MemoryIngestKeyStore, body_sha256
from daemon.openapi import PROBLEM_CODES
from daemon.problems import MAX_LISTED_ERRORS
from daemon.publisher import BrokerUnavailable, Published, PublishPending
from daemon.signature import WebhookVerifier, sign
from topics.codec import EncodedRecord, decode
from topics.errors import StoreError
from topics.samples import sample_submission

Client = TestClient[web.Request, web.Application]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NOW = 1_800_000_000.0


@dataclass
class FakePublisher:
    """Implements `daemon.publisher.Publisher`; `mode` decides the outcome of the next publishes."""

    mode: str = "ok"
    records: list[EncodedRecord] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    late: asyncio.Future[Published] | None = None

    @property
    def available(self) -> bool:
        return self.mode != "down"

    async def publish(self, record: EncodedRecord, *, timeout: float) -> Published:
        if self.mode == "down":
            raise BrokerUnavailable("kafka is unreachable")
        if self.mode == "pending":
            self.records.append(record)
            self.late = asyncio.get_running_loop().create_future()
            raise PublishPending(self.late)
        if self.mode == "broken":  # a bug below the publisher's contract
            raise RuntimeError("unexpected")
        if self.mode == "slow":
            self.entered.set()
            await self.gate.wait()
        self.records.append(record)
        return Published("orders", 3, len(self.records) - 1)


def body(seed: int = 1, *, event_id: bool = True) -> bytes:
    submission = sample_submission(random.Random(seed))
    exclude = None if event_id else {"event_id"}
    return submission.model_dump_json(exclude=exclude).encode()


async def serve(app: web.Application) -> Client:
    """A test client of `app`, served as the daemon serves it (aiohttp's test server always cancels handlers)."""
    server = TestServer(app)
    await server.start_server(
        **{name: value for name, value in RUNNER_OPTIONS.items() if name != "handler_cancellation"}
    )
    return TestClient(server)


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


async def client_for(
    publisher: FakePublisher,
    *,
    secrets: tuple[str, ...] = (),
    max_body_bytes: int = 64 * 1024,
    keys: IngestKeyStore | None = None,
) -> Client:
    ingest = Ingest(
        publisher,
        keys if keys is not None else MemoryIngestKeyStore(),
        IngestConfig(max_body_bytes=max_body_bytes, publish_timeout=1.0, retry_after=7),
        verifier=WebhookVerifier(secrets, clock=lambda: NOW) if secrets else None,
        clock=lambda: NOW,
    )
    app = build_app(ingest=ingest, readiness=lambda: {}, max_body_bytes=max_body_bytes)
    client: Client = await serve(app)
    await client.start_server()
    return client


def signed_headers(msg_id: str, payload: bytes) -> dict[str, str]:
    """A JSON post's headers, signed with `SECRET` now (`NOW`) as Standard Webhooks says."""
    stamp = int(NOW)
    signature = sign(SECRET, msg_id, stamp, payload)
    return {**JSON, "webhook-id": msg_id, "webhook-timestamp": str(stamp), "webhook-signature": signature}


@pytest.fixture
async def client(publisher: FakePublisher) -> AsyncIterator[Client]:
    client = await client_for(publisher)
    yield client
    await client.close()


JSON = {"Content-Type": "application/json"}


async def test_accepted_after_publish_with_where_it_landed(client: Client, publisher: FakePublisher) -> None:
    response = await client.post("/v1/orders", data=body(), headers=JSON)
    assert response.status == 202
    answer = await response.json()
    assert answer["topic"] == "orders"
    assert (answer["partition"], answer["offset"]) == (3, 0)
    [record] = publisher.records
    event = decode(record.value)
    assert str(event.event_id) == answer["event_id"]
    assert record.key == event.order.order_number.encode()
    assert event.source == "webhook"


async def test_wrong_content_type_is_415(client: Client, publisher: FakePublisher) -> None:
    response = await client.post("/v1/orders", data=body(), headers={"Content-Type": "text/plain"})
    assert response.status == 415
    assert response.content_type == "application/problem+json"
    assert publisher.records == []


async def test_oversized_body_is_413_declared_or_streamed(publisher: FakePublisher) -> None:
    client = await client_for(publisher, max_body_bytes=2048)
    try:
        big = b'{"order": "' + b"x" * 4096 + b'"}'
        declared = await client.post("/v1/orders", data=big, headers=JSON)
        assert declared.status == 413

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b" " * 1024

        streamed = await client.post("/v1/orders", data=chunks(), headers=JSON)
        assert streamed.status == 413
        assert publisher.records == []
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("payload", "field_name"),
    [
        (b"{not json", "body"),
        (b"[]", "body"),
        (b'{"order": {}}', "order.order_number"),
    ],
)
async def test_bad_json_or_bad_order_is_400_with_field_errors(
    client: Client, publisher: FakePublisher, payload: bytes, field_name: str
) -> None:
    response = await client.post("/v1/orders", data=payload, headers=JSON)
    assert response.status == 400
    problem = await response.json()
    assert field_name in [error["field"] for error in problem["errors"]]
    assert publisher.records == []


async def test_a_body_with_thousands_of_problems_lists_the_first_hundred(client: Client) -> None:
    # Review (sender): 120,000 unknown keys in a 1 MiB body made a 9 MB answer.
    document = json.loads(body())
    document["order"].update({f"x{i}": 1 for i in range(5000)})
    response = await client.post("/v1/orders", data=json.dumps(document), headers=JSON)
    assert response.status == 400
    problem = await response.json()
    assert len(problem["errors"]) == MAX_LISTED_ERRORS
    assert problem["detail"] == "the order breaks the contract (5000 problems; the first 100 are listed)"
    assert len(await response.read()) < 20_000


async def test_money_that_does_not_add_up_names_the_field(client: Client) -> None:
    document = json.loads(body())
    document["order"]["gross_total"] = "0.01"
    response = await client.post("/v1/orders", data=json.dumps(document), headers=JSON)
    assert response.status == 400
    assert "order.gross_total" in [error["field"] for error in (await response.json())["errors"]]


@pytest.mark.parametrize("key", ["has space", "", "é"])
async def test_bad_idempotency_key_is_400(client: Client, publisher: FakePublisher, key: str) -> None:
    # An empty key was taken for no key: two sends were two events.
    response = await client.post("/v1/orders", data=body(), headers={**JSON, "Idempotency-Key": key})
    assert response.status == 400
    assert (await response.json())["type"].endswith("invalid-idempotency-key")
    assert publisher.records == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP"])
async def test_a_compressed_body_is_415(client: Client, publisher: FakePublisher, encoding: str) -> None:
    # aiohttp inflated it, but the body was then read by its compressed length: a 400 for a valid gzip order, and a
    # 500 with a traceback for a plain body labelled gzip.
    for payload in (gzip.compress(body()), body()):
        response = await client.post("/v1/orders", data=payload, headers={**JSON, "Content-Encoding": encoding})
        assert response.status == 415
        assert (await response.json())["type"].endswith("unsupported-content-encoding")
    assert publisher.records == []


async def test_identity_encoding_is_a_plain_body(client: Client) -> None:
    response = await client.post("/v1/orders", data=body(), headers={**JSON, "Content-Encoding": "identity"})
    assert response.status == 202


async def test_a_body_aiohttp_fails_to_read_is_400_not_a_traceback(publisher: FakePublisher) -> None:
    # aiohttp fails a body's stream with RequestPayloadError (a broken chunk, a bad encoding): the handler let it
    # out, so the answer was a 500 and a logged traceback, for anyone who can reach the port, before any signature.
    ingest = Ingest(publisher, MemoryIngestKeyStore(), IngestConfig(), clock=lambda: NOW)
    stream = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(b'{"order"')
    stream.set_exception(web.RequestPayloadError("Not enough data to satisfy transfer length header."))
    request = make_mocked_request("POST", "/v1/orders", headers={**JSON, "Content-Length": "64"}, payload=stream)

    response = await ingest.post_order(request)

    assert response.status == 400
    assert b"unreadable-body" in cast(bytes, response.body)
    assert publisher.records == []


async def test_repeat_gets_the_first_answer_and_publishes_nothing(client: Client, publisher: FakePublisher) -> None:
    headers = {**JSON, "Idempotency-Key": "order-1-created"}
    first = await client.post("/v1/orders", data=body(event_id=False), headers=headers)
    again = await client.post("/v1/orders", data=body(event_id=False), headers=headers)
    assert (first.status, again.status) == (202, 202)
    assert await first.read() == await again.read()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(publisher.records) == 1
    # Without an event id of its own, the event id derives from the key and the body: a republish carries the same.
    event = decode(publisher.records[0].value)
    assert event.event_id == uuid.uuid5(EVENT_ID_NAMESPACE, f"order-1-created\n{body_sha256(body(event_id=False))}")


async def test_a_key_used_again_for_another_order_after_it_was_forgotten_makes_a_new_event(
    publisher: FakePublisher,
) -> None:
    # The key store forgets keys after its retention (48 h), the sinks' dedup after theirs (168 h): with the event id
    # derived from the key alone, the second order got the first one's id and every sink skipped it as a duplicate.
    keys = MemoryIngestKeyStore()
    client = await client_for(publisher, keys=keys)
    try:
        headers = {**JSON, "Idempotency-Key": "order-key"}
        assert (await client.post("/v1/orders", data=body(1, event_id=False), headers=headers)).status == 202
        assert await keys.prune(NOW + 1) == 1
        assert (await client.post("/v1/orders", data=body(2, event_id=False), headers=headers)).status == 202
        first, second = (decode(record.value) for record in publisher.records)
        assert first.order.order_number != second.order.order_number
        assert first.event_id != second.event_id
    finally:
        await client.close()


async def test_a_request_without_a_key_retried_after_a_late_publish_is_the_same_event(
    client: Client, publisher: FakePublisher
) -> None:
    timed = body(event_id=False)
    assert json.loads(timed)["occurred_at"] is not None  # the sample says when it happened
    publisher.mode = "pending"
    pending = await client.post("/v1/orders", data=timed, headers=JSON)
    assert pending.status == 503
    assert (await pending.json())["detail"].endswith("retry with the same request")
    assert publisher.late is not None
    publisher.late.set_result(Published("orders", 3, 0))  # it landed after all
    publisher.mode = "ok"
    assert (await client.post("/v1/orders", data=timed, headers=JSON)).status == 202
    late, retried = (decode(record.value) for record in publisher.records)
    assert late.event_id == retried.event_id  # one event: every sink delivers it once


async def test_the_same_body_without_a_key_or_a_time_is_a_new_event_each_time(
    client: Client, publisher: FakePublisher
) -> None:
    # order.updated to A, then B, then A again: with its id from the body alone, the second A was the first one's
    # duplicate, and every sink skipped it.
    document = json.loads(body(event_id=False))
    del document["occurred_at"]
    untimed = json.dumps(document).encode()
    for _ in range(2):
        assert (await client.post("/v1/orders", data=untimed, headers=JSON)).status == 202
    first, second = (decode(record.value) for record in publisher.records)
    assert first.event_id != second.event_id
    publisher.mode = "pending"
    pending = await client.post("/v1/orders", data=untimed, headers=JSON)
    assert "Idempotency-Key" in (await pending.json())["detail"]  # a retry cannot be told from a new order


async def test_same_key_other_body_is_422(client: Client, publisher: FakePublisher) -> None:
    headers = {**JSON, "Idempotency-Key": "k"}
    assert (await client.post("/v1/orders", data=body(1, event_id=False), headers=headers)).status == 202
    response = await client.post("/v1/orders", data=body(2, event_id=False), headers=headers)
    assert response.status == 422
    assert len(publisher.records) == 1


async def test_a_body_with_its_own_event_id_is_keyed_by_it(client: Client, publisher: FakePublisher) -> None:
    # Review (shop team): the same event_id sent again under another key with another body (an update reusing the
    # create's id) was published, then skipped by every sink as a duplicate: silently lost.
    first = json.loads(body(1))
    changed = {**first, "event_type": "order.updated", "order": {**first["order"], "paid": not first["order"]["paid"]}}
    created = await client.post("/v1/orders", data=json.dumps(first), headers={**JSON, "Idempotency-Key": "a"})
    assert created.status == 202
    reused = await client.post("/v1/orders", data=json.dumps(changed), headers={**JSON, "Idempotency-Key": "b"})
    assert reused.status == 422
    assert (await reused.json())["detail"].startswith("this event_id was used with another body")
    again = await client.post("/v1/orders", data=json.dumps(first), headers={**JSON, "Idempotency-Key": "c"})
    assert (again.status, again.headers.get("Idempotent-Replayed")) == (202, "true")  # the same event: its answer
    assert len(publisher.records) == 1


async def test_same_key_in_flight_is_409(client: Client, publisher: FakePublisher) -> None:
    publisher.mode = "slow"
    headers = {**JSON, "Idempotency-Key": "k"}
    first = asyncio.create_task(client.post("/v1/orders", data=body(), headers=headers))
    await publisher.entered.wait()
    second = await client.post("/v1/orders", data=body(), headers=headers)
    assert (second.status, second.headers.get("Retry-After")) == (409, "1")  # when to send it again
    publisher.gate.set()
    assert (await first).status == 202
    assert len(publisher.records) == 1


async def test_kafka_down_is_503_with_retry_after_and_the_key_is_free_again(
    client: Client, publisher: FakePublisher
) -> None:
    publisher.mode = "down"
    headers = {**JSON, "Idempotency-Key": "k"}
    down = await client.post("/v1/orders", data=body(), headers=headers)
    assert down.status == 503
    assert down.headers["Retry-After"] == "7"
    publisher.mode = "ok"
    back = await client.post("/v1/orders", data=body(), headers=headers)
    assert back.status == 202
    assert len(publisher.records) == 1


async def test_an_unexpected_publish_error_is_500_and_the_key_is_free_again(
    client: Client, publisher: FakePublisher
) -> None:
    # The key stayed in flight after the 500: every retry with it got 409 until a restart.
    publisher.mode = "broken"
    headers = {**JSON, "Idempotency-Key": "k"}
    assert (await client.post("/v1/orders", data=body(), headers=headers)).status == 500
    publisher.mode = "ok"
    assert (await client.post("/v1/orders", data=body(), headers=headers)).status == 202
    assert len(publisher.records) == 1


class ClosedOnReleaseKeyStore(MemoryIngestKeyStore):
    """Its releases fail, as the SQLite store's do once it is closed at shutdown."""

    async def release(self, key: str) -> None:
        raise StoreError("ingest key store /state/ingest.sqlite3 is not open")


async def test_a_release_that_fails_does_not_hide_the_error_that_ended_the_request(
    publisher: FakePublisher, caplog: pytest.LogCaptureFixture
) -> None:
    publisher.mode = "broken"
    client = await client_for(publisher, keys=ClosedOnReleaseKeyStore())
    try:
        response = await client.post("/v1/orders", data=body(), headers={**JSON, "Idempotency-Key": "k"})
        assert response.status == 500
    finally:
        await client.close()
    logged = [record.exc_info[1] for record in caplog.records if record.exc_info]
    assert [type(error) for error in logged] == [RuntimeError]  # the cause, not the release's StoreError


async def test_a_late_publish_that_ends_in_an_unexpected_error_frees_its_key(
    client: Client, publisher: FakePublisher
) -> None:
    publisher.mode = "pending"
    headers = {**JSON, "Idempotency-Key": "k"}
    assert (await client.post("/v1/orders", data=body(), headers=headers)).status == 503
    assert publisher.late is not None
    publisher.late.set_exception(RuntimeError("unexpected"))
    publisher.mode = "ok"
    for _ in range(10):  # the settling task runs
        await asyncio.sleep(0)
    assert (await client.post("/v1/orders", data=body(), headers=headers)).status == 202


class FailingKeyStore(MemoryIngestKeyStore):
    """Its claims fail, as the SQLite store's do while its file or its process fails."""

    async def claim(self, key: str, body_sha256: str, now: float) -> Claim:
        raise StoreError("ingest key store /state/ingest.sqlite3: claim failed: disk I/O error")


async def test_a_failing_key_store_is_503_with_retry_after_and_nothing_published(publisher: FakePublisher) -> None:
    client = await client_for(publisher, keys=FailingKeyStore())
    try:
        response = await client.post("/v1/orders", data=body(), headers={**JSON, "Idempotency-Key": "k"})
        assert response.status == 503
        assert response.headers["Retry-After"] == "7"
        assert (await response.json())["type"].endswith("key-store-unavailable")
        assert publisher.records == []
    finally:
        await client.close()


async def test_a_late_publish_keeps_its_key_until_the_outcome_is_known(
    client: Client, publisher: FakePublisher
) -> None:
    publisher.mode = "pending"
    headers = {**JSON, "Idempotency-Key": "k"}
    assert (await client.post("/v1/orders", data=body(), headers=headers)).status == 503
    # A retry while the first publish is still pending must not publish again.
    assert (await client.post("/v1/orders", data=body(), headers=headers)).status == 503
    assert publisher.late is not None
    publisher.late.set_result(Published("orders", 5, 42))
    for _ in range(10):
        await asyncio.sleep(0)
    publisher.mode = "ok"
    replay = await client.post("/v1/orders", data=body(), headers=headers)
    assert replay.status == 202
    assert (await replay.json())["offset"] == 42
    assert len(publisher.records) == 1


async def test_signatures_are_required_when_secrets_are_set(publisher: FakePublisher) -> None:
    client = await client_for(publisher, secrets=("whsec_b2xkLXNlY3JldC1vZi10aGUtc2hvcC0x", SECRET))
    try:
        payload = body()
        unsigned = await client.post("/v1/orders", data=payload, headers=JSON)
        assert unsigned.status == 401
        assert "webhook-id" in (await unsigned.json())["detail"]
        signed = signed_headers("msg_1", payload)
        tampered = await client.post("/v1/orders", data=payload + b" ", headers=signed)
        assert tampered.status == 401
        ok = await client.post("/v1/orders", data=payload, headers=signed)
        assert ok.status == 202
        # webhook-id is the idempotency key when no Idempotency-Key is sent: a redelivery publishes nothing.
        redelivered = await client.post("/v1/orders", data=payload, headers=signed)
        assert redelivered.status == 202
        assert len(publisher.records) == 1
    finally:
        await client.close()


async def test_a_signed_request_is_keyed_by_its_signed_webhook_id_not_an_unsigned_header(
    publisher: FakePublisher,
) -> None:
    # Regression (walkthrough): Idempotency-Key won over webhook-id, and is not signed: a captured request sent again
    # within the signature's 5 minutes with new Idempotency-Keys was published again each time, as a new event.
    client = await client_for(publisher, secrets=(SECRET,))
    try:
        payload = body()
        signed = signed_headers("msg_7", payload)
        first = await client.post("/v1/orders", data=payload, headers={**signed, "Idempotency-Key": "msg_7"})
        assert first.status == 202
        for forged in ("attacker-1", "attacker-2"):  # ignored: answered from the key store, published once
            replayed = await client.post("/v1/orders", data=payload, headers={**signed, "Idempotency-Key": forged})
            assert (replayed.status, replayed.headers.get("Idempotent-Replayed")) == (202, "true")
            assert await replayed.read() == await first.read()
        assert len(publisher.records) == 1
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("headers", "named"),
    [({"Idempotency-Key": "has space"}, "Idempotency-Key"), ({"webhook-id": "msg h1"}, "webhook-id")],
)
async def test_a_bad_idempotency_key_is_refused_naming_its_header(
    client: Client, headers: dict[str, str], named: str
) -> None:
    response = await client.post("/v1/orders", data=body(), headers={**JSON, **headers})
    assert response.status == 400
    assert (await response.json())["detail"] == (
        f"{named}: an idempotency key is 1-255 visible ASCII characters (no space or control character)"
    )


async def test_a_body_that_arrives_in_pieces_is_read_whole(publisher: FakePublisher) -> None:
    # Regression (chaos run): only the first piece of a large body was read, so its signature never matched (401)
    # and an unsigned one was cut short (400). A body of 300 KB over loopback arrives in several pieces.
    client = await client_for(publisher, secrets=(SECRET,), max_body_bytes=1_048_576)
    try:
        payload = body()
        signed = signed_headers("msg_pieces", payload)

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(payload), 64):
                yield payload[start : start + 64]
                await asyncio.sleep(0)  # each piece its own write, so the server sees them one by one

        response = await client.post("/v1/orders", data=pieces(), headers=signed)
        assert response.status == 202, await response.text()
        [record] = publisher.records
        assert decode(record.value).order == sample_submission(random.Random(1)).order
    finally:
        await client.close()


async def test_openapi_health_and_readiness(client: Client) -> None:
    document = await (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]["/v1/orders"]["post"]["responses"]) == {
        "202", "400", "401", "408", "409", "413", "415", "417", "422", "503",
    }  # fmt: skip
    # How to sign, where a reader and a generator look: the header's description (no apiKey scheme: a fixed value).
    signature = next(
        p for p in document["paths"]["/v1/orders"]["post"]["parameters"] if p["name"] == "webhook-signature"
    )
    assert "HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}`" in signature["description"]
    assert "securitySchemes" not in document["components"]
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [("GET", "/nope", 404, None), ("GET", "/v1/orders", 405, "POST"), ("DELETE", "/healthz", 405, "GET, HEAD")],
)
async def test_unknown_paths_and_methods_are_answered_as_problems(
    client: Client, method: str, path: str, status: int, allow: str | None
) -> None:
    # Regression (walkthrough): aiohttp's own plain-text "404: Not Found" and "405: Method Not Allowed".
    response = await client.request(method, path)
    assert (response.status, response.content_type) == (status, "application/problem+json")
    assert (await response.json())["status"] == status
    assert response.headers.get("Allow") == allow


async def head_of_the_answer(client: Client, expect: str, length: int) -> bytes:
    """Send only the headers of a POST with `expect` and a declared `length`; the status line of the answer, and
    " close" after it if the answer closes the connection (a refusal must: the body it refused never comes)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            f"POST /v1/orders HTTP/1.1\r\nHost: orderbus\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nExpect: {expect}\r\n\r\n".encode()
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        if status.startswith(b"HTTP/1.1 100"):
            return status
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return status + (b" close" if b"Connection: close" in head else b"")
    finally:
        writer.close()


async def test_a_body_that_stops_arriving_is_408_and_the_connection_closed(publisher: FakePublisher) -> None:
    # A stalled client (its network gone, no FIN) held its request, and what it had sent, until TCP gave up: hours.
    clock = FakeClock()
    deadlines = Deadlines(clock)
    ingest = Ingest(
        publisher,
        MemoryIngestKeyStore(),
        IngestConfig(body_timeout=30.0),
        clock=lambda: NOW,
        deadlines=deadlines,
    )
    client: Client = await serve(build_app(ingest=ingest, readiness=dict))
    await client.start_server()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        payload = body()
        writer.write(
            f"POST /v1/orders HTTP/1.1\r\nHost: orderbus\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload[:100]
        )
        await writer.drain()
        for _ in range(10_000):  # until the handler waits for the rest (real sockets: no clock to wait on)
            if deadlines.open:
                break
            await asyncio.sleep(0)
        assert deadlines.open == 1
        await clock.advance(29.0)
        assert deadlines.open == 1, "not before its time"
        await clock.advance(1.1)
        status = await asyncio.wait_for(reader.readline(), 5)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert status == b"HTTP/1.1 408 Request Timeout\r\n"
        assert b"Connection: close" in head
        assert publisher.records == []
    finally:
        writer.close()
        await client.close()


async def test_a_body_declared_too_large_is_refused_before_it_is_sent(publisher: FakePublisher) -> None:
    # Regression (walkthrough): with Expect: 100-continue (curl sends it past 1 MB), aiohttp asked for the body
    # ("100 Continue"), the client uploaded it all, and only then came the 413.
    client = await client_for(publisher, max_body_bytes=2048)
    try:
        assert (
            await head_of_the_answer(client, "100-continue", 10_000_000)
            == b"HTTP/1.1 413 Request Entity Too Large\r\n close"
        )
        assert await head_of_the_answer(client, "100-continue", 2048) == b"HTTP/1.1 100 Continue\r\n"
        assert await head_of_the_answer(client, "something-else", 10) == b"HTTP/1.1 417 Expectation Failed\r\n close"
        small = await client.post("/v1/orders", data=body(), headers=JSON, expect100=True)
        assert small.status == 202
        large = await client.post("/v1/orders", data=body() + b" " * 2048, headers=JSON, expect100=True)
        assert large.status == 413
        assert len(publisher.records) == 1
    finally:
        await client.close()


async def test_a_request_without_fresh_signature_headers_is_refused_before_its_body(publisher: FakePublisher) -> None:
    # Review (security): the whole body was read, and held in the body buffer, before the signature was looked at:
    # a few slow senders without any webhook-* header took the buffer from the shops' orders.
    client = await client_for(publisher, secrets=(SECRET,))
    try:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        try:
            writer.write(  # the head and 100 bytes of a 5,000-byte body, no more: the answer comes all the same
                b"POST /v1/orders HTTP/1.1\r\nHost: orderbus\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5000\r\n\r\n" + b" " * 100
            )
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 5)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert status == b"HTTP/1.1 401 Unauthorized\r\n"
            assert b"Connection: close" in head, "answered before the body came; aiohttp drops the rest, then closes"
        finally:
            writer.close()
        # With Expect: 100-continue, before the client sends it; and in the same order as without (415 first).
        assert await head_of_the_answer(client, "100-continue", 5000) == b"HTTP/1.1 401 Unauthorized\r\n close"
        plain = await client.post("/v1/orders", data=b"hi", headers={"Content-Type": "text/plain"}, expect100=True)
        assert plain.status == 415
        # Signed and fresh: asked for the body, and the order is published.
        payload = body()
        sent = await client.post("/v1/orders", data=payload, headers=signed_headers("msg_1", payload), expect100=True)
        assert sent.status == 202
        assert len(publisher.records) == 1
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("topic", "partition", "offset"),
    [("orders", 0, 0), ("shop.orders_v2-eu", 11, 9_007_199_254_740_993), ("O", 2**31 - 1, 2**63 - 1)],
)
def test_the_202_body_is_what_json_dumps_writes(topic: str, partition: int, offset: int) -> None:
    event_id = uuid.UUID("6f1c2a52-0a7e-4d0e-9a51-3f0f3c1c9b10")
    expected = {"event_id": str(event_id), "topic": topic, "partition": partition, "offset": offset}
    assert _answer(str(event_id), Published(topic, partition, offset)) == json.dumps(expected).encode()


def test_the_openapi_document_lists_every_problem_code_the_server_answers_with() -> None:
    names = ("ingest.py", "app.py", "connection_gate.py")
    sources = "".join((Path(__file__).parents[2] / "daemon" / name).read_text() for name in names)
    used = set(re.findall(r'(?:_refused|problem)\(\s*\d{3},\s*"([a-z-]+)"', sources))
    used |= set(re.findall(r'_closing_answer\(\s*\d{3},\s*"[^"]+",\s*"([a-z-]+)"', sources))
    used |= set(re.findall(r'_unavailable\([^)]*"([a-z]+(?:-[a-z]+)+)"\)', sources)) | {"kafka-unavailable"}
    assert used == set(PROBLEM_CODES)


async def buffered_client(publisher: FakePublisher, budget: int) -> tuple[Client, Ingest]:
    """A client of an ingest whose bodies under way may hold `budget` bytes together."""
    ingest = Ingest(
        publisher,
        MemoryIngestKeyStore(),
        IngestConfig(max_body_bytes=64 * 1024, body_buffer_bytes=budget, retry_after=7),
        clock=lambda: NOW,
    )
    client: Client = await serve(build_app(ingest=ingest, readiness=dict))
    await client.start_server()
    return client, ingest


async def test_bodies_beyond_the_buffer_are_503_while_others_hold_it_and_taken_once_it_is_free(
    publisher: FakePublisher,
) -> None:
    first, second = body(1, event_id=False), body(2, event_id=False)
    client, ingest = await buffered_client(publisher, budget=len(first) + len(second) // 2)
    try:
        publisher.mode = "slow"
        holding = asyncio.create_task(client.post("/v1/orders", data=first, headers={**JSON, "Idempotency-Key": "a"}))
        await asyncio.wait_for(publisher.entered.wait(), 5)
        assert ingest.buffered == len(first)
        refused = await client.post("/v1/orders", data=second, headers={**JSON, "Idempotency-Key": "b"})
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "7"
        problem = await refused.json()
        assert problem["type"].endswith("/body-buffer-full")
        assert "nothing was published" in problem["detail"]
        publisher.gate.set()
        assert (await holding).status == 202
        assert ingest.buffered == 0
        again = await client.post("/v1/orders", data=second, headers={**JSON, "Idempotency-Key": "b"})
        assert again.status == 202  # the refusal took nothing: the key is free
        assert [record.key for record in publisher.records] == [
            json.loads(first)["order"]["order_number"].encode(),
            json.loads(second)["order"]["order_number"].encode(),
        ]
    finally:
        await client.close()


async def test_a_chunked_body_is_counted_as_it_arrives(publisher: FakePublisher) -> None:
    payload = body(3, event_id=False)
    client, ingest = await buffered_client(publisher, budget=len(payload) - 1)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 100):
            yield payload[start : start + 100]

    try:
        response = await client.post("/v1/orders", data=chunks(), headers={**JSON, "Idempotency-Key": "c"})
        assert response.status == 503
        assert (await response.json())["type"].endswith("/body-buffer-full")
        assert ingest.buffered == 0
        assert publisher.records == []
    finally:
        await client.close()


async def test_a_body_declared_beyond_the_buffer_is_refused_before_it_is_sent(publisher: FakePublisher) -> None:
    client, ingest = await buffered_client(publisher, budget=4096)
    try:
        answer = await head_of_the_answer(client, "100-continue", 5000)
        assert answer == b"HTTP/1.1 503 Service Unavailable\r\n close"
        assert await head_of_the_answer(client, "100-continue", 4096) == b"HTTP/1.1 100 Continue\r\n"
        await until(lambda: ingest.buffered == 0, timeout=5, every=0.01)  # the client left without its body
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("mode", "payload", "status"),
    [
        ("ok", b"{not json", 400),
        ("ok", b"x" * (64 * 1024 + 1), 413),
        ("down", None, 503),
        ("broken", None, 500),
        ("ok", None, 202),
    ],
)
async def test_every_answer_gives_its_bodys_bytes_back(
    publisher: FakePublisher, mode: str, payload: bytes | None, status: int
) -> None:
    client, ingest = await buffered_client(publisher, budget=1_048_576)
    publisher.mode = mode
    try:
        data = payload if payload is not None else body(4, event_id=False)
        response = await client.post("/v1/orders", data=data, headers={**JSON, "Idempotency-Key": "k"})
        assert response.status == status
        assert ingest.buffered == 0
    finally:
        await client.close()


async def test_a_declared_body_holds_the_buffer_as_it_arrives_not_as_declared(publisher: FakePublisher) -> None:
    """Regression (review): the declared length was held at once, so a few heads without bodies (a few kB sent)
    took the whole buffer for `body_timeout`, and every order meanwhile got 503."""
    payload = body(5, event_id=False)
    client, ingest = await buffered_client(publisher, budget=len(payload) + 2000)
    _, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            b"POST /v1/orders HTTP/1.1\r\nHost: orderbus\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload) + 1000}\r\n\r\n".encode()
            + b"{"
        )
        await writer.drain()
        await until(lambda: ingest.buffered == 1, timeout=5, every=0.01)  # the one byte that came
        response = await client.post("/v1/orders", data=payload, headers={**JSON, "Idempotency-Key": "e"})
        assert response.status == 202
    finally:
        writer.close()
        await client.close()
    assert ingest.buffered == 0


async def test_a_client_gone_mid_body_is_not_a_server_error(publisher: FakePublisher) -> None:
    ingest = Ingest(publisher, MemoryIngestKeyStore(), IngestConfig(), clock=lambda: NOW)
    stream = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(b'{"order": ')
    stream.set_exception(ConnectionResetError("Connection lost"))
    request = make_mocked_request("POST", "/v1/orders", headers={**JSON, "Content-Length": "64"}, payload=stream)
    response = await ingest.post_order(request)
    assert response.status == 499, "nginx's client closed request: neither a 500 nor a malformed body's 400"
    assert response.reason == "Client Closed Request"
    assert publisher.records == []
    assert ingest.buffered == 0
