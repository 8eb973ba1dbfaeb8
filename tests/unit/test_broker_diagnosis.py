"""`topics.broker_diagnosis`: what each failure a Kafka connection meets is called, and which setting it names.

The real broker's side (every cause met for real) is tests/integration/test_kafka_security.py; here the branches
that a test broker cannot show: an expired or revoked client certificate, an expired broker certificate, several
bootstrap servers."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed
from support import free_port

from topics.broker_diagnosis import diagnose, explain


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    error.verify_code, error.verify_message = code, message
    return error


def tls_alert(reason: str) -> KafkaConnectionError:
    """What a broker's TLS alert becomes: the connection's close, raised from the SSLError of its read."""
    alert = ssl.SSLError(1, f"[SSL: {reason}] ssl/tls alert")
    alert.reason = reason
    closed = KafkaConnectionError("Connection at 127.0.0.1:9093 closed")
    closed.__cause__ = alert
    return closed


@pytest.mark.parametrize(
    ("exc", "protocol", "said"),
    [
        (
            SaslAuthenticationFailed("Authentication failed: Invalid username or password"),
            "SASL_SSL",
            "the broker refused the SASL credentials (PLAIN): check kafka.sasl_username and kafka.sasl_password (the "
            "broker said: [Error 58] SaslAuthenticationFailed: Authentication failed: Invalid username or password)",
        ),
        (
            verify_error(20, "unable to get local issuer certificate"),
            "SSL",
            "the broker's certificate is not trusted (unable to get local issuer certificate): set kafka.ssl_cafile",
        ),
        (
            verify_error(10, "certificate has expired"),
            "SSL",
            "the broker's certificate is refused (certificate has expired): the cluster's certificate needs mending",
        ),
        (verify_error(62, "Hostname mismatch"), "SSL", "the broker's certificate does not name kafka-1.example.net"),
        (
            tls_alert("SSLV3_ALERT_CERTIFICATE_EXPIRED"),
            "SSL",
            "the broker says our client certificate has expired (SSLV3_ALERT_CERTIFICATE_EXPIRED): renew "
            "kafka.ssl_certfile",
        ),
        (tls_alert("SSLV3_ALERT_CERTIFICATE_REVOKED"), "SSL", "the broker says our client certificate was revoked"),
        (tls_alert("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "SSL", "the broker wants a client certificate it trusts"),
        (
            asyncio.IncompleteReadError(b"\x02\x28\x00", 0x15030300),
            "PLAINTEXT",
            "this listener speaks TLS, and kafka.security_protocol is PLAINTEXT: use SSL or SASL_SSL",
        ),
        (
            KafkaConnectionError("Connection at 127.0.0.1:9092 closed"),
            "PLAINTEXT",
            "not a Kafka listener, or one that asks for SASL (then kafka.security_protocol must be SASL_PLAINTEXT",
        ),
        (ConnectionRefusedError(111, "Connection refused"), "PLAINTEXT", "connection refused: no broker listens"),
        (TimeoutError(), "SASL_SSL", "no answer in time"),
    ],
)
def test_each_failure_is_called_by_its_cause_and_names_the_setting(
    exc: BaseException, protocol: str, said: str
) -> None:
    assert said in explain(exc, protocol=protocol, mechanism="PLAIN", host="kafka-1.example.net")


async def test_several_servers_with_one_cause_are_named_together_ipv6_in_brackets() -> None:
    port = free_port()  # nothing listens there
    servers = f"[::1]:{port}, 127.0.0.1:{port}"
    assert await diagnose({"bootstrap_servers": servers}) == (
        f"[::1]:{port}, 127.0.0.1:{port}: connection refused: no broker listens there (kafka.bootstrap_servers), "
        "or it is down"
    )
    assert await diagnose({"bootstrap_servers": f"[::1]:{port}"}) == (
        "connection refused: no broker listens there (kafka.bootstrap_servers), or it is down"
    ), "one server: not named again"
