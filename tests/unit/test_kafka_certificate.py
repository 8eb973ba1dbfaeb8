"""The Kafka clients' certificate renewed at a reload: a real TLS server that asks for a client certificate (as a
broker with ``ssl.client.auth=required``) sees the new one on the next connection made with the clients' shared
context; a half-renewed pair or one not valid yet keeps the one in use."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from support import certificate, settings_env

from consumers.engine import SinkEngine
from consumers.tasks import cancel_and_wait
from daemon.kafka_certificate import KafkaCertificate, kafka_certificate
from daemon.kafka_options import client_options
from daemon.key_pairs import certificate_validity, refuse_unless_valid
from daemon.lifecycle import _reload_on_request
from daemon.settings import Settings, load_settings
from topics.errors import ConfigError


def _der(cert: Path) -> bytes:
    return certificate_validity(cert.read_text())[0]


class Broker:
    """A TLS listener that asks every client for a certificate signed by `ca` and keeps the one it was shown."""

    def __init__(self, pki: Path, ca: tuple[Path, Path]) -> None:
        server_cert, server_key = certificate(pki, "broker", issuer=ca)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca[0]))
        self.context.load_cert_chain(server_cert, server_key)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.shown: asyncio.Queue[bytes] = asyncio.Queue()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.shown.put_nowait(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@pytest.fixture
async def pki(tmp_path: Path) -> AsyncIterator[tuple[Path, tuple[Path, Path], Broker]]:
    ca = certificate(tmp_path, "ca", days=30)
    broker = Broker(tmp_path, ca)
    server = await asyncio.start_server(broker.handle, "127.0.0.1", 0, ssl=broker.context)
    broker.port = server.sockets[0].getsockname()[1]
    async with server:
        yield tmp_path, ca, broker


async def shown(broker: Broker, context: ssl.SSLContext) -> bytes:
    """The certificate the broker is shown by a new connection made with `context`."""
    _, writer = await asyncio.open_connection("127.0.0.1", broker.port, ssl=context, server_hostname="127.0.0.1")
    try:
        async with asyncio.timeout(10):
            return await broker.shown.get()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def in_use(pki_dir: Path, ca: tuple[Path, Path]) -> tuple[Settings, ssl.SSLContext, KafkaCertificate, Path, Path]:
    """Settings with a client pair at fixed paths (a renewal overwrites them), the clients' TLS context, and the
    certificate in it."""
    cert, key = pki_dir / "client-in-use.crt", pki_dir / "client-in-use.key"
    first = certificate(pki_dir, "client-a", issuer=ca)
    shutil.copy(first[0], cert)
    shutil.copy(first[1], key)
    env = settings_env("127.0.0.1:9", "t.", pki_dir / "state")
    env |= {
        "ORDERBUS_KAFKA__SECURITY_PROTOCOL": "SSL",
        "ORDERBUS_KAFKA__SSL_CAFILE": str(ca[0]),
        "ORDERBUS_KAFKA__SSL_CERTFILE": str(cert),
        "ORDERBUS_KAFKA__SSL_KEYFILE": str(key),
    }
    settings = load_settings(None, env=env)
    options = client_options(settings.kafka)
    renewable = kafka_certificate(settings.kafka, options)
    assert renewable is not None
    return settings, options["ssl_context"], renewable, cert, key


def renew(pki_dir: Path, ca: tuple[Path, Path], name: str, cert: Path, key: Path) -> tuple[Path, Path]:
    """A new pair (valid 30 days) written over `cert` and `key`, as a renewal does; the new pair's own files."""
    pair = certificate(pki_dir, name, days=30, issuer=ca)
    shutil.copy(pair[0], cert)
    shutil.copy(pair[1], key)
    return pair


async def test_a_renewed_pair_is_shown_on_the_next_connection_and_a_half_renewed_one_is_refused(
    pki: tuple[Path, tuple[Path, Path], Broker],
) -> None:
    pki_dir, ca, broker = pki
    _, context, renewable, cert, key = in_use(pki_dir, ca)  # `context`: what every client of a run is built with
    assert await shown(broker, context) == _der(cert)
    first = cert.read_text()

    renewed = renew(pki_dir, ca, "client-b", cert, key)
    assert renewable.reload(time.time()) is True
    assert await shown(broker, context) == _der(renewed[0])
    assert renewable.not_after == certificate_validity(renewed[0].read_text())[2]
    assert renewable.reload(time.time()) is False, "unchanged"

    cert.write_text(first)  # half renewed: the old certificate beside the new key
    with pytest.raises(ConfigError, match=rf"kafka.ssl_keyfile: {key} is not the private key of {cert}"):
        renewable.reload(time.time())
    assert await shown(broker, context) == _der(renewed[0]), "the pair in use stays whole"


async def test_a_certificate_not_valid_yet_keeps_the_one_in_use(pki: tuple[Path, tuple[Path, Path], Broker]) -> None:
    pki_dir, ca, broker = pki
    _, context, renewable, cert, key = in_use(pki_dir, ca)
    before = cert.read_text()
    later = renew(pki_dir, ca, "client-c", cert, key)
    a_year_ago = time.time() - 365 * 86400  # the new one is not valid then; the one in use neither: taken
    assert renewable.reload(a_year_ago) is True
    cert.write_text(before)
    shutil.copy(pki_dir / "client-a.key", key)
    with pytest.raises(ConfigError, match=r"is valid from .* not now; the one in use is"):
        renewable.reload(time.time() + 10 * 86400)  # a is past its 2 days then, c is not: c stays
    assert await shown(broker, context) == _der(later[0])


async def test_a_sighup_reads_the_kafka_clients_certificate_again(
    pki: tuple[Path, tuple[Path, Path], Broker], caplog: pytest.LogCaptureFixture
) -> None:
    pki_dir, ca, broker = pki
    settings, context, renewable, cert, key = in_use(pki_dir, ca)
    renewed = renew(pki_dir, ca, "client-d", cert, key)
    requested = asyncio.Event()
    engines = cast(dict[str, SinkEngine], {})
    reloader = asyncio.create_task(_reload_on_request(requested, lambda: settings, settings, engines, None, renewable))
    try:
        with caplog.at_level(logging.INFO, logger="daemon"):
            requested.set()
            for _ in range(200):
                if any(r.getMessage() == "settings reloaded" for r in caplog.records):
                    break
                await asyncio.sleep(0)
        said = [r for r in caplog.records if r.getMessage() == "certificate reloaded"]
        assert [getattr(r, "certfile", None) for r in said] == [str(cert)]
        assert any(r.getMessage().startswith("the Kafka client certificate in use") for r in caplog.records)
        assert await shown(broker, context) == _der(renewed[0])
    finally:
        await cancel_and_wait(reloader)


async def test_a_pair_refused_by_the_shared_context_after_its_trial_leaves_the_one_in_use_whole(
    pki: tuple[Path, tuple[Path, Path], Broker], monkeypatch: pytest.MonkeyPatch
) -> None:
    pki_dir, ca, broker = pki
    _, context, renewable, cert, key = in_use(pki_dir, ca)
    first = cert.read_text()
    renewed = renew(pki_dir, ca, "client-e", cert, key)
    load, loads = KafkaCertificate._load, 0

    def refused_once(self: KafkaCertificate, into: ssl.SSLContext, pem: tuple[str, str]) -> None:
        nonlocal loads
        loads += 1
        if loads == 2:  # the shared context, after the trial: OpenSSL takes the certificate, then refuses the key
            with contextlib.suppress(ssl.SSLError):
                into.load_cert_chain(renewed[0], pki_dir / "client-a.key")
            raise ConfigError("kafka.ssl_keyfile: refused")
        load(self, into, pem)

    monkeypatch.setattr(KafkaCertificate, "_load", refused_once)
    with pytest.raises(ConfigError, match="refused"):
        renewable.reload(time.time())
    assert await shown(broker, context) == certificate_validity(first)[0], "the pair in use, whole again"
    assert renewable.not_after == certificate_validity(first)[2]


def test_a_renewal_not_valid_now_is_refused_only_while_the_one_in_use_is() -> None:
    # The rule both reloads keep (the webhook's and the Kafka clients'), at synthetic times: from 1000 to 2000.
    path = Path("/etc/orderbus/kafka-client.crt")
    not_yet, expired, in_use = (1600.0, 9000.0), (0.0, 1400.0), (1000.0, 2000.0)
    for fresh in (not_yet, expired):
        with pytest.raises(
            ConfigError, match=rf"^kafka.ssl_certfile: {path} is valid from .* not now; the one in use is"
        ):
            refuse_unless_valid("kafka.ssl_certfile", path, fresh, in_use, now=1500.0)
        refuse_unless_valid("kafka.ssl_certfile", path, fresh, in_use, now=2500.0)  # the one in use is no better
    refuse_unless_valid("kafka.ssl_certfile", path, (1200.0, 9000.0), in_use, now=1500.0)  # valid: taken
