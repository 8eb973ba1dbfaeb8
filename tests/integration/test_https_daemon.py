"""A real `orderbus run` with HTTPS on its webhook's listener: it loads the pair from its settings, says when the
certificate expires (log line, metric), renews it on SIGHUP, and `orderbus status` reads /status over HTTPS. No
ingest and no sinks: no Kafka needed."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from support import certificate, free_port, log_line, peer_certificate, tls_client

from daemon.key_pairs import certificate_validity

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def test_a_daemon_serves_https_renews_on_sighup_and_its_status_command_trusts_it(tmp_path: Path) -> None:
    a, b = certificate(tmp_path, "a", days=2), certificate(tmp_path, "b", days=30)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(a[0], cert)
    shutil.copy(a[1], key)
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
        line = await asyncio.wait_for(log_line(daemon.stderr, "the webhook's certificate expires in"), timeout=30)
        assert '"level": "warning"' in line, "2 days left: a warning"
        await asyncio.wait_for(log_line(daemon.stderr, f"listening on https://127.0.0.1:{port}"), timeout=30)
        assert await peer_certificate(port, a[0]) == ssl.PEM_cert_to_DER_cert(a[0].read_text())
        shown = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", "status", "--config", str(config), stdout=subprocess.PIPE, env=env
        )
        out, _ = await asyncio.wait_for(shown.communicate(), timeout=30)
        assert shown.returncode == 0, out
        assert "(no sink enabled)" in out.decode()

        shutil.copy(b[0], cert)
        shutil.copy(b[1], key)
        daemon.send_signal(signal.SIGHUP)
        await asyncio.wait_for(log_line(daemon.stderr, "certificate reloaded"), timeout=30)
        assert await peer_certificate(port, b[0]) == ssl.PEM_cert_to_DER_cert(b[0].read_text())
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{port}/metrics", ssl=tls_client(b[0])) as response,
        ):
            metrics = await response.text()
        [expiry] = [
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("orderbus_ingest_tls_certificate_expiry_timestamp_seconds ")
        ]
        assert expiry == certificate_validity(b[0].read_text())[2], "the renewed certificate's end"
    finally:
        if daemon.returncode is None:
            daemon.terminate()
        code = await asyncio.wait_for(daemon.wait(), timeout=30)
    assert code == 0
