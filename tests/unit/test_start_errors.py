"""Resources that cannot be opened at start are configuration errors naming the setting (exit 2, which systemd
does not restart), not tracebacks (exit 1, restarted every 10 s forever); what may work a moment later (a port
held by another process, an address not up yet) is `NotYetError`, exit 1, naming the setting too."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import stat
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from consumers.dedup import SqliteDedupStore
from consumers.engine import EngineConfig
from consumers.metrics import EngineMetrics
from consumers.runner import HttpConfig, open_sink
from daemon import lifecycle
from daemon.ingest_keys import SqliteIngestKeyStore
from daemon.kafka_options import client_options
from daemon.lifecycle import serve
from daemon.settings import Settings, SinkSettings, load_settings
from daemon.sinks import build_auth, build_sink
from topics.errors import BrokerError, ConfigError, NotYetError, StoreError

SYSTEM_CAS = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.mark.parametrize("ingest", ["true", "false"])
async def test_a_state_dir_that_cannot_be_created_is_a_config_error(tmp_path: Path, ingest: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    settings = load_settings(
        None,
        env={
            "ORDERBUS_STATE_DIR": str(blocker / "state"),
            "ORDERBUS_INGEST__ENABLED": ingest,
            "ORDERBUS_INGEST__ALLOW_UNSIGNED": "true",
            "ORDERBUS_SINKS__CRM__ENABLED": "true",
        },
    )
    with pytest.raises(ConfigError, match=r"^state_dir: cannot create .*a-file/state"):
        await serve(settings, asyncio.Event(), registry=CollectorRegistry())


def test_a_kafka_ca_file_gone_since_the_check_is_a_config_error(tmp_path: Path) -> None:
    cafile = tmp_path / "ca.pem"
    shutil.copy(SYSTEM_CAS, cafile)
    settings = load_settings(
        None, env={"ORDERBUS_KAFKA__SECURITY_PROTOCOL": "SSL", "ORDERBUS_KAFKA__SSL_CAFILE": str(cafile)}
    )
    cafile.unlink()
    with pytest.raises(ConfigError, match=r"^kafka\.ssl_cafile: cannot load"):
        client_options(settings.kafka)


async def test_a_sink_ca_bundle_gone_since_the_check_is_a_config_error(tmp_path: Path) -> None:
    opening = open_sink(
        build_sink("crm", SinkSettings()),
        client_options={},
        topic="orders",
        prefix="",
        dedup_path=tmp_path / "dedup-crm.sqlite",
        dead_letters=cast(Any, None),  # never reached
        metrics=EngineMetrics(CollectorRegistry()),
        config=EngineConfig(),
        http=HttpConfig(ca_bundle=tmp_path / "gone.pem"),
    )
    with pytest.raises(ConfigError, match=r"^sinks\.crm\.ca_bundle: cannot load"):
        async with opening:
            pass


def test_an_oauth2_sinks_ca_bundle_gone_since_the_check_is_a_config_error(tmp_path: Path) -> None:
    # Its token client's TLS is built before the sink opens: the sink's own check came too late for it.
    bundle = tmp_path / "ca.pem"
    shutil.copy(SYSTEM_CAS, bundle)
    settings = load_settings(
        None,
        env={
            "ORDERBUS_SINKS__CRM__CA_BUNDLE": str(bundle),
            "ORDERBUS_SINKS__CRM__AUTH__TYPE": "oauth2",
            "ORDERBUS_SINKS__CRM__AUTH__TOKEN_URL": "https://login.example.test/token",
            "ORDERBUS_SINKS__CRM__AUTH__CLIENT_ID": "orderbus",
            "ORDERBUS_SINKS__CRM__AUTH__CLIENT_SECRET": "s3cret",
        },
    )
    bundle.unlink()
    with pytest.raises(ConfigError, match=r"^sinks\.crm\.ca_bundle: cannot load"):
        build_auth("crm", settings.sinks["crm"])


def sink_settings(**env: str) -> Settings:
    env = {"ORDERBUS_TOPICS__PREFIX": "t.", "ORDERBUS_SINKS__CRM__ENABLED": "true", **env}
    return load_settings(None, env={"ORDERBUS_INGEST__ALLOW_UNSIGNED": "true", **env})


async def test_a_missing_topic_stops_start_up_before_any_client_could_create_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The consumers and the ingest's producer name their topics in metadata requests, which a broker with
    # auto.create.topics.enable (Kafka's default) answers by creating them with one partition.
    asked: list[str] = []

    async def missing(names: list[str], options: object, *, timeout: float, diagnosis: object) -> list[str]:
        asked.extend(names)
        return [name for name in names if "dlq" in name]

    monkeypatch.setattr(lifecycle, "missing_topics", missing)
    settings = sink_settings(ORDERBUS_STATE_DIR=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^topic t\.orders\.dlq\.crm does not exist: run `orderbus topics apply`"):
        await serve(settings, asyncio.Event(), registry=CollectorRegistry())
    assert asked == ["t.orders", "t.orders.dlq.crm", "t.orders.replay.crm", "t.orders.state.crm"]


async def test_a_state_topic_with_fewer_partitions_than_the_orders_topic_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An order's state goes to the partition its records are in: one the state topic lacks would fail every flush.
    async def present(names: list[str], options: object, *, timeout: float, diagnosis: object) -> list[str]:
        return []

    async def counts(names: list[str], options: object, *, timeout: float) -> dict[str, int]:
        return {name: 4 if ".state." in name else 6 for name in names}

    monkeypatch.setattr(lifecycle, "missing_topics", present)
    monkeypatch.setattr(lifecycle, "partition_counts", counts)
    settings = sink_settings(ORDERBUS_STATE_DIR=str(tmp_path))
    expected = r"^t\.orders\.state\.crm \(4\): fewer partitions than t\.orders \(6\); run `orderbus topics apply`"
    with pytest.raises(ConfigError, match=expected):
        await lifecycle.check_topics(settings, {})


async def test_an_unreachable_kafka_stops_the_sinks_but_not_the_ingest_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    async def unreachable(names: list[str], options: object, *, timeout: float, diagnosis: object) -> list[str]:
        raise BrokerError("cannot list topics")

    async def diagnosis() -> str | None:
        return "connection refused"

    monkeypatch.setattr(lifecycle, "missing_topics", unreachable)
    with pytest.raises(BrokerError):
        await lifecycle._require_topics(sink_settings(), {}, diagnosis)
    await lifecycle._require_topics(sink_settings(ORDERBUS_SINKS__CRM__ENABLED="false"), {}, diagnosis)  # 503 for now


@pytest.mark.parametrize("secrets", [None, "", "\n\n"])
async def test_an_ingest_without_webhook_secrets_does_not_start_unless_told_to_accept_unsigned_orders(
    tmp_path: Path, secrets: str | None
) -> None:
    # Review (security): an empty credential file, or a container started without the variable, gave an ingest
    # that took unsigned orders from anyone who could reach its port, said by one warning in the log.
    env = {"ORDERBUS_STATE_DIR": str(tmp_path / "state")}
    if secrets is not None:
        (tmp_path / "secret").write_text(secrets)
        env["ORDERBUS_INGEST__WEBHOOK_SECRETS_FILE"] = str(tmp_path / "secret")
    settings = load_settings(None, env=env)
    with pytest.raises(ConfigError, match=r"^ingest\.webhook_secrets: none given, so anyone .*allow_unsigned = true"):
        await serve(settings, asyncio.Event(), registry=CollectorRegistry())
    assert not (tmp_path / "state").exists(), "refused before anything was opened"
    told = load_settings(None, env={**env, "ORDERBUS_INGEST__ALLOW_UNSIGNED": "true"})
    told.ingest.require_signatures()
    load_settings(None, env={**env, "ORDERBUS_INGEST__ENABLED": "false"}).ingest.require_signatures()


async def test_a_state_dir_another_daemon_holds_is_refused_until_that_daemon_ends(tmp_path: Path) -> None:
    # Review (operator): two daemons on one state directory both started, each writing the other's idempotency
    # keys and delivery states as its own.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    settings = load_settings(None, env={"ORDERBUS_STATE_DIR": str(state), "ORDERBUS_INGEST__ALLOW_UNSIGNED": "1"})
    pipe = asyncio.subprocess.PIPE
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLD_LOCK, str(state), stdin=pipe, stdout=pipe)
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"held\n"
        message = rf"^state_dir: {state} is in use by another orderbus daemon \(process {holder.pid} holds"
        with pytest.raises(ConfigError, match=message):
            await serve(settings, asyncio.Event(), registry=CollectorRegistry())
    finally:
        holder.kill()  # as kill -9: the kernel lets go of the lock with the process
        await holder.communicate()
    os.close(lifecycle._lock_state_dir(state))


def test_a_lock_whose_process_id_cannot_be_written_still_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A full disk (helper's experiment): the id's write failed with ENOSPC, and the start ended as "an unexpected
    # error" with a traceback. /dev/full refuses every write as a full disk does.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / lifecycle.STATE_LOCK).symlink_to("/dev/full")
    fd = lifecycle._lock_state_dir(state)
    try:
        [record] = caplog.records
        assert record.levelname == "WARNING"
        assert record.getMessage().startswith(
            f"state_dir: cannot write this process's id into {state / 'orderbus.lock'}"
        )
        with pytest.raises(ConfigError, match="in use by another orderbus daemon"):
            lifecycle._lock_state_dir(state)  # held all the same
    finally:
        os.close(fd)


@pytest.mark.parametrize("store", ["dedup", "ingest keys"])
async def test_a_store_failing_on_a_nearly_full_disk_says_how_much_space_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    # On a full disk SQLite opens a file that exists with "disk I/O error" (its shared-memory index cannot grow):
    # the helper's experiment, whose operator would have looked at the hardware.
    real = os.statvfs
    left: dict[str, int] = {}

    def statvfs(path: object) -> os.statvfs_result:
        stats = real(cast(str, path))
        if "blocks" not in left:
            return stats
        fields = list(stats)
        fields[4] = left["blocks"]  # f_bavail, in units of f_frsize
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", statvfs)
    (tmp_path / "store.sqlite").mkdir()  # a directory where the file should be: the open fails
    opened = (
        SqliteDedupStore(tmp_path / "store.sqlite")
        if store == "dedup"
        else SqliteIngestKeyStore(tmp_path / "store.sqlite")
    )
    with pytest.raises(StoreError) as plenty:
        await opened.open()
    assert "bytes free" not in str(plenty.value)
    left["blocks"] = 3
    with pytest.raises(StoreError, match=r"open failed: .* \(its file system has [0-9,]+ bytes free\)$") as full:
        await opened.open()
    assert f"{3 * real(tmp_path).f_frsize:,} bytes free" in str(full.value)


HOLD_LOCK = """
import sys
from pathlib import Path
from daemon.lifecycle import _lock_state_dir
_lock_state_dir(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()
"""


def test_the_state_dir_is_made_for_its_user_alone_and_one_open_to_others_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = tmp_path / "made" / "state"
    lifecycle._state_dir(load_settings(None, env={"ORDERBUS_STATE_DIR": str(made)}))
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert not caplog.records
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o755)
    lifecycle._state_dir(load_settings(None, env={"ORDERBUS_STATE_DIR": str(tmp_path / "open")}))
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert "can be read by other users (mode 0755)" in record.getMessage()


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (errno.EADDRINUSE, NotYetError),  # another process has it: a rolling restart, another service for now
        (errno.EADDRNOTAVAIL, NotYetError),  # the address is not up on this host yet: a boot race
        (socket.EAI_AGAIN, NotYetError),  # the resolver does not answer yet
        (errno.EACCES, ConfigError),  # a port below 1024 without the capability: the same at every start
        (socket.EAI_NONAME, ConfigError),  # a host name that does not exist
    ],
)
async def test_a_listener_that_may_work_a_moment_later_is_retried_and_one_that_cannot_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, code: int, error: type[Exception]
) -> None:
    async def refused(site: web.TCPSite) -> None:
        raise OSError(code, os.strerror(code) if code > 0 else "name resolution")

    monkeypatch.setattr(web.TCPSite, "start", refused)
    async with contextlib.AsyncExitStack() as stack:
        with pytest.raises(error, match=r"^admin\.host/admin\.port: cannot listen on 10\.0\.0\.7:8081: "):
            await lifecycle._listen(stack, web.Application(), "admin", "10.0.0.7", 8081)


async def test_an_address_not_on_this_host_is_retried() -> None:
    # A real bind (TEST-NET-1 is on no host): the errno the table above expects for a boot race is the kernel's.
    async with contextlib.AsyncExitStack() as stack:
        with pytest.raises(NotYetError, match=r"^ingest\.host/ingest\.port: cannot listen on 192\.0\.2\.1:8080: "):
            await lifecycle._listen(stack, web.Application(), "ingest", "192.0.2.1", 8080)


def test_a_limit_of_open_files_below_the_settings_need_stops_the_start_naming_them(tmp_path: Path) -> None:
    """`orderbus run` in a process that may open 300 files, with the ingest's default of 1024 connections: exit 2
    before anything is opened, naming the setting and the numbers (`daemon.open_files`)."""
    import resource
    import subprocess

    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("ORDERBUS_")},
        "ORDERBUS_STATE_DIR": str(tmp_path / "state"),
        "ORDERBUS_INGEST__ALLOW_UNSIGNED": "true",
        "ORDERBUS_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)),
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "ingest.max_connections: the daemon may hold 1408 files and connections at once" in done.stderr
    assert "this process may open 300 (ulimit -Hn; LimitNOFILE=" in done.stderr
    assert not (tmp_path / "state").exists()  # nothing was opened
