"""HTTPS on the webhook's listener (`daemon.tls_listener`): real certificates (made by openssl), a real listener on
127.0.0.1, real TLS clients; a renewed pair taken by a reload, a broken one refused with the pair in use kept. The
whole daemon with it: tests/integration/test_https_daemon.py."""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from support import certificate, encrypted_key, free_port, peer_certificate, tls_client

from consumers.engine import SinkEngine
from daemon import cli, status
from daemon.app import build_app
from daemon.key_pairs import EXPIRY_WARNING, certificate_validity
from daemon.lifecycle import _listen, _reload_on_request
from daemon.settings import Settings, load_settings
from daemon.status import StatusError
from daemon.tls_listener import ServerTls, server_tls
from topics.errors import ConfigError

Pair = tuple[Path, Path]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """Self-signed pairs a (2 days), b (3 days) and short (1 day); c and d signed by one CA; an encrypted key."""
    directory = tmp_path_factory.mktemp("tls")
    ca = certificate(directory, "ca", days=5)
    a = certificate(directory, "a", days=2)
    encrypted = encrypted_key(a[1])
    return {
        "a": a,
        "b": certificate(directory, "b", days=3),
        "short": certificate(directory, "short", days=1),
        "ca": ca,
        "c": certificate(directory, "c", issuer=ca),
        "d": certificate(directory, "d", issuer=ca),
        "encrypted": (encrypted, encrypted),
    }


def _openssl_time(cert: Path, which: str) -> float:
    said = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", f"-{which}"], capture_output=True, text=True)
    when = said.stdout.strip().partition("=")[2]
    return datetime.strptime(when, "%b %d %H:%M:%S %Y GMT").replace(tzinfo=UTC).timestamp()


def _der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def test_a_pair_that_cannot_be_used_is_a_config_error_naming_the_setting_and_the_problem(
    pairs: dict[str, Pair], tmp_path: Path
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


def test_the_validity_is_read_from_the_certificate_as_openssl_reads_it(pairs: dict[str, Pair], tmp_path: Path) -> None:
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
    for cert in (pairs["a"][0], pairs["c"][0], long_lived, rsa):
        der, not_before, not_after = certificate_validity(cert.read_text())
        assert (der, not_before, not_after) == (
            _der(cert),
            _openssl_time(cert, "startdate"),
            _openssl_time(cert, "enddate"),
        )
    assert datetime.fromtimestamp(certificate_validity(long_lived.read_text())[2], UTC).year > 2050
    chain = tmp_path / "chain.pem"
    chain.write_text(rsa.read_text() + long_lived.read_text())
    assert certificate_validity(chain.read_text())[0] == _der(rsa)
    with pytest.raises(ValueError, match="no PEM certificate"):
        certificate_validity(pairs["a"][1].read_text())
    cut = ssl.DER_cert_to_PEM_cert(_der(rsa)[:200])  # a certificate that ends inside its issuer
    with pytest.raises(ValueError, match=r"past the certificate's end|ends inside an element"):
        certificate_validity(cut)


def test_the_expiry_is_said_at_the_level_it_deserves(pairs: dict[str, Pair], caplog: pytest.LogCaptureFixture) -> None:
    tls = ServerTls(*pairs["a"])
    with caplog.at_level(logging.INFO, logger="daemon.key_pairs"):
        tls.end.say(tls.not_after - EXPIRY_WARNING - 1)
        tls.end.say(tls.not_after - 3 * 86400)
        tls.end.say(tls.not_after)
    expires = datetime.fromtimestamp(tls.not_after, UTC).isoformat(timespec="seconds")
    then = "renew it, then reload (restart, under systemd credentials)"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "the webhook's certificate in use"),
        ("WARNING", f"the webhook's certificate expires in 3.0 days, at {expires}; {then}"),
        ("ERROR", f"the webhook's certificate expired at {expires}: clients refuse it; {then}"),
    ]
    assert all(getattr(r, "expires", None) == expires for r in caplog.records)


def test_a_key_every_user_can_read_is_said(
    pairs: dict[str, Pair], tmp_path: Path, caplog: pytest.LogCaptureFixture
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


def test_the_settings_take_both_files_or_neither_and_the_listener_is_then_https(pairs: dict[str, Pair]) -> None:
    cert, key = pairs["a"]
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env={"ORDERBUS_INGEST__TLS_CERTFILE": str(cert)})
    assert "tls_keyfile: HTTPS needs it beside tls_certfile (or neither, for plain HTTP)" in str(caught.value)
    settings = load_settings(
        None, env={"ORDERBUS_INGEST__TLS_CERTFILE": str(cert), "ORDERBUS_INGEST__TLS_KEYFILE": str(key)}
    )
    assert settings.ingest_url() == "https://127.0.0.1:8080"
    assert settings.admin_url() == "https://127.0.0.1:8080"
    assert settings.admin_certificate() == cert, "what `orderbus status` accepts there"
    env = {"ORDERBUS_INGEST__TLS_CERTFILE": str(cert), "ORDERBUS_INGEST__TLS_KEYFILE": str(key)}
    apart = load_settings(None, env={**env, "ORDERBUS_ADMIN__PORT": "8081"})
    assert (apart.admin_url(), apart.admin_certificate()) == ("http://127.0.0.1:8081", None)
    assert load_settings(None, env={}).ingest_url() == "http://127.0.0.1:8080"


def test_config_check_loads_the_pair_as_run_would_and_says_an_end_near(
    no_orderbus_env: pytest.MonkeyPatch, pairs: dict[str, Pair], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (cert, key), (_, other_key) = pairs["a"], pairs["b"]
    config = tmp_path / "orderbus.toml"
    config.write_text(f'[ingest]\nallow_unsigned = true\ntls_certfile = "{cert}"\ntls_keyfile = "{other_key}"\n')
    assert cli.main(["config", "check", str(config)]) == 2
    assert f"ingest.tls_keyfile: {other_key} is not the private key of {cert}" in capsys.readouterr().err
    config.write_text(f'[ingest]\nallow_unsigned = true\ntls_certfile = "{cert}"\ntls_keyfile = "{key}"\n')
    assert cli.main(["config", "check", str(config)]) == 0
    assert "warning: the webhook's certificate expires in 2.0 days" in capsys.readouterr().err


@pytest.fixture
def renewed(pairs: dict[str, Pair], tmp_path: Path) -> Pair:
    """Files at fixed paths holding pair a, renewed in place by copying another pair over them (certbot's way)."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pairs["a"][0], cert)
    shutil.copy(pairs["a"][1], key)
    return cert, key


def _renew(files: Pair, pair: Pair) -> None:
    shutil.copy(pair[0], files[0])
    shutil.copy(pair[1], files[1])


def test_a_reload_refuses_a_certificate_not_valid_now_while_the_one_in_use_is(
    pairs: dict[str, Pair], renewed: Pair
) -> None:
    # A renewal gone wrong (or a clock): every handshake would fail with it, where the old pair still works.
    tls = ServerTls(*renewed)
    a_end = tls.not_after
    _, short_start, short_end = certificate_validity(pairs["short"][0].read_text())
    _renew(renewed, pairs["short"])
    with pytest.raises(ConfigError, match=r"is valid from .* not now; the one in use is, until"):
        tls.reload(short_end + 1)  # short has ended, a has not
    assert tls.not_after == a_end
    assert tls.reload(short_start + 1) is True
    assert tls.not_after == short_end
    assert tls.reload(short_start + 2) is False, "the same certificate again"
    _renew(renewed, pairs["a"])
    assert tls.reload(a_end + 1) is True, "neither is valid then: the newer pair at least may be the renewal"


async def test_the_listener_speaks_https_and_a_reload_renews_its_certificate(
    pairs: dict[str, Pair], renewed: Pair, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = ServerTls(*renewed)
    port = free_port()
    app = build_app(ingest=None, readiness=dict, status=lambda: {"sinks": {}})
    settings = load_settings(None, env={})
    loads: list[Settings | Exception] = []

    def load() -> Settings:
        item = loads.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    requested = asyncio.Event()

    async def sighup(settings_then: Settings | Exception, line: str) -> Any:
        loads.append(settings_then)
        with caplog.at_level(logging.INFO, logger="daemon.lifecycle"):
            requested.set()
            for _ in range(100):
                if said := [r for r in caplog.records if r.getMessage() == line]:
                    caplog.clear()
                    return said[0]
                await asyncio.sleep(0)
        raise AssertionError(f"no {line!r} line")

    async with AsyncExitStack() as stack:
        await _listen(stack, app, "ingest", "127.0.0.1", port, tls.context)
        engines = cast(dict[str, SinkEngine], {})
        reloader = asyncio.create_task(_reload_on_request(requested, load, settings, engines, tls))
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=tls_client(renewed[0])) as response:
                    assert response.status == 200
                with pytest.raises(aiohttp.ClientError):
                    await session.get(f"http://127.0.0.1:{port}/healthz")  # plain HTTP is no request here
            assert await peer_certificate(port, pairs["a"][0]) == _der(pairs["a"][0])

            _renew(renewed, pairs["b"])
            await sighup(ConfigError("invalid settings: sinks.crm.rate: must be > 0"), "certificate reloaded")
            assert await peer_certificate(port, pairs["b"][0]) == _der(pairs["b"][0]), "a bad settings file as well"
            assert await peer_certificate(port, pairs["b"][0], "orders.example.test") == _der(pairs["b"][0]), "SNI"
            await sighup(settings, "certificate unchanged")
            monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(renewed[0].parent))  # the pair as systemd credentials
            await sighup(
                settings,
                "certificate unchanged: it is a systemd credential, copied when the service started; after a "
                "renewal, restart the service (systemctl restart orderbus; nothing is lost)",
            )
            monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(renewed[0].parent / "elsewhere"))
            await sighup(settings, "certificate unchanged")
            monkeypatch.delenv("CREDENTIALS_DIRECTORY")

            shutil.copy(pairs["a"][0], renewed[0])  # half renewed: a's certificate beside b's key
            refused = await sighup(settings, "certificate reload refused, the one in use stays")
            assert f"{renewed[1]} is not the private key of {renewed[0]}" in getattr(refused, "error", "")
            assert await peer_certificate(port, pairs["b"][0]) == _der(pairs["b"][0]), "b's pair still serves"

            renewed[0].unlink()
            renewed[0].mkdir()  # swapped for a directory midway
            await sighup(settings, "certificate reload refused, the one in use stays")

            def bug(now: float) -> bool:
                raise RuntimeError("a bug")

            monkeypatch.setattr(tls, "reload", bug)
            failed = await sighup(settings, "certificate reload failed, the one in use stays")
            assert failed.exc_info is not None, "with its traceback"
            monkeypatch.undo()
            await sighup(settings, "settings reloaded")
            assert not reloader.done(), "the next SIGHUP is still heard"
        finally:
            reloader.cancel()


async def test_status_trusts_exactly_the_listeners_own_certificate(pairs: dict[str, Pair]) -> None:
    # c and d share an issuer: trusting the file's chain would have taken d for c.
    port = free_port()
    app = build_app(ingest=None, readiness=dict, status=lambda: {"sinks": {}})
    async with AsyncExitStack() as stack:
        await _listen(stack, app, "ingest", "127.0.0.1", port, ServerTls(*pairs["c"]).context)
        url = f"https://127.0.0.1:{port}"
        assert await asyncio.to_thread(status.fetch_status, url, pinned=pairs["c"][0]) == {"sinks": {}}
        chain = pairs["c"][0].parent / "c-chain.pem"
        chain.write_text(pairs["c"][0].read_text() + pairs["ca"][0].read_text())
        assert await asyncio.to_thread(status.fetch_status, url, pinned=chain) == {"sinks": {}}, "its first"
        for other in (pairs["d"][0], pairs["ca"][0]):
            with pytest.raises(StatusError, match="shows another certificate than"):
                await asyncio.to_thread(status.fetch_status, url, pinned=other)
        with pytest.raises(StatusError, match=r"if that port speaks HTTPS \(ingest.tls_certfile\), pass --url https"):
            await asyncio.to_thread(status.fetch_status, f"http://127.0.0.1:{port}")


async def test_health_asks_the_https_listener_whichever_certificate_it_shows(
    pairs: dict[str, Pair], tmp_path: Path, no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `orderbus health` in the image, with the webhook on HTTPS and no [admin]: found where the settings say, and
    # alive although the file holds a renewal the listener has not loaded yet (a liveness check must not fail then).
    port = free_port()
    app = build_app(ingest=None, readiness=dict)
    config = tmp_path / "orderbus.toml"
    renewed, key = pairs["d"]
    config.write_text(
        f'[ingest]\nport = {port}\nallow_unsigned = true\ntls_certfile = "{renewed}"\ntls_keyfile = "{key}"\n'
    )
    async with AsyncExitStack() as stack:
        await _listen(stack, app, "ingest", "127.0.0.1", port, ServerTls(*pairs["c"]).context)
        code = await asyncio.to_thread(cli.main, ["health", "--config", str(config), "--ready"])
        assert (code, capsys.readouterr().out) == (0, f"ready: https://127.0.0.1:{port}/readyz\n")
        # A URL given: its certificate is checked as any HTTPS client checks it; a failure is 1, never 2 (reserved).
        code = await asyncio.to_thread(cli.main, ["health", "--url", f"https://127.0.0.1:{port}"])
        assert code == 1
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
