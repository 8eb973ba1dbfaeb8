"""The command line's plumbing that every command shares."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiokafka.conn import AIOKafkaConnection

from consumers.deadletter import DeadLetter, read_headers
from consumers.dedup import SqliteDedupStore
from daemon import cli, dlq, kafka_local, status
from daemon.dlq import DeadLetterView
from daemon.kafka_local import REPO_ROOT, BrokerState
from daemon.retention import dedup_path
from daemon.settings import ApiKeyAuthSettings, BearerAuthSettings, OAuth2Settings, Settings
from topics.errors import ConfigError


def test_every_command_runs_with_kafka_connection_writes_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    # The guard is process-wide and once applied stays: start this test from aiokafka's own method.
    monkeypatch.setattr(
        AIOKafkaConnection, "send", getattr(AIOKafkaConnection.send, "__wrapped__", None) or AIOKafkaConnection.send
    )
    assert not getattr(AIOKafkaConnection.send, "_orderbus_guarded", False)

    async def guarded_while_running() -> bool:
        return bool(getattr(AIOKafkaConnection.send, "_orderbus_guarded", False))

    assert cli._run_async(guarded_while_running())


SYSTEMD_CONFIG = REPO_ROOT / "deploy" / "systemd" / "orderbus.toml"


def test_operator_commands_need_no_sink_secrets(
    no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: `dlq list` and `status` with the systemd config exited 2 with
    # "sinks.crm.auth.bearer.token: Field required; ...client_secret...; ...key..." at the operator's shell.
    urls: list[str] = []

    def fetch_status(url: str, **_: object) -> dict[str, Any]:
        urls.append(url)
        return {"sinks": {}}

    async def read_dead_letters(settings: Settings, sink: str) -> list[DeadLetterView]:
        assert settings.sinks[sink].auth.type == "bearer"
        return []

    no_orderbus_env.setattr(status, "fetch_status", fetch_status)
    no_orderbus_env.setattr(dlq, "read_dead_letters", read_dead_letters)
    config = ["--config", str(SYSTEMD_CONFIG)]
    assert cli.main(["status", *config]) == 0
    assert urls == ["http://127.0.0.1:8081"], "the unit's config has an admin listener"
    assert cli.main(["dlq", "list", "--sink", "crm", *config]) == 0, capsys.readouterr().err


@pytest.fixture
def asked(no_orderbus_env: pytest.MonkeyPatch) -> list[str]:
    """The URLs `status` and `health` ask, in order; each answers as a daemon with no sink, alive."""
    urls: list[str] = []
    no_orderbus_env.setattr(status, "fetch_status", lambda url, **_: urls.append(url) or {"sinks": {}})  # type: ignore[func-returns-value]
    no_orderbus_env.setattr(status, "probe_health", lambda url, **_: urls.append(url) or (True, ["alive"]))  # type: ignore[func-returns-value]
    return urls


def test_status_and_health_need_no_kafka_password_the_kafka_commands_do(
    no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, asked: list[str]
) -> None:
    # They ask the daemon, not Kafka: an operator's shell on a host whose Kafka password is the unit's credential.
    config = tmp_path / "orderbus.toml"
    config.write_text(
        '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-512"\nsasl_username = "orderbus"\n'
        "[admin]\nport = 8081\n"
    )
    assert cli.main(["status", "--config", str(config)]) == 0
    assert cli.main(["health", "--config", str(config)]) == 0
    assert asked == ["http://127.0.0.1:8081"] * 2
    capsys.readouterr()
    assert cli.main(["topics", "show", "--config", str(config)]) == 2
    assert "needs sasl_password" in capsys.readouterr().err


def test_status_and_health_read_only_where_the_daemon_listens(
    no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, asked: list[str]
) -> None:
    # Review (operator): an edit not yet applied (a typo in a sink's rate) made the container's health check call
    # the running daemon dead, which runs with the settings it started with.
    config = tmp_path / "orderbus.toml"
    config.write_text(
        '[kafka]\nsession_timeout = 1\n[sinks.crm]\nenabled = true\nrate = "fast"\n'
        '[ingest]\nport = 9292\nmax_body_bytes = "big"\n[admin]\nport = 8081\n'
    )
    assert cli.main(["health", "--config", str(config)]) == 0
    assert cli.main(["status", "--config", str(config)]) == 0
    assert asked == ["http://127.0.0.1:8081"] * 2
    assert cli.main(["config", "check", str(config)]) == 2, "the file is wrong all the same"
    assert "sinks.crm.rate" in capsys.readouterr().err
    config.write_text("[ingest]\nport = 9292\n[admin]\nport = 80801\n")  # where it listens: said, exit 1
    assert cli.main(["health", "--config", str(config)]) == 1
    assert "admin.port" in capsys.readouterr().err


def test_without_config_a_command_reads_orderbus_config_else_the_systems_file(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path, asked: list[str]
) -> None:
    # Review (operator): the runbooks' commands, run as written on a systemd host, read the built-in defaults
    # (Kafka at 127.0.0.1:9092, no sinks) and failed or showed nothing.
    system = tmp_path / "orderbus.toml"
    assert cli.default_config({}, system) is None, "no file: the built-in defaults"
    system.write_text("")
    assert cli.default_config({}, system) == system
    assert cli.default_config({"ORDERBUS_CONFIG": "/srv/ob.toml"}, system) == Path("/srv/ob.toml")
    assert cli.default_config({"ORDERBUS_CONFIG": ""}, system) is None, "set empty: the built-in defaults"
    named, given = tmp_path / "named.toml", tmp_path / "given.toml"
    named.write_text("[ingest]\nport = 9292\n")
    given.write_text("[ingest]\nport = 9191\n")
    no_orderbus_env.setenv("ORDERBUS_CONFIG", str(named))
    assert cli.main(["status"]) == 0
    assert cli.main(["status", "--config", str(given)]) == 0
    assert asked == ["http://127.0.0.1:9292", "http://127.0.0.1:9191"]


def test_status_asks_the_admin_listener_when_the_settings_have_one(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path, asked: list[str]
) -> None:
    for n, text in enumerate(
        [
            '[ingest]\nhost = "0.0.0.0"\nport = 8080\n[admin]\nport = 9464\n',
            '[ingest]\nhost = "0.0.0.0"\n[admin]\nhost = "::1"\nport = 9464\n',
            '[ingest]\nhost = "::1"\nport = 8081\n',
        ]
    ):
        config = tmp_path / f"{n}.toml"
        config.write_text(text)
        assert cli.main(["status", "--config", str(config)]) == 0
    assert asked == ["http://127.0.0.1:9464", "http://[::1]:9464", "http://[::1]:8081"]


def test_config_check_refuses_an_ingest_without_secrets_and_status_does_not_need_them(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "orderbus.toml"
    config.write_text("[ingest]\nport = 8089\n")
    assert cli.main(["config", "check", str(config)]) == 2
    assert "ingest.webhook_secrets: none given" in capsys.readouterr().err
    no_orderbus_env.setattr(status, "fetch_status", lambda url, **_: {"sinks": {}})
    assert cli.main(["status", "--config", str(config)]) == 0, "an operator's command runs no ingest"
    config.write_text("[ingest]\nport = 8089\nallow_unsigned = true\n")
    assert cli.main(["config", "check", str(config)]) == 0


def test_config_check_warns_of_what_the_settings_leave_open(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "orderbus.toml"
    config.write_text(
        '[ingest]\nallow_unsigned = true\n[sinks.crm]\nenabled = true\nbase_url = "https://crm.example.test"\n'
        "tls_verify = false\n"
    )
    assert cli.main(["config", "check", str(config)]) == 0
    assert "warning: sinks.crm.tls_verify = false: neither the system's certificate" in capsys.readouterr().err


def test_config_check_without_a_file_checks_the_environments_settings(
    no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Review (operator): a container configured by ORDERBUS_* variables alone had to name /dev/null to check them.
    no_orderbus_env.setenv("ORDERBUS_INGEST__ALLOW_UNSIGNED", "true")
    no_orderbus_env.setenv("ORDERBUS_INGEST__PORT", "8123")
    assert cli.main(["config", "check"]) == 0
    assert '"port": 8123' in capsys.readouterr().out
    no_orderbus_env.setenv("ORDERBUS_INGEST__PORT", "http")
    assert cli.main(["config", "check"]) == 2
    assert "ingest.port" in capsys.readouterr().err


class Unsearchable(type(Path())):  # type: ignore[misc]
    def is_file(self) -> bool:
        raise PermissionError(13, "Permission denied")


def test_a_system_config_that_cannot_be_looked_for_is_a_settings_error_not_a_traceback(
    no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Review: a hardened /etc/orderbus (0700) made every command, --help included, end in a PermissionError.
    hidden = Unsearchable("/etc/orderbus/orderbus.toml")
    with pytest.raises(ConfigError, match=r"cannot look for /etc/orderbus/orderbus\.toml: Permission denied; give"):
        cli.default_config({}, hidden)
    no_orderbus_env.delenv("ORDERBUS_CONFIG")
    no_orderbus_env.setattr(cli, "SYSTEM_CONFIG", hidden)
    assert cli.main(["kafka", "status", "--data-dir", "/nonexistent"]) in (0, 1), "loads no settings: never looks"
    assert cli.main(["status"]) == 2
    assert "cannot look for /etc/orderbus/orderbus.toml" in capsys.readouterr().err


def test_reconcile_needs_the_secret_of_the_sink_it_asks_only(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ["--config", str(SYSTEMD_CONFIG)]
    assert cli.main(["reconcile", "--sink", "crm", *config]) == 2
    err = capsys.readouterr().err
    assert "sinks.crm.auth.token: not given, and this command asks the system with it" in err
    assert "ORDERBUS_SINKS__CRM__AUTH__TOKEN_FILE" in err
    token = tmp_path / "crm-token"
    token.write_text("the-crm-token\n")
    no_orderbus_env.setenv("ORDERBUS_SINKS__CRM__AUTH__TOKEN_FILE", str(token))
    no_orderbus_env.setenv("ORDERBUS_STATE_DIR", str(tmp_path))  # no state file: said, after the secrets passed
    assert cli.main(["reconcile", "--sink", "crm", *config]) == 1
    assert "no delivery-state file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("document", "code"),
    [
        ({"sinks": {}, "not_ready": {}, "degraded": {}}, 0),
        ({"sinks": {}, "not_ready": {"ingest": "kafka is unreachable"}, "degraded": {}}, 1),
        ({"sinks": {}, "not_ready": {}, "degraded": {"sink.crm": "circuit open"}}, 1),
    ],
)
def test_status_exits_1_when_anything_is_not_ready_or_degraded(
    document: dict[str, Any], code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(status, "fetch_status", lambda url, **_: document)
    assert cli.main(["status", "--url", "http://127.0.0.1:8080"]) == code
    assert ("DEGRADED sink.crm: circuit open" in capsys.readouterr().out) == bool(document["degraded"])


def test_operator_settings_fill_only_the_missing_sink_secrets_with_a_marker(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = tmp_path / "crm-token"
    token.write_text("the-crm-token\n")
    no_orderbus_env.setenv("ORDERBUS_SINKS__CRM__AUTH__TOKEN_FILE", str(token))
    settings = cli._operator_settings(argparse.Namespace(config=SYSTEMD_CONFIG))
    auths = {name: sink.auth for name, sink in settings.sinks.items()}
    assert isinstance(auths["crm"], BearerAuthSettings)
    assert auths["crm"].token.get_secret_value() == "the-crm-token"
    assert isinstance(auths["accounting"], OAuth2Settings)
    assert auths["accounting"].client_secret.get_secret_value() == cli.SECRET_NOT_LOADED
    assert isinstance(auths["shipping"], ApiKeyAuthSettings)
    assert auths["shipping"].key.get_secret_value() == cli.SECRET_NOT_LOADED


def test_operator_settings_still_check_a_secret_that_is_given_and_everything_else(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "crm-token"
    empty.write_text("\n")
    no_orderbus_env.setenv("ORDERBUS_SINKS__CRM__AUTH__TOKEN_FILE", str(empty))
    no_orderbus_env.setenv("ORDERBUS_INGEST__PORT", "99999")
    with pytest.raises(ConfigError) as caught:
        cli._operator_settings(argparse.Namespace(config=SYSTEMD_CONFIG))
    assert "sinks.crm.auth: token must not be empty" in str(caught.value)
    assert "ingest.port" in str(caught.value)
    assert "set by ORDERBUS_INGEST__PORT" in str(caught.value)


def test_the_daemon_and_config_check_still_require_every_sink_secret(
    no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["config", "check", str(SYSTEMD_CONFIG)]) == 2
    # The key one can set (not pydantic's union tag, sinks.crm.auth.bearer.token), and where a secret comes from.
    hint = "(in the file, or ORDERBUS_SINKS__CRM__AUTH__TOKEN_FILE)"
    assert f"sinks.crm.auth.token: Field required {hint}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"sinks\.shipping\.auth\.key: Field required"):
        cli._settings(argparse.Namespace(config=SYSTEMD_CONFIG))


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["replay", "--position", "abc"], "argument --position: 'abc' is not PARTITION:OFFSET"),
        (["replay", "--reason", "rejectd"], "argument --reason: invalid choice: 'rejectd' (choose from 'invalid', "),
        (["show", "garbage"], "argument position: 'garbage' is not PARTITION:OFFSET"),
    ],
)
def test_a_malformed_dlq_selector_is_bad_usage(argv: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["dlq", *argv, "--sink", "crm"])
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(
    ("selector", "said"),
    [
        (["--position", "0:99999"], "no dead letter at 0:99999 in sink crm"),
        (["--order", "NOPE"], "no dead letter of sink crm matches --order NOPE"),
        (["--reason", "invalid"], "no dead letter of sink crm matches --reason invalid"),
    ],
)
def test_a_replay_that_finds_nothing_fails_and_sends_nothing(
    no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], selector: list[str], said: str
) -> None:
    # Regression: each of these printed "0 dead letter(s) sent back" and exited 0.
    headers = DeadLetter("crm", "rejected", "bad-request", "orders", 3, 500, b"SO-1", b"{}").record_headers()
    letter = DeadLetterView(0, 10, 1_800_000_000_000, b"SO-1", b"{}", headers, read_headers(headers))
    sent: list[DeadLetterView] = []

    async def read_dead_letters(settings: Settings, sink: str) -> list[DeadLetterView]:
        return [letter]

    async def replay(settings: Settings, sink: str, letters: list[DeadLetterView]) -> int:
        sent.extend(letters)
        return len(letters)

    no_orderbus_env.setattr(dlq, "read_dead_letters", read_dead_letters)
    no_orderbus_env.setattr(dlq, "replay", replay)
    assert cli.main(["dlq", "replay", "--sink", "crm", *selector]) == 1
    assert said in capsys.readouterr().err
    assert sent == []
    assert cli.main(["dlq", "replay", "--sink", "crm", "--position", "0:10"]) == 0
    assert sent == [letter]


@pytest.mark.parametrize("hours", ["-100", "nan", "0"])
def test_dedup_prune_refuses_a_retention_below_the_least_of_the_settings(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], hours: str
) -> None:
    # Regression: `--older-than-hours -100` pruned every delivery state and ingest key; `nan` was accepted.
    no_orderbus_env.setenv("ORDERBUS_STATE_DIR", str(tmp_path))
    assert cli.main(["dedup", "prune", "--older-than-hours", hours]) == 2
    assert "--older-than-hours: a number of hours, at least 1" in capsys.readouterr().err


def test_dedup_prune_says_the_ingest_keys_keep_their_least(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_orderbus_env.setenv("ORDERBUS_STATE_DIR", str(tmp_path))
    assert cli.main(["dedup", "prune", "--older-than-hours", "2"]) == 0, "a host that has delivered nothing yet"
    err = capsys.readouterr().err
    assert "ingest keys are kept for at least 24 hours" in err
    # Review (operator): with the wrong state_dir it printed nothing and exited 0, as if nothing were old.
    assert f"orderbus: no state files in {tmp_path} (sinks in the settings: crm, accounting, shipping)" in err
    no_orderbus_env.setenv("ORDERBUS_SINKS__CRM__ENABLED", "true")
    no_orderbus_env.setenv("ORDERBUS_SINKS__CRM__BASE_URL", "http://crm.test")
    no_orderbus_env.setenv("ORDERBUS_STATE_DIR", str(tmp_path / "elsewhere"))
    assert cli.main(["dedup", "prune"]) == 1, "no such directory: the wrong settings"
    assert f"no state files in {tmp_path / 'elsewhere'}" in capsys.readouterr().err
    no_orderbus_env.setenv("ORDERBUS_STATE_DIR", str(tmp_path))
    asyncio.run(_open_and_close(SqliteDedupStore(dedup_path(tmp_path, "crm"))))
    assert cli.main(["dedup", "prune", "--older-than-hours", "2"]) == 0
    assert capsys.readouterr().out == "dedup-crm: 0 row(s) pruned\n"


async def _open_and_close(store: SqliteDedupStore) -> None:
    async with store:
        pass


@pytest.mark.parametrize(
    "argv", [["demo", "--kafka-port", "70000"], ["demo", "--ingest-port", "x"], ["kafka", "start", "--port", "-1"]]
)
def test_a_port_option_out_of_range_is_named_as_the_option(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Review (operator): `demo --kafka-port 70000` blamed ORDERBUS_KAFKA__BOOTSTRAP_SERVERS, which nobody had set.
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-2]}: {argv[-1]!r} is not a TCP port (1-65535)" in err


@pytest.mark.parametrize("action", ["stop", "kill"])
def test_kafka_stop_and_kill_say_when_no_broker_was_running(
    action: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: `kafka kill` printed "kafka killed" where `kafka status` said "not running (last on ...)".
    state = BrokerState(cluster_id="abc", port=4000, controller_port=4001, pid=os.getpid())  # a pid, not a broker
    (tmp_path / kafka_local.STATE_FILE).write_text(state.to_json())
    assert cli.main(["kafka", action, "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "kafka was not running\n"


def test_a_run_that_fails_ends_with_a_json_line_naming_the_problem(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Review (operator): the daemon's last line before it died was plain text (`orderbus: ...`), or a traceback line
    # by line, among JSON lines a container's log collector parses.
    (tmp_path / "a-file").write_text("")
    config = tmp_path / "orderbus.toml"
    config.write_text(f'state_dir = "{tmp_path}/a-file/state"\n[ingest]\nallow_unsigned = true\nport = 0\n')
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ORDERBUS_CONFIG": ""},
        check=False,
    )
    assert done.returncode == 2
    events = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    assert events[-1]["level"] == "critical"
    assert events[-1]["msg"].startswith("stopped: state_dir: cannot create")
    assert events[-1]["exit_code"] == 2


@pytest.mark.parametrize(
    ("outcomes", "unknown", "code"),
    [
        (["sent"], False, 0),
        (["sent", "skipped"], False, 1),
        (["sent"], True, 1),
        (["sent, then replay"], False, 1),  # resent ahead of dead letters the operator replays next
    ],
)
def test_reconcile_resend_exits_0_only_when_nothing_is_left_to_do(
    outcomes: list[str], unknown: bool, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from daemon import resend as resend_module
    from daemon.reconcile import Checked, Delivered, Run
    from daemon.resend import Resent, resend_event
    from topics.samples import sample_event

    lost = [Delivered(f"SO-{i}", f"acc-{i}", 1.0) for i in range(len(outcomes))]
    run = Run(lost)
    run.found = {i: Checked(order, "missing", "HTTP 404") for i, order in enumerate(lost)}
    if unknown:
        run.found[len(lost)] = Checked(Delivered("SO-9", None, 1.0), "unknown", "HTTP 503, 4 tries")

    async def resend(settings: Settings, sink: str, orders: list[Delivered]) -> list[Resent]:
        assert [order.order_number for order in orders] == [order.order_number for order in lost]
        made = []
        for order, outcome in zip(orders, outcomes, strict=True):
            newest = sample_event(random.Random(1), order_number=order.order_number)
            if outcome == "skipped":
                made.append(Resent(order, skipped="its newest event is its cancel"))
            else:
                then = "then replay its dead letters" if "replay" in outcome else ""
                made.append(Resent(order, resend_event("accounting", newest, order), of=newest, then=then))
        return made

    monkeypatch.setattr(resend_module, "resend", resend)
    assert cli._resend(Settings(), "accounting", run) == code
    out = capsys.readouterr().out
    sent = sum(1 for outcome in outcomes if outcome != "skipped")
    assert out.startswith(f"resent {sent} order(s) to orders.replay.accounting as creates")
    assert ("not resent:\n  SO-1: its newest event is its cancel" in out) == ("skipped" in outcomes)


def test_topics_acls_grants_the_sasl_user_by_default_and_asks_whom_without_one(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "orderbus.toml"
    config.write_text('[kafka]\nbootstrap_servers = "k1:9093"\n[ingest]\nallow_unsigned = true\n')
    assert cli.main(["topics", "acls", "--config", str(config)]) == 2
    assert "--principal: whom to grant them to (User:NAME)" in capsys.readouterr().err
    subject = "User:CN=orderbus,O=Shop Ltd"  # a certificate's subject: quoted for the shell
    assert cli.main(["topics", "acls", "--config", str(config), "--principal", subject]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == (
        "kafka-acls.sh --bootstrap-server k1:9093 --add --allow-principal 'User:CN=orderbus,O=Shop Ltd' --operation "
        "Write --topic orders   # the ingest publishes orders"
    )
    sasl = '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n'
    sasl += 'sasl_username = "svc"\nsasl_password = "x"\n'
    config.write_text(sasl + '[ingest]\nenabled = false\n[sinks.crm]\nenabled = true\nbase_url = "https://c.test"\n')
    assert cli.main(["topics", "acls", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "for User:svc" in lines[0]
    commands = [line for line in lines if line.startswith("kafka-acls.sh")]
    assert [line.split(" --topic ")[-1].split(" --group ")[-1].split()[0] for line in commands] == [
        "orders", "orders.dlq.crm", "orders.replay.crm", "orders.state.crm", "orderbus.crm"
    ]  # fmt: skip


async def test_a_stop_signal_is_said_as_it_arrives_not_after_the_drain(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Review (operator): "stopping" came with "stopped", after a drain of up to shutdown_grace and the commits.
    from daemon import lifecycle

    said_during_drain: list[str] = []

    async def serve(settings: Settings, stop: asyncio.Event, **_: object) -> None:
        await stop.wait()
        said_during_drain.extend(r.getMessage() for r in caplog.records)

    monkeypatch.setattr(lifecycle, "serve", serve)
    with caplog.at_level(logging.INFO, "daemon.cli"):
        serving = asyncio.create_task(cli._serve_until_signal(Settings()))
        await asyncio.sleep(0)  # the handlers are in place
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 5) == 0
    assert said_during_drain == ["SIGTERM received: stopping (draining the deliveries under way, then committing)"]


@pytest.mark.parametrize("argv", [["dlq", "list", "--sink", "crm"], ["trace", "SO-1"]])
def test_with_kafka_away_the_operator_commands_say_why_in_one_line(
    no_orderbus_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    # Review (operator): `dlq list` printed aiokafka's own "Unable connect" line, then `cannot describe topics
    # orders.replay.crm: KafkaConnectionError("Unable to bootstrap ...")`, where `topics apply` names the cause.
    port = kafka_local.free_ports(1)[0]  # nothing listens there
    no_orderbus_env.setenv("ORDERBUS_KAFKA__BOOTSTRAP_SERVERS", f"127.0.0.1:{port}")
    no_orderbus_env.setenv("ORDERBUS_SINKS__CRM", '{"enabled": true, "base_url": "https://crm.example.test"}')
    assert cli.main(argv) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"orderbus: cannot describe topics at 127.0.0.1:{port}: connection refused"), line


def test_config_check_warns_of_a_state_dir_the_daemon_could_not_make(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Review (operator): `config check` passed, then `run` stopped with exit 2 (systemd does not restart it).
    config = tmp_path / "orderbus.toml"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for state_dir, said in (
        (blocker / "state", f"warning: state_dir: {blocker} is not a directory"),
        (tmp_path / "fine" / "state", None),
    ):
        config.write_text(f'state_dir = "{state_dir}"\n[ingest]\nallow_unsigned = true\n')
        assert cli.main(["config", "check", str(config)]) == 0, "a warning: the service's user may differ"
        warned = [line for line in capsys.readouterr().err.splitlines() if "state_dir" in line]
        assert warned == ([f"{said} (as this user; the service's own user may differ)"] if said else [])
    assert not (tmp_path / "fine").exists(), "checked, not made"


def test_a_reconcile_terminated_still_reports_what_it_asked(
    no_orderbus_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Review (operator): under `timeout`, a SIGTERM ended it without the report that Ctrl-C gives.
    from daemon import reconcile
    from daemon.reconcile import Checked, Delivered, Run

    asked = Delivered("SO-1", "crm-1", 1.0)
    run = Run([asked, Delivered("SO-2", "crm-2", 1.0)])

    async def reconciling(*_: object, **__: object) -> None:
        run.found[0] = Checked(asked, "present", "HTTP 200")
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.Event().wait()  # until the signal ends it

    no_orderbus_env.setattr(reconcile, "prepare", lambda *_, **__: run)
    no_orderbus_env.setattr(reconcile, "reconcile", reconciling)
    token = tmp_path / "crm-token"
    token.write_text("the-crm-token\n")
    no_orderbus_env.setenv("ORDERBUS_SINKS__CRM__AUTH__TOKEN_FILE", str(token))
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["reconcile", "--sink", "crm", "--config", str(SYSTEMD_CONFIG)]) == 143
    captured = capsys.readouterr()
    assert "orderbus: terminated; what was asked so far:" in captured.err
    assert "2 order(s) delivered from this host since" in captured.out
    assert "; 1 asked\n  present  1\n" in captured.out
    assert signal.getsignal(signal.SIGTERM) == before, "the handler is given back"
