"""The Kafka client's options from settings: TLS with a client certificate (``kafka.ssl_certfile``/``ssl_keyfile``)
for brokers that ask for one, and what is said when the pair cannot be used."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from pathlib import Path

import pytest
from support import certificate, encrypted_key

from daemon import cli
from daemon.kafka_certificate import kafka_certificate
from daemon.kafka_options import client_options
from daemon.key_pairs import certificate_validity, text_time
from daemon.settings import load_settings
from topics.errors import ConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A CA, a server certificate and a client certificate it signed, and a client certificate it did not."""
    directory = tmp_path_factory.mktemp("pki")
    ca = certificate(directory, "ca")
    return {
        "ca": ca,
        "server": certificate(directory, "server", issuer=ca),
        "client": certificate(directory, "client", issuer=ca),
        "stranger": certificate(directory, "stranger"),
    }


def tls_env(pki: dict[str, tuple[Path, Path]], client: str = "client", **more: str) -> dict[str, str]:
    cert, key = pki[client]
    return {
        "ORDERBUS_KAFKA__SECURITY_PROTOCOL": "SSL",
        "ORDERBUS_KAFKA__SSL_CAFILE": str(pki["ca"][0]),
        "ORDERBUS_KAFKA__SSL_CERTFILE": str(cert),
        "ORDERBUS_KAFKA__SSL_KEYFILE": str(key),
        **more,
    }


async def test_the_client_shows_its_certificate_to_a_server_that_asks_for_one(
    pki: dict[str, tuple[Path, Path]],
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"][0]))
    server_context.load_cert_chain(*pki["server"])
    server_context.verify_mode = ssl.CERT_REQUIRED  # a broker's ssl.client.auth=required
    shown: list[object] = []  # the certificate of each client whose handshake passed

    async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        shown.append(writer.get_extra_info("peercert")["subject"])
        writer.write(b"welcome")
        writer.close()

    async def connect(env: dict[str, str]) -> bytes:
        context = client_options(load_settings(None, env=env).kafka)["ssl_context"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        try:
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert await connect(tls_env(pki)) == b"welcome"
        assert shown == [((("commonName", "client.orderbus.test"),),)]
        without = {name: value for name, value in tls_env(pki).items() if not name.endswith(("CERTFILE", "KEYFILE"))}
        try:
            refused = await connect(without)  # TLS 1.3: the server's refusal arrives after the client's handshake
        except (ssl.SSLError, ConnectionError):
            refused = b""
        assert (refused, len(shown)) == (b"", 1), "no certificate: no welcome"


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"ORDERBUS_KAFKA__SSL_KEYFILE": ""}, "ssl_certfile set without ssl_keyfile: a client certificate needs both"),
        (
            {"ORDERBUS_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT"},
            "ssl_cafile, ssl_certfile, ssl_keyfile set, but security_protocol is PLAINTEXT",
        ),
    ],
)
def test_a_client_certificate_setting_that_cannot_apply_is_refused_at_load(
    pki: dict[str, tuple[Path, Path]], env: dict[str, str], said: str
) -> None:
    values = {name: value for name, value in {**tls_env(pki), **env}.items() if value}
    with pytest.raises(ConfigError, match=rf"^invalid settings: kafka: {said}"):
        load_settings(None, env=values)


def test_a_pair_that_cannot_be_used_is_named_where_a_client_is_built(
    pki: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    encrypted = encrypted_key(pki["client"][1])
    cases = {
        str(
            pki["stranger"][1]
        ): f"kafka.ssl_keyfile: {pki['stranger'][1]} is not the private key of {pki['client'][0]}",
        str(encrypted): f"kafka.ssl_keyfile: {encrypted} is encrypted",
        str(tmp_path / "gone.key"): f"kafka.ssl_keyfile: cannot read {tmp_path / 'gone.key'}",
        str(pki["client"][0]): f"kafka.ssl_keyfile: {pki['client'][0]} holds no PEM private key",
    }
    for key, said in cases.items():
        settings = load_settings(None, env=tls_env(pki, ORDERBUS_KAFKA__SSL_KEYFILE=key))  # files are read later
        with pytest.raises(ConfigError) as caught:
            client_options(settings.kafka)
        assert str(caught.value).startswith(said)


def test_config_check_loads_the_client_certificate_as_run_would(
    pki: dict[str, tuple[Path, Path]], no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in tls_env(pki, ORDERBUS_KAFKA__SSL_KEYFILE=str(pki["stranger"][1])).items():
        no_orderbus_env.setenv(name, value)
    no_orderbus_env.setenv("ORDERBUS_INGEST__ALLOW_UNSIGNED", "true")
    assert cli.main(["config", "check"]) == 2
    assert "kafka.ssl_keyfile:" in capsys.readouterr().err
    no_orderbus_env.setenv("ORDERBUS_KAFKA__SSL_KEYFILE", str(pki["client"][1]))
    assert cli.main(["config", "check"]) == 0
    assert f'"ssl_keyfile": "{pki["client"][1]}"' in capsys.readouterr().out


def test_a_client_certificate_near_its_end_is_said_by_config_check(
    tmp_path: Path, no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = certificate(tmp_path, "ca", days=30)
    short = certificate(tmp_path, "short", days=2, issuer=ca)
    env = {
        "ORDERBUS_KAFKA__SECURITY_PROTOCOL": "SSL",
        "ORDERBUS_KAFKA__SSL_CAFILE": str(ca[0]),
        "ORDERBUS_KAFKA__SSL_CERTFILE": str(short[0]),
        "ORDERBUS_KAFKA__SSL_KEYFILE": str(short[1]),
        "ORDERBUS_INGEST__ALLOW_UNSIGNED": "true",
    }
    for name, value in env.items():
        no_orderbus_env.setenv(name, value)
    kafka = load_settings(None, env=env).kafka
    renewable = kafka_certificate(kafka, client_options(kafka))
    assert renewable is not None
    end = renewable.end
    assert end.not_after == certificate_validity(short[0].read_text())[2]
    assert end.problem(end.not_after - 30 * 86400) is None
    assert end.problem(end.not_after + 1) == (
        f"the Kafka client certificate expired at {text_time(end.not_after)}: the brokers refuse it: orderbus can "
        "neither publish nor deliver"
    )
    # The check reads the end from the certificate alone: no private copy of the key is made (none could be here).
    no_orderbus_env.setattr(tempfile, "tempdir", str(tmp_path / "absent"))
    assert cli.main(["config", "check"]) == 0
    assert "warning: the Kafka client certificate expires in 2.0 days" in capsys.readouterr().err
