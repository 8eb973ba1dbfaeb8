"""Why Kafka cannot be reached, in the operator's terms and naming the setting to fix.

aiokafka's clients fail a bootstrap with one message for every cause, ``Unable to bootstrap from [...]``: a
password the broker refused, a broker certificate nobody trusts, a client certificate the broker asked for and did
not get, a TLS listener spoken to in plain text, a broker that is down. The cause is logged by aiokafka's own
logger, when at all, and not chained to what the caller gets. So after a failure, `diagnose` connects once more to
each bootstrap server the way the clients do (``aiokafka.conn.create_conn``: TLS, ApiVersions, the SASL exchange,
then a metadata request for no topic) and reads what that connection meets. It is asked only after a failure, by
`topics.admin` (`topics apply`, `config check --connect`: at once) and by the daemon, through one
`daemon.kafka_watch.Diagnosis` for its start's topic check, the ingest's reconnect probe and the sinks' watch: at
most once a minute, as with SASL each asking is a login.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from aiokafka.conn import AIOKafkaConnection, collect_hosts, create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

__all__ = ["DIAGNOSIS_TIMEOUT", "Diagnose", "diagnose", "explain", "unreachable"]

_TLS_RECORDS: Final = (0x1503, 0x1603)  # a TLS alert or handshake record's first two bytes, read as a Kafka length
_HOSTNAME_MISMATCH: Final = 62  # X509_V_ERR_HOSTNAME_MISMATCH
# X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT, _SELF_SIGNED_CERT_IN_CHAIN, _UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
# _UNABLE_TO_VERIFY_LEAF_SIGNATURE: a CA we were not given (an expired one, 10, is the cluster's to renew).
_UNKNOWN_ISSUER: Final = frozenset({18, 19, 20, 21})
# TLS alerts a broker sends for a client certificate missing, not signed by its CA, or refused otherwise.
_CLIENT_CERTIFICATE_ALERTS: Final = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")
# Seconds a diagnosis may take for each server (asked at once): it runs after a failure, before the failure is said.
DIAGNOSIS_TIMEOUT: Final = 5.0
# Seconds a diagnosis waits at most for its connections' sockets to close (a TLS close waits for the broker's answer).
CLOSE_WAIT: Final = 2.0


# Why a Kafka client's bootstrap failed, asked after the failure (`diagnose` with its options bound, or a daemon's
# `daemon.kafka_watch.Diagnosis`, which asks it at most once a minute).
Diagnose = Callable[[], Awaitable[str | None]]


async def diagnose(options: Mapping[str, Any], *, timeout: float = DIAGNOSIS_TIMEOUT) -> str | None:
    """What a connection to each bootstrap server meets, as one sentence per distinct cause (servers named when
    there are several); None when one of them answers, so the failure lies past the bootstrap (a broker it names, a
    timeout). The servers are asked at once, each within `timeout` (`DIAGNOSIS_TIMEOUT` at most) in all, and
    `CLOSE_WAIT` more at most for the connections' sockets to close."""
    timeout = min(timeout, DIAGNOSIS_TIMEOUT)
    servers = collect_hosts(str(options.get("bootstrap_servers", "")), randomize=False)
    problems = await asyncio.gather(*(_problem(host, port, options, timeout) for host, port, _ in servers))
    if not problems or any(problem is None for problem in problems):
        return None
    if len(servers) == 1:
        return problems[0]
    causes: dict[str | None, list[str]] = {}
    for (host, port, _), problem in zip(servers, problems, strict=True):
        causes.setdefault(problem, []).append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return "; ".join(f"{', '.join(where)}: {problem}" for problem, where in causes.items())


async def cause(exc: BaseException, diagnosis: Diagnose | None) -> str:
    """Why a client's call failed: for a failed connection (every client says "Unable to bootstrap" alike), what
    `diagnosis` finds, if one is given and finds something; else `exc` itself."""
    why = await diagnosis() if diagnosis is not None and isinstance(exc, KafkaConnectionError) else None
    return why or repr(exc)


async def unreachable(
    doing: str, options: Mapping[str, Any], exc: KafkaError, diagnosis: Diagnose | None = None
) -> str:
    """``cannot <doing> at <servers>: <why>``, `exc`'s `cause`: `diagnosis` (a daemon's, which asks at most once a
    minute), else `diagnose` asked at once."""
    ask = diagnosis if diagnosis is not None else functools.partial(diagnose, options)
    return f"cannot {doing} at {options.get('bootstrap_servers')}: {await cause(exc, ask)}"


async def _problem(host: str, port: int, options: Mapping[str, Any], timeout: float) -> str | None:
    """What one connection to `host`:`port` meets, None if it gets a metadata answer; never raises."""
    protocol = str(options.get("security_protocol", "PLAINTEXT"))
    mechanism = options.get("sasl_mechanism")
    conn = None
    made: list[AIOKafkaConnection] = []  # told by the connection as it closes: it had a socket
    try:
        async with asyncio.timeout(timeout):  # the connection, TLS, the SASL exchange and the request together
            conn = await create_conn(
                host,
                port,
                on_close=lambda closing, _reason: made.append(closing),
                client_id=options.get("client_id", "orderbus"),
                request_timeout_ms=int(timeout * 1000),
                ssl_context=options.get("ssl_context"),
                security_protocol=protocol,
                sasl_mechanism=mechanism,
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password"),
            )
            await conn.send(MetadataRequest([]))
    except (OSError, KafkaError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return explain(exc, protocol=protocol, mechanism=mechanism, host=host)
    except Exception as exc:  # a bug here must not hide the failure being diagnosed
        return repr(exc)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        await _closed(made)
    return None


async def _closed(connections: list[AIOKafkaConnection]) -> None:
    """Wait until `connections`, closed, have let their sockets go (`CLOSE_WAIT` at most). A TLS connection lets
    its socket go once the broker answers its close_notify, later than `close()` returns: a diagnosis that answered
    before then left a socket open, which a loop stopped meanwhile (a command's, a test's) never closed."""
    if connections:
        await asyncio.wait([connection.close() for connection in connections], timeout=CLOSE_WAIT)


def explain(exc: BaseException, *, protocol: str, mechanism: object = None, host: str = "") -> str:
    """`exc` (or what it was raised from), met connecting to `host` with `protocol` (and SASL `mechanism`), in the
    operator's terms, naming the setting to fix."""
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
            return _untrusted(cause, host)
        if isinstance(cause, ssl.SSLError) and (refusal := _client_certificate_refused(cause)) is not None:
            return refusal
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
        # Connected (and through TLS), then closed at the first request other than ApiVersions: a SASL listener, or
        # no Kafka at all.
        return (
            f"the connection was closed ({_first_line(exc)}): not a Kafka listener, or one that asks for SASL "
            f"(then kafka.security_protocol must be SASL_{'SSL' if protocol == 'SSL' else 'PLAINTEXT'}, not {protocol})"
        )
    return _first_line(exc)


def _untrusted(error: ssl.SSLCertVerificationError, host: str) -> str:
    """The broker's certificate, refused by us."""
    if error.verify_code == _HOSTNAME_MISMATCH:
        return (
            f"the broker's certificate does not name {host}: list the brokers in kafka.bootstrap_servers by a name "
            "their certificates hold"
        )
    if error.verify_code in _UNKNOWN_ISSUER:
        return (
            f"the broker's certificate is not trusted ({error.verify_message}): set kafka.ssl_cafile to the CA "
            "that signed it"
        )
    return f"the broker's certificate is refused ({error.verify_message}): the cluster's certificate needs mending"


def _client_certificate_refused(error: ssl.SSLError) -> str | None:
    """What the broker's alert says of our client certificate; None for another TLS failure."""
    reason = error.reason or ""
    if "CERTIFICATE_EXPIRED" in reason:
        return f"the broker says our client certificate has expired ({reason}): renew kafka.ssl_certfile"
    if "CERTIFICATE_REVOKED" in reason:
        return f"the broker says our client certificate was revoked ({reason}): kafka.ssl_certfile needs a new one"
    if any(alert in reason for alert in _CLIENT_CERTIFICATE_ALERTS):
        return (
            f"the broker wants a client certificate it trusts ({reason}): set kafka.ssl_certfile and "
            "kafka.ssl_keyfile to a pair its CA signed"
        )
    return None


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
