"""HTTPS on the webhook's listener (`daemon.tls_listener`): real certificates (made by openssl), a real listener on
127.0.0.1, real TLS clients; a renewed pair taken by a reload, a broken one refused with the pair in use kept."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import ssl
import subprocess
import sys
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from support import free_port

from consumers.engine import SinkEngine
from daemon import cli, status
from daemon.app import build_app
from daemon.lifecycle import _listen, _reload_on_request
from daemon.settings import load_settings
from daemon.tls_listener import EXPIRY_WARNING, ServerTls, certificate_expiry, server_tls
from topics.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _pair(directory: Path, name: str, days: int) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", str(days), "-subj", f"/CN={name}.orderbus.test", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    encrypted = directory / "encrypted.key"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-aes-128-cbc",
         "-pass", "pass:secret", "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return {"a": _pair(directory, "a", 2), "b": _pair(directory, "b", 3), "encrypted": (encrypted, encrypted)}


def _openssl_end(cert: Path) -> float:
    said = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-enddate"], capture_output=True, text=True)
    end = said.stdout.strip().removeprefix("notAfter=")
    return datetime.strptime(end, "%b %d %H:%M:%S %Y GMT").replace(tzinfo=UTC).timestamp()


def test_the_expiry_is_read_from_the_certificate_as_openssl_reads_it(
    pairs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    # UTCTime until 2049, GeneralizedTime after (RFC 5280); RSA's longer lengths; a chain names its first.
    long_lived, rsa = tmp_path / "long.crt", tmp_path / "rsa.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days",
         "12000", "-subj", "/CN=long", "-keyout", str(tmp_path / "long.key"), "-out", str(long_lived)],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=rsa",
         "-keyout", str(tmp_path / "rsa.key"), "-out", str(rsa)],
        check=True, capture_output=True,
    )  # fmt: skip
    for cert in (pairs["a"][0], long_lived, rsa):
        assert certificate_expiry(cert.read_text()) == _openssl_end(cert)
    assert datetime.fromtimestamp(certificate_expiry(long_lived.read_text()), UTC).year > 2050
    chain = tmp_path / "chain.pem"
    chain.write_text(rsa.read_text() + long_lived.read_text())
    assert certificate_expiry(chain.read_text()) == _openssl_end(rsa)
    with pytest.raises(ValueError, match="no PEM certificate"):
        certificate_expiry(pairs["a"][1].read_text())


def test_the_expiry_is_said_at_the_level_it_deserves(
    pairs: dict[str, tuple[Path, Path]], caplog: pytest.LogCaptureFixture
) -> None:
    tls = ServerTls(*pairs["a"])
    with caplog.at_level(logging.INFO, logger="daemon.tls_listener"):
        tls.say_expiry(tls.not_after - EXPIRY_WARNING - 1)
        tls.say_expiry(tls.not_after - 3 * 86400)
        tls.say_expiry(tls.not_after)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "the webhook's certificate in use"),
        ("WARNING", "the webhook's certificate expires in 3.0 days; renew it, then reload"),
        ("ERROR", "the webhook's certificate has expired: clients refuse it; renew it, then reload"),
    ]
    expires = datetime.fromtimestamp(tls.not_after, UTC).isoformat(timespec="seconds")
    assert all(getattr(r, "expires", None) == expires for r in caplog.records)


def _der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def _client(trusted: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(trusted))
    context.check_hostname = False  # the certificates name 127.0.0.1; a client that checks names is not the point
    return context


async def _peer_certificate(port: int, trusted: Path) -> bytes:
    """The certificate a new connection is shown (one the client trusts, or the handshake fails)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client(trusted))
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert isinstance(der, bytes)
        return der
    finally:
        writer.close()


def test_a_pair_that_cannot_be_used_is_a_config_error_naming_the_setting_and_the_problem(
    pairs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    (a_cert, a_key), (_, b_key) = pairs["a"], pairs["b"]
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    cases = [
        (tmp_path / "none.crt", a_key, f"ingest.tls_certfile: cannot read {tmp_path / 'none.crt'}: No such file"),
        (a_cert, tmp_path / "none.key", f"ingest.tls_keyfile: cannot read {tmp_path / 'none.key'}: No such file"),
        (a_key, a_key, f"ingest.tls_certfile: {a_key} holds no PEM certificate"),
        (a_cert, a_cert, f"ingest.tls_keyfile: {a_cert} holds no PEM private key"),
        (a_cert, b_key, f"ingest.tls_keyfile: {b_key} is not the private key of {a_cert}"),
        (a_cert, pairs["encrypted"][1], "is encrypted; give the key unencrypted"),
        (garbage, a_key, f"ingest.tls_certfile/ingest.tls_keyfile: {garbage} and {a_key} do not load"),
    ]
    for cert, key, said in cases:
        with pytest.raises(ConfigError) as caught:
            ServerTls(cert, key)
        assert said in str(caught.value)
    assert server_tls(None, None) is None


def test_a_key_every_user_can_read_is_said(
    pairs: dict[str, tuple[Path, Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "tls.key"
    shutil.copy(pairs["a"][1], key)
    with caplog.at_level(logging.WARNING, logger="daemon.tls_listener"):
        key.chmod(0o640)  # the ssl-cert group's way: not said
        assert server_tls(pairs["a"][0], key) is not None
        key.chmod(0o644)
        assert server_tls(pairs["a"][0], key) is not None
    assert [r.getMessage() for r in caplog.records] == [
        f"insecure setting: ingest.tls_keyfile {key} can be read by every user of this host (mode 0644); chmod o-r it"
    ]


def test_the_settings_take_both_files_or_neither_and_the_listener_is_then_https(
    pairs: dict[str, tuple[Path, Path]],
) -> None:
    cert, key = pairs["a"]
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env={"ORDERBUS_INGEST__TLS_CERTFILE": str(cert)})
    assert "tls_keyfile: HTTPS needs it beside tls_certfile (or neither, for plain HTTP)" in str(caught.value)
    settings = load_settings(
        None, env={"ORDERBUS_INGEST__TLS_CERTFILE": str(cert), "ORDERBUS_INGEST__TLS_KEYFILE": str(key)}
    )
    assert settings.ingest_url() == "https://127.0.0.1:8080"
    assert settings.admin_url() == "https://127.0.0.1:8080"
    assert load_settings(None, env={}).ingest_url() == "http://127.0.0.1:8080"


def test_config_check_loads_the_pair_as_run_would(
    no_orderbus_env: pytest.MonkeyPatch,
    pairs: dict[str, tuple[Path, Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (cert, _), (_, other_key) = pairs["a"], pairs["b"]
    config = tmp_path / "orderbus.toml"
    config.write_text(f'[ingest]\nallow_unsigned = true\ntls_certfile = "{cert}"\ntls_keyfile = "{other_key}"\n')
    assert cli.main(["config", "check", str(config)]) == 2
    assert f"ingest.tls_keyfile: {other_key} is not the private key of {cert}" in capsys.readouterr().err


async def test_the_listener_speaks_https_and_a_reload_renews_its_certificate(
    pairs: dict[str, tuple[Path, Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Renewed in place, as certbot and cert-manager do: the same paths, new contents.
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pairs["a"][0], cert)
    shutil.copy(pairs["a"][1], key)
    tls = ServerTls(cert, key)
    port = free_port()
    app = build_app(ingest=None, readiness=dict, status=lambda: {"sinks": {}})
    settings = load_settings(None, env={})
    requested = asyncio.Event()
    async with AsyncExitStack() as stack:
        await _listen(stack, app, "ingest", "127.0.0.1", port, tls.context)
        reloader = asyncio.create_task(
            _reload_on_request(requested, lambda: settings, settings, cast(dict[str, SinkEngine], {}), tls)
        )
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=_client(cert)) as response:
                    assert response.status == 200
                with pytest.raises(aiohttp.ClientError):
                    await session.get(f"http://127.0.0.1:{port}/healthz")  # plain HTTP is no request here
            assert await _peer_certificate(port, pairs["a"][0]) == _der(pairs["a"][0])
            document = await asyncio.to_thread(status.fetch_status, f"https://127.0.0.1:{port}", pinned=cert)
            assert document == {"sinks": {}}, "`orderbus status` trusts the listener's own certificate"

            shutil.copy(pairs["b"][0], cert)
            shutil.copy(pairs["b"][1], key)
            with caplog.at_level(logging.INFO, logger="daemon.lifecycle"):
                requested.set()
                await _reloaded(caplog, "certificate reloaded")
            assert await _peer_certificate(port, pairs["b"][0]) == _der(pairs["b"][0])

            shutil.copy(pairs["a"][0], cert)  # half renewed: a's certificate beside b's key
            with caplog.at_level(logging.INFO, logger="daemon.lifecycle"):
                requested.set()
                refused = await _reloaded(caplog, "certificate reload refused, the one in use stays")
            assert f"{key} is not the private key of {cert}" in getattr(refused, "error", "")
            assert await _peer_certificate(port, pairs["b"][0]) == _der(pairs["b"][0]), "b's pair still serves"
        finally:
            reloader.cancel()


async def _reloaded(caplog: pytest.LogCaptureFixture, message: str) -> Any:
    for _ in range(100):
        if said := [r for r in caplog.records if r.getMessage() == message]:
            caplog.clear()
            return said[0]
        await asyncio.sleep(0)
    raise AssertionError(f"no {message!r} line")


async def test_a_daemon_serves_https_renews_on_sighup_and_its_status_command_trusts_it(
    pairs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    # The whole way: `orderbus run` loads the pair from its settings, SIGHUP renews it, `orderbus status` reads
    # /status over HTTPS. No ingest and no sinks: no Kafka needed.
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pairs["a"][0], cert)
    shutil.copy(pairs["a"][1], key)
    port = free_port()
    config = tmp_path / "orderbus.toml"
    config.write_text(
        f'state_dir = "{tmp_path}"\n[ingest]\nenabled = false\nport = {port}\n'
        f'tls_certfile = "{cert}"\ntls_keyfile = "{key}"\n'
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "run", "--config", str(config), stderr=subprocess.PIPE, env=env
    )
    assert daemon.stderr is not None
    try:
        await asyncio.wait_for(_log_line(daemon.stderr, f"listening on https://127.0.0.1:{port}"), timeout=30)
        assert await _peer_certificate(port, pairs["a"][0]) == _der(pairs["a"][0])
        shown = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", "status", "--config", str(config), stdout=subprocess.PIPE, env=env
        )
        out, _ = await asyncio.wait_for(shown.communicate(), timeout=30)
        assert shown.returncode == 0, out
        assert "(no sink enabled)" in out.decode()
        shutil.copy(pairs["b"][0], cert)
        shutil.copy(pairs["b"][1], key)
        daemon.send_signal(signal.SIGHUP)
        await asyncio.wait_for(_log_line(daemon.stderr, "certificate reloaded"), timeout=30)
        assert await _peer_certificate(port, pairs["b"][0]) == _der(pairs["b"][0])
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{port}/metrics", ssl=_client(pairs["b"][0])) as response,
        ):
            metrics = await response.text()
        [expiry] = [
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("orderbus_ingest_tls_certificate_expiry_timestamp_seconds ")
        ]
        assert expiry == _openssl_end(pairs["b"][0]), "the renewed certificate's end"
    finally:
        if daemon.returncode is None:
            daemon.terminate()
        code = await asyncio.wait_for(daemon.wait(), timeout=30)
    assert code == 0


async def _log_line(stream: asyncio.StreamReader, text: str) -> None:
    while line := await stream.readline():
        if text in line.decode():
            return
    raise AssertionError(f"the daemon ended before logging {text!r}")
