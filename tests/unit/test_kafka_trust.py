"""The Kafka clients' CAs read again at a reload: a real TLS server whose certificate a new CA signed (a cluster's CA
rotated) is trusted by the clients' shared context once the CA file holds that CA too, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from support import certificate

from consumers.engine import SinkEngine
from consumers.tasks import cancel_and_wait
from daemon.kafka_trust import KafkaTrust, Trusted
from daemon.lifecycle import _reload_on_request
from daemon.settings import load_settings
from topics.errors import ConfigError


@pytest.fixture
async def rotated(tmp_path: Path) -> AsyncIterator[tuple[Path, Path, Path, int]]:
    """The old CA, the new one, a CA file holding the old one only, and the port of a broker the new one signed."""
    old, new = certificate(tmp_path, "old-ca", days=30), certificate(tmp_path, "new-ca", days=30)
    cert, key = certificate(tmp_path, "broker", issuer=new)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    ca_file = tmp_path / "kafka-ca.pem"
    ca_file.write_text(old[0].read_text())
    async with server:
        yield old[0], new[0], ca_file, server.sockets[0].getsockname()[1]


async def handshake(context: ssl.SSLContext, port: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def test_a_ca_added_to_the_file_is_trusted_after_a_reload(rotated: tuple[Path, Path, Path, int]) -> None:
    old, new, ca_file, port = rotated
    context = ssl.create_default_context(cafile=str(ca_file))  # as `client_options` builds the clients' one
    trust = KafkaTrust(context, ca_file)
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(context, port)
    # The rotation's first step: both trusted; a bundle's comments between them (certifi's, in UTF-8) are no error.
    ca_file.write_text(f"# Issuer: Főtanúsítvány\n{old.read_text()}\n# the new one\n{new.read_text()}", "utf-8")
    assert trust.reload() == Trusted(total=2, new=1)
    await handshake(context, port)
    assert trust.reload() == Trusted(total=2, new=0), "the same file again adds nothing"


BROKEN = "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "kafka.ssl_cafile: cannot read "),
        ("not a certificate\n", "holds no PEM certificate"),
        (BROKEN, "holds a certificate that does not load"),
        ("new+broken", "holds a certificate that does not load"),  # a good one first: not added either
    ],
)
async def test_a_ca_file_that_does_not_load_changes_nothing(
    rotated: tuple[Path, Path, Path, int], content: str | None, said: str
) -> None:
    _, new, ca_file, port = rotated
    context = ssl.create_default_context(cafile=str(ca_file))
    trust = KafkaTrust(context, ca_file)
    if content is None:
        ca_file.unlink()
    else:
        ca_file.write_text(new.read_text() + BROKEN if content == "new+broken" else content)
    with pytest.raises(ConfigError, match=said):
        trust.reload()
    assert context.cert_store_stats()["x509"] == 1
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(context, port)


async def test_a_sighup_reads_the_ca_file_again_and_says_what_it_trusts(
    rotated: tuple[Path, Path, Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    old, new, ca_file, port = rotated
    context = ssl.create_default_context(cafile=str(ca_file))
    requested = asyncio.Event()
    settings = load_settings(None, env={})
    engines = cast(dict[str, SinkEngine], {})
    ca_file.write_text(old.read_text() + new.read_text())
    with caplog.at_level(logging.INFO, "daemon.lifecycle"):
        reloading = asyncio.create_task(
            _reload_on_request(requested, lambda: settings, settings, engines, kafka_ca=KafkaTrust(context, ca_file))
        )
        try:
            requested.set()
            for _ in range(100):  # the reload runs in a few turns of the loop, no sleep in it
                if any(r.getMessage().startswith("kafka CA file read again") for r in caplog.records):
                    break
                await asyncio.sleep(0)
        finally:
            await cancel_and_wait(reloading)
    await handshake(context, port)
    [said] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kafka CA file read again")]
    assert said == (
        "kafka CA file read again: 2 certificate(s) trusted, 1 of them new (one dropped from the file stays "
        "trusted until a restart)"
    )
