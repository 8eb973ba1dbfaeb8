"""orderbus against a real broker that asks who it is: TLS with a client certificate (``ssl.client.auth=required``,
as Aiven, MSK or Strimzi with TLS authentication) and SASL over TLS with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512
(as Confluent Cloud, MSK or a self-run cluster). Every Kafka client orderbus builds takes `client_options`; here
the whole daemon runs through each listener, and a webhook's order reaches the CRM."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from support import certificate, running_daemon, sandbox_sinks, settings_env

from daemon import kafka_local
from daemon.sandbox import SandboxClient, SandboxProcess
from daemon.settings import load_settings
from topics.samples import sample_submission

SCRAM_PASSWORD = "scram-secret-for-tests"  # the test broker's own user
PLAIN_PASSWORD = "plain-secret-for-tests"


@dataclass(frozen=True)
class SecureBroker:
    ssl_bootstrap: str  # TLS; the client shows a certificate the broker's CA signed
    sasl_bootstrap: str  # SASL_SSL: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    ca: Path
    client: tuple[Path, Path]


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    pki = tmp_path_factory.mktemp("kafka-pki")
    ca = certificate(pki, "ca")
    broker_cert, broker_key = certificate(pki, "broker", issuer=ca)
    keystore = pki / "broker.pem"  # Kafka's PEM key store: the key, then the certificate
    keystore.write_text(broker_key.read_text() + broker_cert.read_text())
    ssl_port, sasl_port = kafka_local.free_ports(2)
    jaas = "org.apache.kafka.common.security"
    listeners = f"SSL://127.0.0.1:{ssl_port},SASL_SSL://127.0.0.1:{sasl_port}"
    data_dir = tmp_path_factory.mktemp("kafka-secure")
    # The template's PLAINTEXT listener and controller stay; their ports are the broker's own, read after the start.
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
    ports = kafka_local.free_ports(2)
    extra |= {
        "listeners": f"PLAINTEXT://127.0.0.1:{ports[0]},CONTROLLER://127.0.0.1:{ports[1]},{listeners}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{ports[0]},{listeners}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL",
    }
    try:
        kafka_local.start(
            data_dir,
            port=ports[0],
            controller_port=ports[1],
            heap="256m",
            extra_properties=extra,
            scram_users={"orderbus": SCRAM_PASSWORD},
        )
        yield SecureBroker(
            f"127.0.0.1:{ssl_port}", f"127.0.0.1:{sasl_port}", ca[0], certificate(pki, "client", issuer=ca)
        )
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
    async with running_daemon(settings) as base, aiohttp.ClientSession() as session:
        headers = {"Content-Type": "application/json", "Idempotency-Key": f"sec-{mode}"}
        async with session.post(f"{base}/v1/orders", data=submission.model_dump_json(), headers=headers) as answer:
            assert answer.status == 202, await answer.text()
            published = json.loads(await answer.text())
        assert published["topic"] == f"{prefix}orders"
        [effect] = await sandbox.wait_ledger("crm", 1, timeout=30)
        assert effect["order_number"] == submission.order.order_number
