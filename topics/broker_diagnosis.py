"""Why Kafka cannot be reached, in the operator's terms and naming the setting to fix.

aiokafka's clients fail a bootstrap with one message for every cause, ``Unable to bootstrap from [...]``: a
password the broker refused, a broker certificate nobody trusts, a client certificate the broker asked for and did
not get, a TLS listener spoken to in plain text, a broker that is down. The cause is logged by aiokafka's own
logger, when at all, and not chained to what the caller gets. So after a failure, `diagnose` connects once more to
each bootstrap server the way the clients do (``aiokafka.conn.create_conn``: TLS, ApiVersions, the SASL exchange,
then a metadata request for no topic) and reads what that connection meets. It is asked only after a failure, at
most at the pace of the callers' retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Mapping
from typing import Any, Final

from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

__all__ = ["diagnose", "unreachable"]

_TLS_RECORDS: Final = (0x1503, 0x1603)  # a TLS alert or handshake record's first two bytes, read as a Kafka length
_HOSTNAME_MISMATCH: Final = 62  # X509_V_ERR_HOSTNAME_MISMATCH


async def diagnose(options: Mapping[str, Any], *, timeout: float = 10.0) -> str | None:
    """What a connection to each bootstrap server meets, as one sentence (the first server's, named when there are
    several); None when one of them answers, so the failure lies past the bootstrap (a broker it names, a timeout)."""
    servers = [server.strip() for server in str(options.get("bootstrap_servers", "")).split(",") if server.strip()]
    said = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            problem = await _connect(host, int(port), options, timeout)
        except Exception as exc:  # a bug here must not hide the failure being diagnosed
            problem = repr(exc)
        if problem is None:
            return None
        said.append(f"{server}: {problem}" if len(servers) > 1 else problem)
    return said[0] if said else None


async def unreachable(doing: str, options: Mapping[str, Any], exc: KafkaError) -> str:
    """``cannot <doing> at <servers>: <why>``: `exc`'s cause as `diagnose` finds it when the bootstrap failed (every
    client says "Unable to bootstrap" alike), else `exc` itself."""
    why = await diagnose(options) if isinstance(exc, KafkaConnectionError) else None
    return f"cannot {doing} at {options.get('bootstrap_servers')}: {why or repr(exc)}"


async def _connect(host: str, port: int, options: Mapping[str, Any], timeout: float) -> str | None:
    protocol = str(options.get("security_protocol", "PLAINTEXT"))
    mechanism = options.get("sasl_mechanism")
    conn = None
    try:
        conn = await asyncio.wait_for(
            create_conn(
                host,
                port,
                client_id=options.get("client_id", "orderbus"),
                request_timeout_ms=int(timeout * 1000),
                ssl_context=options.get("ssl_context"),
                security_protocol=protocol,
                sasl_mechanism=mechanism,
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password"),
            ),
            timeout,
        )
        await asyncio.wait_for(conn.send(MetadataRequest([])), timeout)
    except (OSError, KafkaError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return _explain(exc, protocol, mechanism, host)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
    return None


def _explain(exc: BaseException, protocol: str, mechanism: object, host: str) -> str:
    """`exc` (or what it was raised from) in the operator's terms, naming the setting to fix."""
    causes = _chain(exc)
    for cause in causes:
        if isinstance(cause, SaslAuthenticationFailed | AuthenticationFailedError):
            return (
                f"the broker refused the SASL credentials ({mechanism}): check kafka.sasl_username and "
                f"kafka.sasl_password (the broker said: {_first_line(cause)})"
            )
        if isinstance(cause, IllegalSaslStateError):
            plain = protocol.removeprefix("SASL_")
            return f"this listener takes no SASL, and kafka.security_protocol is {protocol}: use {plain}"
        if isinstance(cause, UnsupportedSaslMechanismError):
            return f"the broker does not offer SASL {mechanism}: set kafka.sasl_mechanism to one it does ({cause})"
        if isinstance(cause, ssl.SSLCertVerificationError):
            if cause.verify_code == _HOSTNAME_MISMATCH:
                return (
                    f"the broker's certificate does not name {host}: list the brokers in kafka.bootstrap_servers by "
                    "a name their certificates hold"
                )
            return (
                f"the broker's certificate is not trusted ({cause.verify_message}): set kafka.ssl_cafile to the CA "
                "that signed it"
            )
        if isinstance(cause, ssl.SSLError) and _refused_client_certificate(cause):
            return (
                f"the broker wants a client certificate it trusts ({cause.reason}): set kafka.ssl_certfile and "
                "kafka.ssl_keyfile to a pair its CA signed, still valid"
            )
        if isinstance(cause, asyncio.IncompleteReadError) and _tls_record(cause):
            return f"this listener speaks TLS, and kafka.security_protocol is {protocol}: use SSL or SASL_SSL"
        if isinstance(cause, ssl.SSLError) and protocol in ("SSL", "SASL_SSL"):
            return (
                f"the TLS handshake failed ({cause.reason or cause}): is this a TLS listener? "
                f"kafka.security_protocol is {protocol}"
            )
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused: no broker listens there (kafka.bootstrap_servers), or it is down"
        if isinstance(cause, socket.gaierror):
            return f"the host name does not resolve ({cause.strerror}): kafka.bootstrap_servers"
        if isinstance(cause, TimeoutError):
            return "no answer in time: a firewall, or a broker that is not Kafka or is overloaded"
    if protocol in ("SSL", "SASL_SSL") and any(isinstance(c, ConnectionResetError | ssl.SSLEOFError) for c in causes):
        return f"the connection was reset during the TLS handshake: is this a TLS listener? ({protocol})"
    if protocol in ("PLAINTEXT", "SSL"):
        # Connected (and through TLS), then closed at the first request other than ApiVersions: a SASL listener.
        return (
            f"the broker closed the connection ({_first_line(exc)}): if its listener asks for SASL, "
            f"kafka.security_protocol must be SASL_{'SSL' if protocol == 'SSL' else 'PLAINTEXT'} (it is {protocol})"
        )
    return _first_line(exc)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _tls_record(short: asyncio.IncompleteReadError) -> bool:
    """A TLS listener's answer to plain Kafka: its record header (``15 03 03 00``, an alert) taken for a frame's
    length, and the stream ending long before that many bytes."""
    return short.expected is not None and short.expected >> 16 in _TLS_RECORDS


def _refused_client_certificate(error: ssl.SSLError) -> bool:
    """An alert the broker sends when a client certificate is missing, unknown or refused."""
    reason = error.reason or ""
    return any(
        alert in reason for alert in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
