"""The ``orderbus`` command line.

    orderbus run [--config FILE]              the daemon: the webhook ingest and the enabled sinks
    orderbus demo [--rate N] [--duration S]   make run: Kafka, sandbox systems, the daemon, orders, a live view
    orderbus config check FILE                validate a config file, print the effective settings (masked)
    orderbus topics apply [--config FILE]     create missing topics, report drift, delete nothing
    orderbus topics show [--config FILE]      print the newest records of the orders topic
    orderbus topics acls [--config FILE] [--principal User:NAME]    kafka-acls.sh commands the daemon needs
    orderbus kafka fetch|start|stop|status|kill [--data-dir DIR]    the local Apache Kafka broker
    orderbus webhook sign [--config FILE] BODY                      Standard Webhooks headers for a body
    orderbus webhook check [--record] BODY                          a body against the order contract, offline
    orderbus dlq list|show|replay --sink SINK [--config FILE]       dead letters: inspect, send back to one sink
    orderbus status [--config FILE | --url URL]                     a running daemon's sinks at a glance
    orderbus trace ORDER [--config FILE]                            one order's events and what became of each
    orderbus dedup prune [--config FILE] [--older-than-hours H]     forget old delivery states now
    orderbus reconcile --sink SINK [--config FILE] [--since-hours H] [--concurrency N] [--rate R] [--resend]
                                                                    does a system still have what it was sent?
                                                                    (--resend: send it what it lost again)

Exit codes: 0 done, 1 failed (`trace`: no record of the order; `webhook check`: the body is invalid; `reconcile`:
an order missing or unknown, or no verdict for 10 in a row; with ``--resend``, an order unknown, not resent, or
resent with its dead letters to replay), 2
bad usage or bad configuration (`reconcile`: the credentials or the certificate refused), 3 drift found with
``--strict``, 130 interrupted, 143 terminated (`reconcile`, after its report so far).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args

from pydantic import SecretStr

from consumers.deadletter import REASONS
from daemon import kafka_local
from daemon.kafka_certificate import kafka_certificate_end
from daemon.kafka_options import client_options, topic_layout
from daemon.logs import configure
from daemon.order_check import MAX_BODY_BYTES
from daemon.retention import MIN_DEDUP_RETENTION_HOURS, MIN_INGEST_KEY_RETENTION_HOURS
from daemon.settings import RECONCILE_RATE, AuthSettings, Settings, load_settings, only_listeners
from daemon.signature import sign
from daemon.tls_listener import server_tls
from topics.catalogue import catalogue
from topics.errors import BrokerError, ConfigError, NotYetError, OrderbusError

if TYPE_CHECKING:
    from daemon.reconcile import Run

T = TypeVar("T")
log = logging.getLogger("daemon.cli")

DEMO_CONFIG = kafka_local.REPO_ROOT / "deploy" / "dev" / "orderbus.toml"
DEMO_KAFKA_DIR = kafka_local.REPO_ROOT / ".run" / "kafka"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A one-shot command says itself what failed (with Kafka away: why, `topics.broker_diagnosis`); aiokafka's own
    # ERROR lines reached the terminal through logging's last resort. `run` configures logging as a daemon's.
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)
    try:
        result: int = args.func(args)
    except BrokenPipeError:
        # `orderbus dlq list | head`: the reader went away; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    except OrderbusError as exc:
        print(f"orderbus: {exc}", file=sys.stderr)
        return _exit_code(exc)
    finally:
        if aiokafka_log.level == logging.CRITICAL:  # unless `run` configured it since
            aiokafka_log.setLevel(level)
    return result


def _exit_code(exc: OrderbusError) -> int:
    """2 for a bad setting or usage (a restart would fail the same way), 1 for anything else that failed."""
    return 2 if isinstance(exc, ConfigError) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orderbus", description="Orders to every system, exactly once in effect.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon")
    _config_option(run)
    run.set_defaults(func=_run)

    demo = commands.add_parser(
        "demo", help="the whole flow on this machine: Kafka, sandbox systems, the daemon, orders, a live view"
    )
    _config_option(demo, default=DEMO_CONFIG)
    demo.add_argument("--kafka-dir", type=Path, default=DEMO_KAFKA_DIR, help="data dir of the local broker")
    demo.add_argument("--log-dir", type=Path, default=DEMO_KAFKA_DIR.parent, help="orderbus.log and sandbox.log")
    demo.add_argument("--faults", type=Path, help="how the sandbox systems misbehave (deploy/dev/sandbox-faults.json)")
    demo.add_argument("--rate", type=float, default=20.0, help="orders per second the generator posts (20)")
    demo.add_argument("--duration", type=float, metavar="SECONDS", help="stop by itself after sending that long")
    for name, where in (("kafka", "the local broker"), ("sandbox", "the sandbox systems"), ("ingest", "the webhook")):
        demo.add_argument(f"--{name}-port", type=_port, help=f"port of {where} (default: from the config)")
    demo.set_defaults(func=_demo)

    config = commands.add_parser("config", help="configuration").add_subparsers(required=True, metavar="ACTION")
    check = config.add_parser("check", help="validate FILE and print the effective settings, secrets masked")
    check.add_argument(
        "config",  # `_config_path`'s, as --config is the other commands'
        metavar="FILE",
        type=Path,
        nargs="?",
        help="the settings file (default: $ORDERBUS_CONFIG, else /etc/orderbus/orderbus.toml if it exists, else the "
        "built-in defaults: settings given by ORDERBUS_* variables alone)",
    )
    check.add_argument(
        "--connect",
        action="store_true",
        help="also reach Kafka as run would: why it cannot be, or which topics are missing (exit 1)",
    )
    check.set_defaults(func=_config_check)

    topics = commands.add_parser("topics", help="the topic catalogue").add_subparsers(required=True, metavar="ACTION")
    apply = topics.add_parser("apply", help="create missing topics and report drift; deletes nothing")
    _config_option(apply)
    apply.add_argument("--strict", action="store_true", help="exit 3 when drift is found")
    apply.set_defaults(func=_topics_apply)
    acls = topics.add_parser("acls", help="print the kafka-acls.sh commands that grant the daemon what it needs")
    _config_option(acls)
    acls.add_argument(
        "--principal", help="whom to grant them to (User:NAME); default User:<kafka.sasl_username> with SASL"
    )
    acls.set_defaults(func=_topics_acls)
    show = topics.add_parser("show", help="print the newest records of the orders topic")
    _config_option(show)
    show.add_argument("--limit", type=int, default=10)
    show.add_argument("--full", action="store_true", help="print whole values (they hold personal data)")
    show.set_defaults(func=_topics_show)

    kafka = commands.add_parser("kafka", help="the local Apache Kafka broker for development and tests")
    kafka_actions = kafka.add_subparsers(required=True, metavar="ACTION")
    kafka_commands = (
        ("fetch", _kafka_fetch, "download the broker's jars from Maven Central (once)"),
        ("start", _kafka_start, "start the broker of --data-dir, or find it running"),
        ("stop", _kafka_stop, "stop it cleanly"),
        ("status", _kafka_status, "whether it runs and answers, and on which port"),
        ("kill", _kafka_kill, "SIGKILL it (tests of a broker crash)"),
    )
    for name, func, summary in kafka_commands:
        action = kafka_actions.add_parser(name, help=summary)
        action.add_argument("--data-dir", type=Path, default=DEMO_KAFKA_DIR)
        action.set_defaults(func=func)
        if name == "start":
            action.add_argument("--port", type=_port_or_0, default=0, help="broker port (0: free port or the last one)")
            action.add_argument("--controller-port", type=_port_or_0, default=0)

    status = commands.add_parser("status", help="per sink: lag, in flight, parked, circuit, dead letters")
    _config_option(status)
    status.add_argument(
        "--url", help="the daemon's base URL (default: admin.host/port in the settings, else ingest.host/port)"
    )
    status.add_argument("--json", action="store_true", help="print the raw status document")
    status.set_defaults(func=_status)

    health = commands.add_parser(
        "health", help="whether the daemon on this host is alive (/healthz), or ready (--ready): exit 0 or 1"
    )
    _config_option(health)
    health.add_argument("--url", help="the daemon's base URL (default: as for status)")
    health.add_argument("--ready", action="store_true", help="ask /readyz: Kafka, the key store, every sink")
    health.add_argument(
        "--component", help="ask /readyz for one part only: ingest, or sink.NAME (a webhook load balancer's question)"
    )
    health.add_argument("--timeout", type=_seconds, default=4.0, help="seconds to wait for the answer (4)")
    health.set_defaults(func=_health)

    dedup = commands.add_parser("dedup", help="the delivery-state files").add_subparsers(
        required=True, metavar="ACTION"
    )
    prune = dedup.add_parser("prune", help="forget delivery states and ingest keys past their retention now")
    _config_option(prune)
    prune.add_argument(
        "--older-than-hours",
        type=float,
        metavar="H",
        help=f"override the configured retentions: at least {MIN_DEDUP_RETENTION_HOURS:g} hour(s); the ingest keys "
        f"keep at least {MIN_INGEST_KEY_RETENTION_HOURS:g}",
    )
    prune.set_defaults(func=_dedup_prune)

    dlq = commands.add_parser("dlq", help="dead letters per sink").add_subparsers(required=True, metavar="ACTION")
    listing = dlq.add_parser(
        "list", help="one line per dead letter: where, order, reason, rule, status, attempts, replay state"
    )
    show_one = dlq.add_parser("show", help="one dead letter with its HTTP exchange and history")
    show_one.add_argument(
        "position", type=_position, help="PARTITION:OFFSET in the dead-letter topic, as `dlq list` prints it"
    )
    again = dlq.add_parser("replay", help="send dead letters back to their sink, with their idempotency keys")
    again.add_argument("--position", type=_position, action="append", default=[], help="PARTITION:OFFSET (repeatable)")
    again.add_argument("--all", action="store_true", help="every open dead letter of the sink")
    again.add_argument(
        "--again", action="store_true", help="with --reason, --order or --all: also those replayed before"
    )
    listing.add_argument("--open", action="store_true", help="only those not replayed yet (state=open)")
    for action, func in ((listing, _dlq_list), (show_one, _dlq_show), (again, _dlq_replay)):
        _config_option(action)
        action.add_argument("--sink", required=True, help="crm, accounting or shipping")
        action.set_defaults(func=func)
    for action in (listing, again):
        action.add_argument(
            "--reason", choices=REASONS, metavar="REASON", help=f"only this reason: {', '.join(REASONS)}"
        )
        action.add_argument("--order", help="only this order number")

    trace = commands.add_parser(
        "trace", help="one order's events and, per sink, what became of each: delivered, pending, dead-lettered"
    )
    _config_option(trace)
    trace.add_argument("order", metavar="ORDER", help="the order number, as the shop sent it")
    trace.add_argument(
        "--all-partitions",
        action="store_true",
        help="search every partition, not only the order's key's (for records a producer placed otherwise)",
    )
    trace.add_argument("--since-hours", type=_hours, metavar="H", help="only records of the last H hours")
    trace.set_defaults(func=_trace)

    recon = commands.add_parser(
        "reconcile", help="ask a system for each order delivered to it from this host lately: is it still there?"
    )
    _config_option(recon)
    recon.add_argument("--sink", required=True, help="the sink whose system to ask")
    recon.add_argument(
        "--since-hours", type=_hours, default=24.0, metavar="H", help="orders delivered in the last H hours (24)"
    )
    recon.add_argument("--concurrency", type=_concurrency, default=4, help="requests at once, 1-64 (4)")
    recon.add_argument("--rate", type=_rate, help=f"requests a second (the sink's rate, else {RECONCILE_RATE:g})")
    recon.add_argument(
        "--resend",
        action="store_true",
        help="send the orders found missing again, as creates of their newest state, through the sink's replay "
        "topic (the running daemon delivers them)",
    )
    recon.set_defaults(func=_reconcile)

    webhook = commands.add_parser("webhook", help="webhook helpers").add_subparsers(required=True, metavar="ACTION")
    signer = webhook.add_parser("sign", help="print Standard Webhooks headers for BODY (for curl -H @file)")
    _config_option(signer)
    signer.add_argument("body", type=Path, help="the body to sign, or - for standard input")
    signer.set_defaults(func=_webhook_sign)
    checker = webhook.add_parser(
        "check", help="check BODY against the order contract, offline: what the ingest would refuse, and why"
    )
    checker.add_argument("body", type=Path, help="a webhook body, or - for standard input")
    checker.add_argument(
        "--record", action="store_true", help="BODY is a record value for the orders topic (the event envelope)"
    )
    checker.add_argument(
        "--max-body-bytes", type=int, default=MAX_BODY_BYTES, metavar="N", help=f"the ingest's limit ({MAX_BODY_BYTES})"
    )
    checker.set_defaults(func=_webhook_check)
    return parser


def _position(text: str) -> str:
    from daemon.dlq import parse_position

    try:
        return parse_position(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# Where the packaged unit reads its settings (deploy/systemd/orderbus.service): the operator's commands on that host
# read the same file without being told (`default_config`).
SYSTEM_CONFIG = Path("/etc/orderbus/orderbus.toml")
CONFIG_VARIABLE = "ORDERBUS_CONFIG"


def default_config(env: Mapping[str, str] | None = None, system: Path | None = None) -> Path | None:
    """The settings file of a command run without ``--config``: ``$ORDERBUS_CONFIG`` (empty: none), else the
    system's file when there is one, else none (the built-in defaults). At 3 a.m. on a systemd host, `orderbus
    dlq list --sink crm` as the runbook writes it must ask the daemon's Kafka, not 127.0.0.1:9092."""
    env = os.environ if env is None else env
    system = SYSTEM_CONFIG if system is None else system
    named = env.get(CONFIG_VARIABLE)
    if named is not None:
        return Path(named) if named else None
    try:
        return system if system.is_file() else None
    except OSError as exc:  # a directory the operator may not search (a hardened /etc/orderbus)
        raise ConfigError(
            f"cannot look for {system}: {exc.strerror}; give --config FILE (or set {CONFIG_VARIABLE})"
        ) from None


def _config_option(parser: argparse.ArgumentParser, default: Path | None = None) -> None:
    """``--config``; without a `default`, `default_config` decides when the settings are loaded (`_config_path`),
    not when the parser is built: ``--help`` and the commands that load none never look at /etc."""
    fallback = "" if default else f"; default ${CONFIG_VARIABLE}, else {SYSTEM_CONFIG} if it exists, else built-in"
    parser.add_argument(
        "--config", type=Path, default=default, help=f"TOML settings file (ORDERBUS_* env on top){fallback}"
    )


def _config_path(args: argparse.Namespace) -> Path | None:
    """The settings file the command reads: ``--config``, else `default_config`'s."""
    given: Path | None = args.config
    return given if given is not None else default_config()


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(_config_path(args))


# What an operator command's settings hold for a sink secret it was not given. Those commands never build a sink
# or any other client of a downstream system, so nothing sends it; were one to, the system would refuse it.
SECRET_NOT_LOADED = "not-loaded:orderbus-operator-command"  # noqa: S105 -- a marker, not a credential


def _operator_settings(args: argparse.Namespace) -> Settings:
    """The settings for a command that never talks to the downstream systems (dlq, topics, dedup, webhook, trace).

    Validated as `load_settings` validates them, except that a sink secret no file nor variable gives is filled
    with `SECRET_NOT_LOADED`: on a systemd host the secrets are credentials only the unit can read, and an
    operator at the shell must not need them to list dead letters. A secret that is given is checked as usual.
    (`status` and `health` ask the daemon, and read only where it listens: `_daemon`.)
    """
    return load_settings(_config_path(args), complete=_fill_sink_secrets)


def _fill_sink_secrets(data: dict[str, Any]) -> None:
    """Give every sink secret that `data` (the raw settings document) lacks the value `SECRET_NOT_LOADED`."""
    sinks = data.get("sinks")
    for sink in sinks.values() if isinstance(sinks, dict) else ():
        auth = sink.get("auth") if isinstance(sink, dict) else None
        if isinstance(auth, dict) and isinstance(auth.get("type"), str):
            for name in _SINK_SECRETS.get(auth["type"], ()):
                auth.setdefault(name, SECRET_NOT_LOADED)


def _sink_secrets() -> dict[str, tuple[str, ...]]:
    """Per credential type (a sink's ``auth.type``), the names of its secrets, as `daemon.settings` declares them."""
    schemes = get_args(get_args(AuthSettings)[0])
    return {
        get_args(scheme.model_fields["type"].annotation)[0]: tuple(
            name for name, field in scheme.model_fields.items() if field.annotation is SecretStr
        )
        for scheme in schemes
    }


_SINK_SECRETS = _sink_secrets()


def _run(args: argparse.Namespace) -> int:
    path = _config_path(args)
    settings = load_settings(path)
    configure(settings.log_level)
    # From here on the daemon's end is a JSON line too, as every line before it: a container's log collector reads
    # JSON, and an error as plain text, or a traceback line by line, would be its last lines a reader can't parse.
    try:
        return _run_async(_serve_until_signal(settings, load=lambda: load_settings(path)))
    except OrderbusError as exc:
        code = _exit_code(exc)
        then = "; a service manager starts it again (exit 1)" if isinstance(exc, NotYetError) else ""
        log.critical("stopped: %s%s", exc, then, extra={"exit_code": code})
        return code
    except Exception:
        log.critical("stopped by an unexpected error", exc_info=True, extra={"exit_code": 1})
        return 1


def _demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo
    from daemon.demo_settings import DEMO_FAULTS, DemoOptions

    options = DemoOptions(
        config=args.config,
        faults=args.faults or DEMO_FAULTS,
        kafka_dir=args.kafka_dir,
        log_dir=args.log_dir,
        kafka_port=args.kafka_port,
        sandbox_port=args.sandbox_port,
        ingest_port=args.ingest_port,
        rate=args.rate,
        duration=args.duration,
    )
    return _run_async(run_demo(options))


async def _serve_until_signal(settings: Settings, *, load: Callable[[], Settings] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; a second SIGINT stops at once; SIGHUP re-reads the settings with `load`."""
    from daemon.lifecycle import serve

    stop = asyncio.Event()
    reload = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    if load is not None:
        loop.add_signal_handler(signal.SIGHUP, reload.set)

    def on_stop(name: str) -> None:
        # Said as it arrives: the drain that follows takes up to shutdown_grace and the commits, and the journal
        # showed nothing of it until "stopping" and "stopped" came together at its end.
        if not stop.is_set():
            log.info("%s received: stopping (draining the deliveries under way, then committing)", name)
        stop.set()

    def on_interrupt() -> None:
        if stop.is_set() and main_task is not None:
            log.warning("SIGINT again: stopping at once, without the drain")
            main_task.cancel()
        on_stop("SIGINT")

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        await serve(settings, stop, reload=reload if load is not None else None, load=load)
    except asyncio.CancelledError:
        return 130
    finally:
        if load is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
    return 0


def _run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine on uvloop (when installed), with aiokafka's connection writes guarded against
    uvloop's RuntimeError (`consumers.kafka_io.guard_connection_writes`) for every client the command builds: the
    daemon's, and the short-lived ones of `dlq replay`, `demo` and the topic tools."""
    from consumers.kafka_io import guard_connection_writes

    guard_connection_writes()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coroutine)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _config_check(args: argparse.Namespace) -> int:
    from daemon.lifecycle import state_dir_problem

    settings = _settings(args)
    settings.ingest.require_signatures()
    tls = server_tls(settings.ingest.tls_certfile, settings.ingest.tls_keyfile)  # the pair `run` would load
    options = client_options(settings.kafka)  # the Kafka client's certificate and CA, as `run` loads them
    print(settings.masked_json())
    for weakness in settings.weaknesses():
        print(f"warning: {weakness}", file=sys.stderr)
    if (settings.ingest.enabled or settings.enabled_sinks()) and (problem := state_dir_problem(settings.state_dir)):
        # A warning: the service may run as another user (systemd's DynamicUser= and StateDirectory= make it).
        print(f"warning: {problem} (as this user; the service's own user may differ)", file=sys.stderr)
    for end in (tls.end if tls is not None else None, kafka_certificate_end(settings.kafka)):
        if end is not None and (problem := end.problem(time.time())) is not None:
            print(f"warning: {problem}", file=sys.stderr)
    return _check_connection(settings, options) if args.connect else 0


def _check_connection(settings: Settings, options: dict[str, Any]) -> int:
    """`config check --connect`: Kafka reached with these settings, and the topics `run` needs there."""
    from daemon.lifecycle import check_topics, replay_partition_notes

    try:
        _run_async(check_topics(settings, options))
    except (BrokerError, ConfigError) as exc:  # unreachable (and why), or topics missing: not the settings' fault
        print(f"kafka: {exc}", file=sys.stderr)
        return 1
    print(f"kafka: reached at {settings.kafka.bootstrap_servers}; every topic run needs is there", file=sys.stderr)
    for note in _run_async(replay_partition_notes(settings, options)):
        print(f"warning: {note}", file=sys.stderr)
    return 0


def _topics_apply(args: argparse.Namespace) -> int:
    from topics.admin import apply_catalogue

    settings = _operator_settings(args)
    specs = catalogue(topic_layout(settings.topics))
    report = _run_async(apply_catalogue(specs, client_options(settings.kafka)))
    for name in report.created:
        print(f"created   {name}")
    for name in report.unchanged:
        print(f"ok        {name}")
    for name, before, after in report.grown:
        print(f"grown     {name}: {before} -> {after} partitions, as many as the orders topic")
    for drift in report.drift:
        print(f"DRIFT     {drift}")
    if report.drift:
        print("drift is reported, never changed: fix the topic or the settings by hand", file=sys.stderr)
        return 3 if args.strict else 0
    return 0


def _topics_acls(args: argparse.Namespace) -> int:
    from topics.acls import daemon_acls, kafka_acls_command

    settings = _operator_settings(args)
    kafka = settings.kafka
    principal = args.principal or (f"User:{kafka.sasl_username}" if kafka.sasl_username else None)
    if principal is None:
        raise ConfigError(
            "--principal: whom to grant them to (User:NAME); without SASL, a client certificate's principal is its "
            "subject as the brokers' ssl.principal.mapping.rules map it (User:CN=orderbus,... by default)"
        )
    sinks = list(settings.enabled_sinks())
    acls = daemon_acls(settings.topics.prefix, sinks, ingest=settings.ingest.enabled)
    parts = [*(["the ingest"] if settings.ingest.enabled else []), *(f"sink {name}" for name in sinks)]
    if not acls:
        print("# these settings enable neither the ingest nor a sink: the daemon needs no ACL")
        return 0
    print(f"# What the daemon of these settings ({', '.join(parts)}) needs, for {principal}; run as a Kafka admin")
    print("# (--command-config FILE with the admin's credentials). Before Kafka 3.0, its idempotent producers (the")
    print("# ingest's, the sinks' dead letters') also need, on the cluster:")
    print(f"#   --add --allow-principal {shlex.quote(principal)} --operation IdempotentWrite --cluster")
    for acl in acls:
        print(f"{kafka_acls_command(acl, principal, kafka.bootstrap_servers)}   # {acl.why}")
    return 0


def _topics_show(args: argparse.Namespace) -> int:
    from daemon.inspect import show_orders

    settings = _operator_settings(args)
    for line in _run_async(show_orders(settings, limit=args.limit, full=args.full)):
        print(line)
    return 0


def _kafka_fetch(args: argparse.Namespace) -> int:
    libs = kafka_local.fetch_jars(log=lambda line: print(line, file=sys.stderr))
    print(libs)
    return 0


def _kafka_start(args: argparse.Namespace) -> int:
    info = kafka_local.start(args.data_dir, port=args.port, controller_port=args.controller_port)
    print(f"kafka {kafka_local.KAFKA_VERSION} running: bootstrap {info.bootstrap}, pid {info.pid}, log {info.log_file}")
    return 0


def _kafka_stop(args: argparse.Namespace) -> int:
    stopped = kafka_local.stop(args.data_dir)
    print("kafka stopped" if stopped else "kafka was not running")
    return 0


def _kafka_kill(args: argparse.Namespace) -> int:
    killed = kafka_local.kill(args.data_dir)
    print("kafka killed" if killed else "kafka was not running")
    return 0


def _kafka_status(args: argparse.Namespace) -> int:
    state = kafka_local.status(args.data_dir)
    print(state.detail)
    return 0 if state.answering else 1


def _status(args: argparse.Namespace) -> int:
    from daemon.status import fetch_status, render_status

    url, certificate = _daemon(args)
    document = fetch_status(url, pinned=certificate)
    print(json.dumps(document, indent=2) if args.json else render_status(document))
    return 0 if not (document.get("not_ready") or document.get("degraded")) else 1


def _health(args: argparse.Namespace) -> int:
    from daemon.status import probe_health

    try:
        url, certificate = _daemon(args)
        # Alive whichever certificate the listener shows: one renewed on disk and not reloaded yet is not a death.
        healthy, lines = probe_health(
            url, component=args.component, ready=args.ready, timeout=args.timeout, verify=certificate is None
        )
    except OrderbusError as exc:
        print(f"orderbus: {exc}", file=sys.stderr)
        return 1  # not 2 (a bad setting): a container health check's statuses are 0 and 1, 2 is reserved
    print("\n".join(lines))
    return 0 if healthy else 1


def _daemon(args: argparse.Namespace) -> tuple[str, Path | None]:
    """Where `status` and `health` ask the daemon on this host: ``--url``, else the settings' `admin_url`, and the
    certificate that listener shows when it is the webhook's over HTTPS.

    Of the settings only the listeners' keys are read (`daemon.settings.only_listeners`): the daemon runs with the
    settings it started with, and an edit elsewhere in the file, not yet applied (or refused by a reload), must not
    make the container's health check call a running daemon dead."""
    if args.url is not None:
        return str(args.url), None
    settings = load_settings(_config_path(args), complete=only_listeners)
    return settings.admin_url(), settings.admin_certificate()


def _dedup_prune(args: argparse.Namespace) -> int:
    from daemon.retention import check_older_than_hours, prune

    hours: float | None = args.older_than_hours
    if hours is not None and check_older_than_hours(hours) < MIN_INGEST_KEY_RETENTION_HOURS:
        print(f"ingest keys are kept for at least {MIN_INGEST_KEY_RETENTION_HOURS:g} hours", file=sys.stderr)
    settings = _operator_settings(args)
    pruned = _run_async(prune(settings, older_than_hours=hours))
    for name, rows in pruned.items():
        print(f"{name}: {rows} row(s) pruned")
    if not pruned:  # the wrong state_dir (no --config?) must not look like a prune that found nothing old
        sinks = ", ".join(settings.sinks)
        print(f"orderbus: no state files in {settings.state_dir} (sinks in the settings: {sinks})", file=sys.stderr)
        return 0 if settings.state_dir.is_dir() else 1  # a host that has delivered nothing yet is not a failure
    return 0


def _dlq_list(args: argparse.Namespace) -> int:
    from daemon.dlq import Selection, read_dead_letters

    selection = Selection(reason=args.reason, order=args.order, everything=True, again=not args.open)
    letters = [
        letter
        for letter in _run_async(read_dead_letters(_operator_settings(args), args.sink))
        if selection.matches(letter)
    ]
    for letter in letters:
        print(letter.line())
    print(f"{len(letters)} dead letter(s) in sink {args.sink}", file=sys.stderr)
    return 0


def _dlq_show(args: argparse.Namespace) -> int:
    from daemon.dlq import read_dead_letters

    found = [
        letter
        for letter in _run_async(read_dead_letters(_operator_settings(args), args.sink))
        if letter.where == args.position
    ]
    if not found:
        print(f"no dead letter at {args.position} in sink {args.sink}", file=sys.stderr)
        return 1
    print(found[0].details())
    return 0


def _dlq_replay(args: argparse.Namespace) -> int:
    from daemon.dlq import Selection, replay_selected

    selection = Selection(tuple(args.position), args.reason, args.order, args.all, args.again)
    replayed = _run_async(replay_selected(_operator_settings(args), args.sink, selection))
    for letter in replayed:
        print(f"replayed {letter.line()}")
    print(f"{len(replayed)} dead letter(s) sent back to sink {args.sink}", file=sys.stderr)
    return 0


def _positive(text: str, what: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of {what} above 0")
    return number


def _hours(text: str) -> float:
    return _positive(text, "hours")


def _seconds(text: str) -> float:
    return _positive(text, "seconds")


def _trace(args: argparse.Namespace) -> int:
    from daemon.trace import explain, trace

    since = None if args.since_hours is None else int((time.time() - args.since_hours * 3600) * 1000)
    found, sinks = _run_async(
        trace(_operator_settings(args), args.order, all_partitions=args.all_partitions, since_ms=since)
    )
    for line in explain(found, sinks):
        print(line)
    return 0 if found.events else 1


def _require_sink_secrets(settings: Settings, name: str) -> None:
    """`ConfigError` naming the variable to set if sink `name`'s secret was not given (`SECRET_NOT_LOADED`)."""
    sink = settings.sinks.get(name)
    auth = None if sink is None else sink.auth
    for field in _SINK_SECRETS.get(getattr(auth, "type", ""), ()):
        secret = getattr(auth, field)
        if isinstance(secret, SecretStr) and secret.get_secret_value() == SECRET_NOT_LOADED:
            variable = f"ORDERBUS_SINKS__{name.upper()}__AUTH__{field.upper()}"
            raise ConfigError(
                f"sinks.{name}.auth.{field}: not given, and this command asks the system with it "
                f"(set {variable}_FILE to the file that holds it, or {variable})"
            )


def _rate(text: str) -> float:
    return _positive(text, "requests a second")


def _whole(text: str, low: int, high: int, what: str) -> int:
    """`text` as a whole number from `low` to `high` (ASCII digits only: int() takes "٣" as 3)."""
    if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} ({low}-{high})")
    return int(text)


def _port(text: str) -> int:
    return _whole(text, 1, 65535, "a TCP port")


def _port_or_0(text: str) -> int:
    return 0 if text == "0" else _port(text)


def _concurrency(text: str) -> int:
    return _whole(text, 1, 64, "a number of requests")


def _reconcile(args: argparse.Namespace) -> int:
    from daemon.reconcile import RunStopped, accounted_for, explain, prepare, reconcile

    settings = _operator_settings(args)  # the other sinks' secrets are not needed, only this one's
    _require_sink_secrets(settings, args.sink)
    now = time.time()
    since = now - args.since_hours * 3600
    run = prepare(settings, args.sink, since, now=now)
    if run.since > since:
        kept = settings.sinks[args.sink].dedup_retention_hours
        print(f"orderbus: states are kept {kept:g} hours (dedup_retention_hours): asking since then", file=sys.stderr)

    def progress(done: int) -> None:
        if done % 1000 == 0:
            print(f"orderbus reconcile: {done} of {len(run.orders)} asked", file=sys.stderr, flush=True)

    code = None
    # A SIGTERM (`timeout`, a job scheduler's limit) ends it as Ctrl-C does: with the report of what was asked.
    default = signal.signal(signal.SIGTERM, _terminated)
    try:
        _run_async(reconcile(settings, args.sink, run, concurrency=args.concurrency, rate=args.rate, progress=progress))
    except RunStopped as stopped:
        print(f"orderbus: {stopped}", file=sys.stderr)
        code = 2 if stopped.configuration else 1
    except KeyboardInterrupt as interrupted:
        terminated = isinstance(interrupted, _Terminated)
        print(f"orderbus: {'terminated' if terminated else 'interrupted'}; what was asked so far:", file=sys.stderr)
        code = 143 if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, default)
    config = "" if args.config is None else f" --config {args.config}"  # as the operator ran it
    for line in explain(args.sink, run, config, resending=args.resend and code is None):
        print(line)
    if code is not None:
        if args.resend:
            print("orderbus: nothing was resent: the run did not ask for every order", file=sys.stderr)
        return code
    if args.resend and any(c.verdict == "missing" for c in run.checked):
        return _resend(settings, args.sink, run)
    return 0 if accounted_for(run.checked) else 1


class _Terminated(KeyboardInterrupt):
    """A SIGTERM, raised where the program is, as Python raises KeyboardInterrupt for a SIGINT."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _resend(settings: Settings, sink: str, run: Run) -> int:
    """`reconcile --resend`: resend what `run` found missing; 0 if every order is there, or resent and nothing
    more is to be done."""
    from daemon.resend import resend
    from topics.catalogue import replay_topic

    resent = _run_async(resend(settings, sink, [c.order for c in run.checked if c.verdict == "missing"]))
    if sent := [item for item in resent if item.event is not None]:
        topic = replay_topic(sink, settings.topics.prefix)
        print(f"resent {len(sent)} order(s) to {topic} as creates; the running daemon delivers them:")
        print(*(f"  {item.line}" for item in sent), sep="\n")
    if skipped := [item for item in resent if item.event is None]:
        print("not resent:")
        print(*(f"  {item.line}" for item in skipped), sep="\n")
    unknown = any(c.verdict == "unknown" for c in run.checked)
    return 1 if skipped or unknown or any(item.then for item in sent) else 0


def _read_input(path: Path) -> bytes:
    """The bytes of `path`, or of standard input for ``-``; `ConfigError` naming the file if it cannot be read."""
    try:
        return sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def _webhook_sign(args: argparse.Namespace) -> int:
    settings = _operator_settings(args)
    if not settings.ingest.webhook_secrets:
        raise ConfigError("ingest.webhook_secrets: no secret configured, nothing to sign with")
    secret = settings.ingest.webhook_secrets[0].get_secret_value()
    msg_id = f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time())
    body = _read_input(args.body)
    print(f"webhook-id: {msg_id}")
    print(f"webhook-timestamp: {timestamp}")
    print(f"webhook-signature: {sign(secret, msg_id, timestamp, body)}")
    return 0


def _webhook_check(args: argparse.Namespace) -> int:
    from daemon.order_check import check

    body = _read_input(args.body)
    valid, lines = check(body, record=args.record, max_body_bytes=args.max_body_bytes)
    for line in lines:
        print(line)
    return 0 if valid else 1


if __name__ == "__main__":
    raise SystemExit(main())
