"""orderbus against a real broker that asks who it is: TLS with a client certificate (``ssl.client.auth=required``,
as Aiven, MSK or Strimzi with TLS authentication) and SASL over TLS with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512
(as Confluent Cloud, MSK or a self-run cluster). Every Kafka client orderbus builds takes `client_options`; here
the whole daemon runs through each listener, and a webhook's order reaches the CRM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from support import certificate, running_daemon, sandbox_sinks, settings_env, until

from daemon import kafka_local
from daemon.kafka_options import client_options, topic_layout
from daemon.key_pairs import certificate_validity, text_time
from daemon.lifecycle import serve
from daemon.publisher import PROBE_MAX
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.settings import TopicSettings, load_settings
from daemon.status import fetch_status, render_status
from topics.admin import apply_catalogue
from topics.broker_diagnosis import diagnose
from topics.catalogue import catalogue
from topics.errors import BrokerError
from topics.samples import sample_submission

pytestmark = pytest.mark.integration

SCRAM_PASSWORD = "scram-secret-for-tests"  # the test broker's own user
PLAIN_PASSWORD = "plain-secret-for-tests"


@dataclass(frozen=True)
class SecureBroker:
    ssl_bootstrap: str  # TLS; the client shows a certificate the broker's CA signed
    sasl_bootstrap: str  # SASL_SSL: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    plain_bootstrap: str  # PLAINTEXT, no SASL
    ca: Path
    client: tuple[Path, Path]


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    pki = tmp_path_factory.mktemp("kafka-pki")
    ca = certificate(pki, "ca")
    broker_cert, broker_key = certificate(pki, "broker", issuer=ca)
    keystore = pki / "broker.pem"  # Kafka's PEM key store: the key, then the certificate
    keystore.write_text(broker_key.read_text() + broker_cert.read_text())
    broker_port, controller_port, ssl_port, sasl_port = kafka_local.free_ports(4)
    jaas = "org.apache.kafka.common.security"
    listeners = f"SSL://127.0.0.1:{ssl_port},SASL_SSL://127.0.0.1:{sasl_port}"
    data_dir = tmp_path_factory.mktemp("kafka-secure")
    # The template's PLAINTEXT listener and controller stay, beside the two asking who we are.
    extra = {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(ca[0]),
        "listener.name.ssl.ssl.client.auth": "required",
        "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
        "listener.name.sasl_ssl.plain.sasl.jaas.config": (
            f'{jaas}.plain.PlainLoginModule required user_orderbus="{PLAIN_PASSWORD}";'
        ),
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": f"{jaas}.scram.ScramLoginModule required;",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": f"{jaas}.scram.ScramLoginModule required;",
    }
    extra |= {
        "listeners": f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port},{listeners}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker_port},{listeners}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL",
    }
    try:
        kafka_local.start(
            data_dir,
            port=broker_port,
            controller_port=controller_port,
            heap="256m",
            extra_properties=extra,
            scram_users={"orderbus": SCRAM_PASSWORD},
        )
        client = certificate(pki, "client", issuer=ca)
        yield SecureBroker(f"127.0.0.1:{ssl_port}", f"127.0.0.1:{sasl_port}", f"127.0.0.1:{broker_port}", ca[0], client)
    finally:
        kafka_local.stop(data_dir, grace=20.0)


def security_env(broker: SecureBroker, mode: str) -> dict[str, str]:
    """The ``ORDERBUS_KAFKA__*`` variables of one way in."""
    if mode == "ssl-client-certificate":
        return {
            "ORDERBUS_KAFKA__BOOTSTRAP_SERVERS": broker.ssl_bootstrap,
            "ORDERBUS_KAFKA__SECURITY_PROTOCOL": "SSL",
            "ORDERBUS_KAFKA__SSL_CAFILE": str(broker.ca),
            "ORDERBUS_KAFKA__SSL_CERTFILE": str(broker.client[0]),
            "ORDERBUS_KAFKA__SSL_KEYFILE": str(broker.client[1]),
        }
    mechanism = mode.removeprefix("sasl-").upper()
    return {
        "ORDERBUS_KAFKA__BOOTSTRAP_SERVERS": broker.sasl_bootstrap,
        "ORDERBUS_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "ORDERBUS_KAFKA__SSL_CAFILE": str(broker.ca),
        "ORDERBUS_KAFKA__SASL_MECHANISM": mechanism,
        "ORDERBUS_KAFKA__SASL_USERNAME": "orderbus",
        "ORDERBUS_KAFKA__SASL_PASSWORD": PLAIN_PASSWORD if mechanism == "PLAIN" else SCRAM_PASSWORD,
    }


@pytest.mark.parametrize("mode", ["ssl-client-certificate", "sasl-plain", "sasl-scram-sha-256", "sasl-scram-sha-512"])
async def test_a_webhooks_order_reaches_the_crm_through_a_broker_that_asks_who_we_are(
    secure_broker: SecureBroker,
    sandbox_process: SandboxProcess,
    sandbox: SandboxClient,
    tmp_path: Path,
    mode: str,
) -> None:
    prefix = f"sec-{uuid.uuid4().hex[:8]}."
    crm = {"crm": sandbox_sinks(sandbox_process)["crm"]}
    env = settings_env(secure_broker.ssl_bootstrap, prefix, tmp_path / "state", partitions=3, sinks=crm)
    settings = load_settings(None, env={**env, **security_env(secure_broker, mode)})
    submission = sample_submission(random.Random(7), order_number=f"SEC-{uuid.uuid4().hex[:10]}")
    registry = CollectorRegistry()
    async with running_daemon(settings, registry) as base, aiohttp.ClientSession() as session:
        headers = {"Content-Type": "application/json", "Idempotency-Key": f"sec-{mode}"}
        async with session.post(f"{base}/v1/orders", data=submission.model_dump_json(), headers=headers) as answer:
            assert answer.status == 202, await answer.text()
            published = json.loads(await answer.text())
        assert published["topic"] == f"{prefix}orders"
        [effect] = await sandbox.wait_ledger("crm", 1, timeout=30)
        assert effect["order_number"] == submission.order.order_number
        document = await asyncio.to_thread(fetch_status, base)
    expiry = registry.get_sample_value("orderbus_kafka_client_certificate_expiry_timestamp_seconds")
    if mode == "ssl-client-certificate":  # for the alerts weeks ahead: once it has expired, no broker takes orderbus
        end = certificate_validity(secure_broker.client[0].read_text())[2]
        assert expiry == end
        assert document["kafka_certificate"]["expires"] == text_time(end), "and orderbus status says it"
    else:
        assert (expiry, document["kafka_certificate"]) == (None, None)


# What each wrong setting meets, as `diagnose` says it: aiokafka says "Unable to bootstrap" for all of them.
WRONG = {
    "a wrong password": (
        "sasl-scram-sha-512",
        {"ORDERBUS_KAFKA__SASL_PASSWORD": "not-the-password"},
        "the broker refused the SASL credentials (SCRAM-SHA-512): check kafka.sasl_username and kafka.sasl_password",
    ),
    "an unknown user": (
        "sasl-plain",
        {"ORDERBUS_KAFKA__SASL_USERNAME": "nobody"},
        "the broker refused the SASL credentials (PLAIN)",
    ),
    "no CA for a private one": (
        "sasl-plain",
        {"ORDERBUS_KAFKA__SSL_CAFILE": ""},
        "the broker's certificate is not trusted (unable to get local issuer certificate): set kafka.ssl_cafile",
    ),
    "no client certificate": (
        "ssl-client-certificate",
        {"ORDERBUS_KAFKA__SSL_CERTFILE": "", "ORDERBUS_KAFKA__SSL_KEYFILE": ""},
        "the broker wants a client certificate it trusts",
    ),
    "a name the certificate lacks": (
        "ssl-client-certificate",
        {"ORDERBUS_KAFKA__BOOTSTRAP_SERVERS": "localhost:{ssl_port}"},
        "the broker's certificate does not name localhost",
    ),
    "plain text to TLS": (
        "sasl-plain",
        {"ORDERBUS_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT", "ORDERBUS_KAFKA__SSL_CAFILE": ""},
        "this listener speaks TLS, and kafka.security_protocol is SASL_PLAINTEXT: use SSL or SASL_SSL",
    ),
    "TLS to plain text": (
        "sasl-plain",
        {"ORDERBUS_KAFKA__BOOTSTRAP_SERVERS": "{plain}"},
        "the connection was reset during the TLS handshake: is this a TLS listener? (SASL_SSL)",
    ),
    "no SASL where it is asked": (
        "ssl-client-certificate",
        {"ORDERBUS_KAFKA__BOOTSTRAP_SERVERS": "{sasl}"},
        "not a Kafka listener, or one that asks for SASL (then kafka.security_protocol must be SASL_SSL, not SSL)",
    ),
    "SASL where none is taken": (
        "sasl-plain",
        {
            "ORDERBUS_KAFKA__BOOTSTRAP_SERVERS": "{plain}",
            "ORDERBUS_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "ORDERBUS_KAFKA__SSL_CAFILE": "",
        },
        "this listener takes no SASL, and kafka.security_protocol is SASL_PLAINTEXT: use PLAINTEXT",
    ),
}


@pytest.mark.parametrize("case", list(WRONG))
async def test_a_wrong_setting_is_named_where_aiokafka_says_only_unable_to_bootstrap(
    secure_broker: SecureBroker, case: str
) -> None:
    mode, changes, said = WRONG[case]
    ports = {
        "ssl_port": secure_broker.ssl_bootstrap.rpartition(":")[2],
        "plain": secure_broker.plain_bootstrap,
        "sasl": secure_broker.sasl_bootstrap,
    }
    env = {**security_env(secure_broker, mode), **{name: value.format(**ports) for name, value in changes.items()}}
    options = client_options(load_settings(None, env={name: value for name, value in env.items() if value}).kafka)
    found = await diagnose(options, timeout=10)
    assert found is not None
    assert said in found
    with pytest.raises(BrokerError) as caught:
        await apply_catalogue(list(catalogue(topic_layout(TopicSettings(prefix="never.")))), options, timeout=10)
    assert str(caught.value) == f"cannot apply topics at {options['bootstrap_servers']}: {found}"


async def test_the_right_settings_leave_nothing_to_diagnose(secure_broker: SecureBroker) -> None:
    for mode in ("ssl-client-certificate", "sasl-plain", "sasl-scram-sha-256", "sasl-scram-sha-512"):
        assert await diagnose(client_options(load_settings(None, env=security_env(secure_broker, mode)).kafka)) is None


def open_sockets() -> int:
    """How many sockets this process holds (its descriptors' links name them ``socket:[inode]``)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, gone once listed
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(link.startswith("socket:") for link in links)


async def test_a_diagnosis_has_closed_its_connections_when_it_answers(secure_broker: SecureBroker) -> None:
    # A TLS connection closes after the broker's close_notify, later than `close()`: one left closing when the
    # diagnosis returned was dropped with its event loop, its socket open (a ResourceWarning in a later test).
    wrong = {"ORDERBUS_KAFKA__SASL_PASSWORD": "not-the-password"}
    for mode, changes in [(mode, {}) for mode in ("ssl-client-certificate", "sasl-plain")] + [("sasl-plain", wrong)]:
        options = client_options(load_settings(None, env={**security_env(secure_broker, mode), **changes}).kafka)
        before = open_sockets()
        found = await diagnose(options)
        assert (found is None) == (not changes)
        assert open_sockets() == before, (mode, changes)


async def test_an_ingest_with_a_wrong_password_says_so_in_its_log_and_status_not_on_readyz(
    secure_broker: SecureBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = settings_env(secure_broker.sasl_bootstrap, "never.", tmp_path / "state")
    wrong = {**security_env(secure_broker, "sasl-scram-sha-512"), "ORDERBUS_KAFKA__SASL_PASSWORD": "not-the-password"}
    settings = load_settings(None, env={**env, **wrong})
    cause = "the broker refused the SASL credentials (SCRAM-SHA-512): check kafka.sasl_username and kafka.sasl_password"
    with caplog.at_level(logging.WARNING, "daemon"):
        async with running_daemon(settings, apply=False) as base, aiohttp.ClientSession() as session:
            async with session.get(f"{base}/readyz") as answer:
                # On the webhook's listener too: the cause, which names the brokers and their security, is not.
                assert (answer.status, await answer.json()) == (
                    503,
                    {
                        "status": "not ready",
                        "reasons": {"ingest": "kafka is unreachable: the ingest cannot publish"},
                        "degraded": {},
                    },
                )
            document = await asyncio.to_thread(fetch_status, base)
    ingest_line = render_status(document).splitlines()[-2]
    assert ingest_line.startswith(f"ingest: KAFKA UNREACHABLE: cannot list topics at {secure_broker.sasl_bootstrap}: ")
    assert cause in ingest_line
    said = [record.getMessage() for record in caplog.records if record.name.startswith("daemon")]
    assert any(line.startswith("kafka unreachable at start, ingest answers 503") and cause in line for line in said)
    assert "not-the-password" not in json.dumps(document) + "".join(said)


def test_config_check_connect_reaches_kafka_as_run_would(secure_broker: SecureBroker, tmp_path: Path) -> None:
    prefix = f"chk-{uuid.uuid4().hex[:8]}."
    base = {
        **security_env(secure_broker, "sasl-scram-sha-512"),
        "ORDERBUS_TOPICS__PREFIX": prefix,
        "ORDERBUS_INGEST__ALLOW_UNSIGNED": "true",
        "ORDERBUS_STATE_DIR": str(tmp_path / "state"),
        "ORDERBUS_CONFIG": "",
    }

    def check(**changes: str) -> tuple[int, str]:
        env = {**os.environ, **base, **changes}
        done = subprocess.run(
            [sys.executable, "-m", "daemon", "config", "check", "--connect"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return done.returncode, done.stderr.strip().splitlines()[-1]

    code, said = check(ORDERBUS_KAFKA__SASL_PASSWORD="not-the-password")
    assert code == 1
    assert said.startswith(f"kafka: cannot list topics at {secure_broker.sasl_bootstrap}: the broker refused the SASL")
    assert check() == (
        1,
        f"kafka: topic {prefix}orders does not exist: run `orderbus topics apply` with these settings",
    )
    settings = load_settings(None, env={name: value for name, value in base.items() if name != "ORDERBUS_CONFIG"})
    asyncio.run(apply_catalogue(list(catalogue(topic_layout(settings.topics))), client_options(settings.kafka)))
    reached = f"kafka: reached at {secure_broker.sasl_bootstrap}; every topic run needs is there"
    assert check() == (0, reached)


async def test_a_renewed_client_certificate_is_taken_at_a_reload_without_a_restart(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    # The pair at kafka.ssl_certfile was signed by a CA the broker does not trust (an expired or wrong one, as a
    # renewal mends): the ingest cannot publish. The renewal writes a pair the broker trusts in its place, and
    # `systemctl reload` (SIGHUP) is all it takes.
    pki = tmp_path / "pki"
    pki.mkdir()
    stranger = certificate(pki, "stranger-ca")
    cert, key = pki / "client.crt", pki / "client.key"
    refused = certificate(pki, "refused", issuer=stranger)
    shutil.copy(refused[0], cert)
    shutil.copy(refused[1], key)
    env = settings_env(secure_broker.ssl_bootstrap, f"renew-{uuid.uuid4().hex[:8]}.", tmp_path / "state")
    env |= {
        **security_env(secure_broker, "ssl-client-certificate"),
        "ORDERBUS_KAFKA__SSL_CERTFILE": str(cert),
        "ORDERBUS_KAFKA__SSL_KEYFILE": str(key),
    }
    settings = load_settings(None, env=env)
    await apply_catalogue(
        list(catalogue(topic_layout(settings.topics))),
        client_options(load_settings(None, env=security_env(secure_broker, "ssl-client-certificate")).kafka),
    )
    stop, reload = asyncio.Event(), asyncio.Event()
    registry = CollectorRegistry()
    serving = serve(settings, stop, registry=registry, reload=reload, load=lambda: settings)
    daemon = asyncio.create_task(serving)
    base = f"http://127.0.0.1:{settings.ingest.port}"

    async def answers(path: str) -> int | None:
        try:
            async with aiohttp.ClientSession() as session, session.get(f"{base}{path}") as answer:
                return answer.status
        except aiohttp.ClientConnectionError:
            return None

    async def listening() -> bool:
        assert not daemon.done(), daemon
        return await answers("/healthz") == 200

    async def ready() -> bool:
        return await answers("/readyz") == 200

    try:
        await until(listening)
        await asyncio.sleep(2 * PROBE_MAX)  # a few of the ingest's reconnect probes: each refused
        assert not await ready()
        shutil.copy(secure_broker.client[0], cert)  # renewed in place
        shutil.copy(secure_broker.client[1], key)
        reload.set()
        await until(ready, timeout=30)
        renewed_end = certificate_validity(secure_broker.client[0].read_text())[2]
        gauge = "orderbus_kafka_client_certificate_expiry_timestamp_seconds"
        assert registry.get_sample_value(gauge) == renewed_end
        status = await asyncio.to_thread(fetch_status, base)
        assert status["kafka_certificate"]["expires"] == text_time(renewed_end)
        order = sample_submission(random.Random(7))
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{base}/v1/orders", json=order.model_dump(mode="json")) as answer,
        ):
            assert answer.status == 202, await answer.text()
    finally:
        stop.set()
        await asyncio.wait_for(daemon, 60)
    daemon.result()
