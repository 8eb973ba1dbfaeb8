"""`orderbus status`: what the daemon's status document says about the ingest, and how the command shows it;
`orderbus health`: what it asks and says."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from support import certificate

from consumers.engine import SinkEngine, lost_broker
from daemon.app import build_app
from daemon.connection_gate import ConnectionGate
from daemon.ingest_keys import SqliteIngestKeyStore
from daemon.kafka_certificate import kafka_certificate
from daemon.kafka_options import client_options
from daemon.lifecycle import _degraded, _reasons, _status
from daemon.publisher import KafkaPublisher
from daemon.settings import load_settings
from daemon.status import StatusError, fetch_status, probe_health, render_status
from daemon.tls_listener import ServerTls

EXITED = "ingest key store /var/lib/orderbus/ingest-keys.sqlite: its process exited (code -9)"


def test_a_failing_key_store_is_in_the_status_document_and_on_the_ingest_line(tmp_path: Path) -> None:
    keys = SqliteIngestKeyStore(tmp_path / "ingest-keys.sqlite")  # its state only; nothing is opened
    keys.failing = EXITED  # as a batch that failed leaves it (tests/unit/test_ingest_keys_process.py)
    document = _status(KafkaPublisher("orders", {}), keys, {}, CollectorRegistry())
    assert document["ingest"] == {
        "kafka_available": False,
        "kafka_unreachable": None,
        "kafka_refused": None,
        "topic_missing": None,
        "key_store_error": EXITED,
    }
    assert render_status(document).splitlines()[-2:] == [
        f"ingest: KAFKA UNREACHABLE; KEY STORE FAILING: {EXITED}",
        "NOT READY ingest: kafka is unreachable: the ingest cannot publish",
    ]


async def test_a_failing_key_store_makes_the_ingest_not_ready(tmp_path: Path) -> None:
    keys = SqliteIngestKeyStore(tmp_path / "ingest-keys.sqlite")  # never opened: its recheck fails quietly
    keys.failing = EXITED
    publisher = KafkaPublisher("orders", {})
    publisher._available = True  # as its health check leaves it when the broker answers
    assert _reasons(publisher, {}, keys) == {"ingest": f"the idempotency key store is failing: {EXITED}"}
    await asyncio.sleep(0)  # the recheck it asked for (tests/unit/test_ingest_keys_process.py) ends
    keys.failing = None  # a batch was written again
    assert _reasons(publisher, {}, keys) == {}


def test_the_ingest_line_says_publishing_when_kafka_answers_and_the_key_store_writes() -> None:
    document = {"sinks": {}, "ingest": {"kafka_available": True, "key_store_error": None}}
    assert render_status(document).splitlines()[-1] == "ingest: publishing"


@pytest.mark.parametrize(
    ("open_", "idle", "refusing", "said"),
    [
        (12, 9, 0, "connections 12 of 1024 (3 busy)"),
        (1024, 24, 0, "connections 1024 of 1024 (1000 busy): AT THE LIMIT"),
        (1024, 0, 17, "connections 1024 of 1024 (1024 busy): AT THE LIMIT, 17 being refused"),
    ],
)
def test_the_ingest_line_says_the_listeners_connections_against_their_limit(
    open_: int, idle: int, refusing: int, said: str
) -> None:
    states = {"busy": open_ - idle, "idle": idle, "refusing": refusing}

    @dataclass
    class Gate:  # what the status reads of a `ConnectionGate`
        limit: int = 1024

        def states(self) -> dict[str, int]:
            return states

    gate = cast(ConnectionGate, Gate())
    publisher = KafkaPublisher("orders", {})
    publisher._available = True
    keys = SqliteIngestKeyStore("unused.sqlite")  # its state only; nothing is opened
    document = _status(publisher, keys, {}, CollectorRegistry(), gate=gate)
    expected = {**states, "limit": 1024}
    assert cast(dict[str, Any], document["ingest"])["connections"] == expected
    assert render_status(document).splitlines()[-1] == f"ingest: publishing; {said}"


def test_the_webhooks_certificate_is_in_the_status_document_and_said_louder_as_its_end_nears(tmp_path: Path) -> None:
    tls = ServerTls(*certificate(tmp_path, "webhook", days=30))
    document = _status(None, None, {}, CollectorRegistry(), tls, now=tls.not_after - 20 * 86400)
    assert document["certificate"] == {
        "certfile": str(tls.cert_file),
        "expires": tls.end.expires,
        "seconds_left": 1728000,
        "problem": None,
        "renewal": "renew it, then reload (restart, under systemd credentials)",
    }
    assert render_status(document).splitlines()[-1] == f"certificate: expires at {tls.end.expires} (20 days)"
    expires = tls.end.expires.upper()  # the same digits: a "T" between date and time
    document = _status(None, None, {}, CollectorRegistry(), tls, now=tls.not_after - 3 * 86400)
    assert render_status(document).splitlines()[-1] == (
        f"THE WEBHOOK'S CERTIFICATE EXPIRES IN 3.0 DAYS, AT {expires}; renew it, then reload (restart, under systemd "
        "credentials)"
    )
    document = _status(None, None, {}, CollectorRegistry(), tls, now=tls.not_after + 1)
    assert render_status(document).splitlines()[-1] == (
        f"THE WEBHOOK'S CERTIFICATE EXPIRED AT {expires}: CLIENTS REFUSE IT; renew it, then reload (restart, under "
        "systemd credentials)"
    )
    assert _status(None, None, {}, CollectorRegistry())["certificate"] is None, "plain HTTP: nothing said"


def test_the_kafka_client_certificate_is_in_the_status_document(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path, "kafka-client", days=30)
    env = {"SECURITY_PROTOCOL": "SSL", "SSL_CERTFILE": str(cert), "SSL_KEYFILE": str(key)}
    settings = load_settings(None, env={f"ORDERBUS_KAFKA__{k}": v for k, v in env.items()}).kafka
    renewable = kafka_certificate(settings, client_options(settings))
    assert renewable is not None
    kafka = renewable.end
    cert.unlink()  # read when loaded (or reloaded): the status document does not read the file
    document = _status(None, None, {}, CollectorRegistry(), now=kafka.not_after - 20 * 86400, kafka_certificate=kafka)
    assert document["kafka_certificate"] == {
        "certfile": str(cert),
        "expires": kafka.expires,
        "seconds_left": 1728000,
        "problem": None,
        "renewal": "renew it, then reload orderbus (restart, under systemd credentials)",
    }
    assert render_status(document).splitlines()[-1] == f"kafka client certificate: expires at {kafka.expires} (20 days)"
    document = _status(None, None, {}, CollectorRegistry(), now=kafka.not_after + 1, kafka_certificate=kafka)
    assert render_status(document).splitlines()[-1] == (
        f"THE KAFKA CLIENT CERTIFICATE EXPIRED AT {kafka.expires.upper()}: THE BROKERS REFUSE IT: ORDERBUS CAN "
        "NEITHER PUBLISH NOR DELIVER; renew it, then reload orderbus (restart, under systemd credentials)"
    )
    assert _status(None, None, {}, CollectorRegistry())["kafka_certificate"] is None, "without one: nothing said"
    earlier = cast(dict[str, Any], document["kafka_certificate"])  # an earlier daemon's document: no "renewal"
    document["kafka_certificate"] = {key: value for key, value in earlier.items() if key != "renewal"}
    assert render_status(document).splitlines()[-1].endswith("NEITHER PUBLISH NOR DELIVER; renew it")


def test_a_daemon_without_the_ingest_shows_no_ingest_line() -> None:
    assert "ingest" not in render_status({"sinks": {}, "ingest": None})


@dataclass
class _Config:
    lag_interval: float = 15.0


@dataclass
class SinkView:
    """What readiness reads of a `SinkEngine`, set as a running engine reports it."""

    joined: bool = True
    kafka_silence: float = 0.0
    auth_paused: bool = False
    circuit_state: str = "closed"
    unreadable: dict[tuple[str, int], int] = field(default_factory=dict)
    config: _Config = field(default_factory=_Config)
    membership_problem: str | None = None
    held: bool = False
    refused: str | None = None

    @property
    def kafka_silent(self) -> bool:
        return lost_broker(self.kafka_silence, self.config.lag_interval)


def engines(**views: SinkView) -> dict[str, SinkEngine]:
    return {name: cast(SinkEngine, view) for name, view in views.items()}


def test_a_failing_downstream_leaves_the_instance_ready_and_is_said_as_degraded() -> None:
    # Every instance sees the same CRM: were it a readiness reason, a load balancer would take them all out and
    # the shop's webhooks would fail with the CRM, although the topic keeps its orders until it is back.
    sinks = engines(
        crm=SinkView(circuit_state="open"),
        accounting=SinkView(auth_paused=True, circuit_state="open"),
        shipping=SinkView(unreadable={("orders", 2): 120, ("orders", 7): 5}),
    )
    assert _reasons(None, sinks) == {}
    assert _degraded(sinks) == {
        "sink.crm": "circuit open: the downstream keeps failing",
        "sink.accounting": "paused: the downstream refused our credentials (401/403)",
        "sink.shipping": "held, the next records cannot be read (see the log): orders:2 at 120, orders:7 at 5; to go "
        'on without them, add skip_unreadable = ["orders:2@120", "orders:7@5"] to [sinks.shipping] and reload',
    }


def test_a_sink_paused_by_its_settings_is_degraded_and_said_so_before_anything_else() -> None:
    sinks = engines(crm=SinkView(held=True), shipping=SinkView())
    assert _reasons(None, sinks) == {}, "paused on purpose: still ready"
    assert _degraded(sinks) == {
        "sink.crm": "paused by its settings (sinks.crm.paused): nothing is sent; its orders wait in Kafka"
    }
    # What will still hold it once let go is not hidden by the pause.
    failing = engines(crm=SinkView(held=True, circuit_state="open", unreadable={("orders", 2): 120}))
    assert _degraded(failing)["sink.crm"].split("; also ") == [
        "paused by its settings (sinks.crm.paused): nothing is sent; its orders wait in Kafka",
        "circuit open: the downstream keeps failing",
        "held, the next records cannot be read (see the log): orders:2 at 120; to go on without them, add "
        'skip_unreadable = ["orders:2@120"] to [sinks.crm] and reload',
    ]
    row = {"assigned_partitions": [0, 1], "circuit": "closed", "paused_by_settings": True, "held_for": 30.0}
    document = {"sinks": {"crm": row}, "ingest": None, "degraded": _degraded(sinks)}
    crm = render_status(document).splitlines()[1]
    assert "closed, PAUSED by its settings" in crm, "in its row too, not only under DEGRADED"


def test_status_names_the_static_member_and_its_session() -> None:
    static = {"group_instance_id": "orderbus-0", "session_timeout": 45.0}
    document: dict[str, Any] = {"sinks": {"crm": {"membership": static}, "shipping": {"membership": static}}}
    assert render_status(document).splitlines()[3] == (
        "group instance: orderbus-0 (static membership, session 45 s: a restart within it keeps the partitions)"
    )
    dynamic = {"group_instance_id": None, "session_timeout": 6.0}
    assert "group instance" not in render_status({"sinks": {"crm": {"membership": dynamic}}})


def test_what_the_instance_lacks_makes_it_not_ready() -> None:
    refused = "kafka does not let this daemon's principal use consumer group orderbus.accounting (...)"
    sinks = engines(
        crm=SinkView(joined=False),
        shipping=SinkView(kafka_silence=76.0),
        accounting=SinkView(joined=False, refused=refused),  # not "joining": an ACL missing is said as such
    )
    assert _reasons(None, sinks) == {
        "sink.crm": "joining its consumer group (or kafka unreachable)",
        "sink.shipping": "kafka is unreachable: no answer to the lag measurement for 76 s",
        "sink.accounting": refused,
    }
    assert _degraded(sinks) == {}
    assert _reasons(None, engines(shipping=SinkView(kafka_silence=74.0))) == {}  # five measurements missed: 75 s


def test_a_static_member_says_what_keeps_it_out_of_its_group() -> None:
    contested = "assigned 10 times within 18 s: another consumer of group orderbus.crm runs under ..."
    refused = "not in consumer group orderbus.accounting for 80 s: kafka unreachable, or another instance ..."
    sinks = engines(
        crm=SinkView(membership_problem=contested),
        accounting=SinkView(joined=False, membership_problem=refused),
        shipping=SinkView(joined=False),  # joining, as every member does at first
    )
    assert _reasons(None, sinks) == {
        "sink.crm": contested,
        "sink.accounting": refused,
        "sink.shipping": "joining its consumer group (or kafka unreachable)",
    }


def test_status_shows_degraded_sinks_after_the_not_ready_ones() -> None:
    document = {
        "sinks": {},
        "ingest": None,
        "not_ready": {"sink.crm": "joining its consumer group (or kafka unreachable)"},
        "degraded": {"sink.shipping": "circuit open: the downstream keeps failing"},
    }
    assert render_status(document).splitlines()[-2:] == [
        "NOT READY sink.crm: joining its consumer group (or kafka unreachable)",
        "DEGRADED sink.shipping: circuit open: the downstream keeps failing",
    ]


def test_a_missing_topic_is_said_on_the_ingest_line_not_taken_for_an_unreachable_kafka() -> None:
    missing = "topic orders does not exist: run `orderbus topics apply` with these settings"
    document = {"sinks": {}, "ingest": {"kafka_available": False, "topic_missing": missing, "key_store_error": None}}
    assert render_status(document).splitlines()[-1] == f"ingest: TOPIC NOT FOUND: {missing}"


def test_a_sink_ramping_up_after_an_outage_says_how_many_requests_it_allows() -> None:
    sink = {"assigned_partitions": [0, 1], "circuit": "closed", "in_flight": 9, "outcomes": {"delivered": 40}}
    rows = render_status({"sinks": {"crm": {**sink, "ramp_limit": 9}, "shipping": {**sink, "ramp_limit": None}}})
    crm, shipping = rows.splitlines()[1:3]
    assert "  closed, ramping up: 9 in flight  " in crm
    assert "ramping" not in shipping


def test_a_sink_held_by_its_downstreams_retry_after_says_for_how_long() -> None:
    # A 60 s Retry-After showed as "closed, ramping up: 2 in flight" with nothing in flight (`held_for` unshown).
    sink = {"assigned_partitions": [0], "circuit": "closed", "in_flight": 0, "outcomes": {}, "ramp_limit": 2}
    rows = render_status({"sinks": {"crm": {**sink, "held_for": 42.4}, "shipping": {**sink, "held_for": 0.0}}})
    crm, shipping = rows.splitlines()[1:3]
    assert "  closed, held by Retry-After: 42 s more  " in crm
    assert "  closed, ramping up: 2 in flight  " in shipping


# --- orderbus health ------------------------------------------------------------------------------------------


async def test_health_says_alive_or_ready_and_names_what_is_not_ready() -> None:
    reasons = {"ingest": "kafka unreachable", "sink.crm": "joining its group"}
    app = build_app(
        ingest=None,
        readiness=lambda: dict(reasons),
        degraded=lambda: {"sink.shipping": "circuit open"},
        components=["ingest", "sink.crm", "sink.shipping"],
    )
    async with TestServer(app, host="127.0.0.1") as server:
        base = f"http://127.0.0.1:{server.port}"
        assert await asyncio.to_thread(probe_health, base) == (True, [f"alive: {base}/healthz"])
        assert await asyncio.to_thread(probe_health, base, ready=True) == (
            False,
            [
                f"not ready: {base}/readyz",
                "NOT READY ingest: kafka unreachable",
                "NOT READY sink.crm: joining its group",
                "DEGRADED sink.shipping: circuit open",
            ],
        )
        healthy, lines = await asyncio.to_thread(probe_health, base, component="sink.crm")
        assert (healthy, lines[1:]) == (
            False,
            ["NOT READY sink.crm: joining its group", "DEGRADED sink.shipping: circuit open"],
        )
        reasons.clear()
        assert await asyncio.to_thread(probe_health, base, component="ingest") == (
            True,
            [f"ready: {base}/readyz?component=ingest", "DEGRADED sink.shipping: circuit open"],
        )
        with pytest.raises(StatusError, match=r"no component 'sink\.erp' here; the components are: ingest, sink\.crm"):
            await asyncio.to_thread(probe_health, base, component="sink.erp")


async def test_health_and_status_ask_the_daemon_straight_whatever_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Review (operator): with HTTP_PROXY set for outbound traffic (hosts, images), a live daemon was "not answering"
    # through a proxy that failed, and the container's health check marked it unhealthy.
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: no proxy there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    app = build_app(ingest=None, readiness=dict, status=lambda: {"sinks": {}})
    async with TestServer(app, host="127.0.0.1") as server:
        base = f"http://127.0.0.1:{server.port}"
        assert await asyncio.to_thread(probe_health, base) == (True, [f"alive: {base}/healthz"])
        assert await asyncio.to_thread(fetch_status, base) == {"sinks": {}}


async def test_health_refuses_an_answer_that_is_not_orderbuss() -> None:
    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<html>it works</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/healthz", page)
    async with TestServer(app, host="127.0.0.1") as server:
        base = f"http://127.0.0.1:{server.port}"
        with pytest.raises(StatusError, match=r"/healthz answered HTTP 200 OK without a health document"):
            await asyncio.to_thread(probe_health, base)
        with pytest.raises(StatusError, match=r"/readyz answered HTTP 404 Not Found without a health document"):
            await asyncio.to_thread(probe_health, base, ready=True)


def test_records_deleted_before_a_sink_read_them_have_a_line_of_their_own() -> None:
    sinks = {"crm": {"expired_records": 8}, "accounting": {"expired_records": 0}, "shipping": {}}
    lines = render_status({"sinks": sinks}).splitlines()
    assert [line for line in lines if "DELETED" in line] == [
        "crm: 8 RECORDS DELETED FROM KAFKA BEFORE THIS SINK READ THEM since the start: their orders did not reach it "
        "(the log names the partitions and offsets)"
    ]
