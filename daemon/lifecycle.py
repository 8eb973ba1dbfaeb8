"""The daemon's lifecycle: open everything in dependency order, serve until asked to stop, close in reverse.

One `AsyncExitStack` owns every resource (SQLite → Kafka producer → ingest → sinks → HTTP server), so a failure while
starting closes what was already open, and a clean stop closes everything in reverse order. Signal handlers only
set the stop event (see `daemon.cli`).

Every metric (the ingest's, the engines', the build info) lives on the one injected `CollectorRegistry` that
``/metrics`` serves; ``/readyz`` answers with the reasons `_reasons` finds, by component.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import fnmatch
import functools
import gc
import logging
import os
import socket
import ssl
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final, Protocol

from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from consumers import abandoned_commits
from consumers.clock import SystemClock
from consumers.deadletter import REASONS
from consumers.engine import SinkEngine
from consumers.kafka_close import DEAD_LETTER_CLOSE_GRACE, stop_producer
from consumers.kafka_io import KafkaDeadLetterWriter, dead_letter_producer, keep_metadata_synchronizer
from consumers.membership import Membership
from consumers.metrics import EngineMetrics
from consumers.pruning import prune_forever
from consumers.runner import HttpConfig, open_sink
from consumers.state_topic import KafkaStateTopic
from consumers.tasks import cancel_and_wait
from daemon import open_files
from daemon.app import ADMIN_SHUTDOWN, LISTEN_BACKLOG, RUNNER_OPTIONS, Listener, build_app
from daemon.connection_gate import ConnectionGate, GatedSite
from daemon.ingest import Ingest, IngestConfig
from daemon.ingest_keys import SqliteIngestKeyStore
from daemon.ingest_metrics import (
    ConnectionMetrics,
    IngestMetrics,
    register_build_info,
    register_certificate_expiry,
    register_kafka_certificate_expiry,
    register_start_time,
)
from daemon.kafka_certificate import KafkaCertificate, kafka_certificate
from daemon.kafka_options import client_options
from daemon.kafka_trust import KafkaTrust, kafka_trust
from daemon.kafka_watch import Diagnosis, KafkaWatch
from daemon.key_pairs import CertificateEnd
from daemon.publisher import KafkaPublisher
from daemon.ready_metric import register_readiness
from daemon.retention import dedup_path, ingest_keys_path
from daemon.sdnotify import Notifier, watchdog_loop
from daemon.settings import Settings
from daemon.signature import WebhookVerifier
from daemon.sinks import build_auth, build_sink, engine_config
from daemon.status import problems
from daemon.tls_listener import ServerTls, server_tls
from daemon.topic_retention import RetentionWatch
from topics.acls import refusal
from topics.admin import missing_topics, partition_counts, topic_configs
from topics.broker_diagnosis import Diagnose, diagnose
from topics.catalogue import dlq_topic, orders_topic, replay_topic, state_topic
from topics.errors import BrokerError, ConfigError, NotYetError

log = logging.getLogger(__name__)

# The collector's generation thresholds (CPython's are 700, 10, 10). A delivery or a webhook request allocates
# hundreds of objects, nearly all freed by reference counting; with the defaults, a young collection ran every few
# requests and an older one, scanning every live record, tens of times a second: 16-22 % of the CPU per delivery
# (tests/bench/hotpath.py: 206 -> 161 us, max RSS 141 -> 154 MB) and 20-30 us per webhook request.
GC_THRESHOLDS = (50_000, 50, 50)
# How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms). The dedup stores'
# writer threads hand SQLite a batch and then wait for the GIL behind the busy event loop; with 0.5 ms their CPU
# per row fell by about half and SQLite's share of the daemon's CPU from ~14 % to ~10 % (bench.py's profiled
# CPU-bound run), with the CPU per delivery unchanged or lower.
SWITCH_INTERVAL = 0.0005


def tune_runtime() -> None:
    """Once started: freeze what lives as long as the process, collect less often, switch threads sooner.

    Everything made so far (modules, models, clients) is moved out of the collector's sight, so a full collection
    scans the requests' objects only (~3 ms instead of ~35 ms, a p99 of its own); then `GC_THRESHOLDS` and
    `SWITCH_INTERVAL`.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL)


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    registry: CollectorRegistry | None = None,
    notifier: Notifier | None = None,
    reload: asyncio.Event | None = None,
    load: Callable[[], Settings] | None = None,
) -> None:
    """Run the daemon until `stop` is set; a sink that fails stops the whole daemon with its error.

    Under systemd (Type=notify) it says READY=1 once Kafka answers and every sink has joined its group, pings
    WATCHDOG=1 from the event loop until the last resource is closed, and says STOPPING=1 when it drains.
    """
    settings.ingest.require_signatures()
    need, settings_said = open_files.needed(settings)
    raised = open_files.ensure(need, settings_said)  # a hard limit below the settings' need: exit 2 before all else
    tls = server_tls(settings.ingest.tls_certfile, settings.ingest.tls_keyfile)  # a pair that does not load: exit 2
    registry = registry if registry is not None else CollectorRegistry()
    notifier = notifier if notifier is not None else Notifier()  # a broken $NOTIFY_SOCKET stops start-up here
    register_build_info(registry)
    register_start_time(registry)
    if tls is not None:
        register_certificate_expiry(registry, lambda: tls.not_after)
        tls.end.say(time.time())
    log.info("starting", extra={"settings": settings.masked()})
    if raised is not None:
        log.info("limit of open files raised for the settings", extra={"before": raised[0], "now": need})
    for weakness in settings.weaknesses():
        log.warning("insecure setting: %s", weakness)
    async with AsyncExitStack() as stack:
        if raised is not None:
            stack.callback(open_files.restore, raised)
        stack.callback(notifier.close)
        # First in, last out: the loop pings systemd until the drain and every close are done.
        stack.push_async_callback(cancel_and_wait, asyncio.create_task(watchdog_loop(notifier), name="sd-watchdog"))
        notifier.status("connecting to kafka")
        ingest: Ingest | None = None
        publisher: KafkaPublisher | None = None
        keys: SqliteIngestKeyStore | None = None
        options = client_options(settings.kafka)  # once: with TLS, each build reads the CA file again
        if (kafka_cert := kafka_certificate(settings.kafka, options)) is not None:  # renewed at a reload
            register_kafka_certificate_expiry(registry, lambda: kafka_cert.not_after)
            kafka_cert.end.say(time.time())
        # Why Kafka cannot be reached, asked by the start's topic check, the ingest's probe or the sinks' watch alike:
        # once a minute at most (with SASL each asking is a login).
        diagnosis = Diagnosis(
            functools.partial(diagnose, options, timeout=settings.kafka.request_timeout), SystemClock()
        )
        checked = True
        if settings.ingest.enabled or settings.enabled_sinks():
            _state_dir(settings)
            stack.callback(os.close, _lock_state_dir(settings.state_dir))
            checked = await _require_topics(settings, options, diagnosis)
        gate: ConnectionGate | None = None
        if settings.ingest.enabled:
            metrics = IngestMetrics(registry)
            ingest, publisher, keys = await _open_ingest(
                settings, options, stack, metrics, diagnosis, topic_checked=checked
            )
            gate = _connection_gate(settings, registry)
        engines = await _open_sinks(settings, options, stack, EngineMetrics(registry), diagnosis)
        components = [*(["ingest"] if publisher is not None else []), *(f"sink.{name}" for name in engines)]

        def readiness() -> dict[str, str]:
            return _reasons(publisher, engines, keys)

        def degraded() -> dict[str, str]:
            return _degraded(engines, publisher)

        register_readiness(registry, components, readiness)
        watch = None
        if publisher is None and engines:  # with the ingest, its publisher says why Kafka cannot be reached
            watch = KafkaWatch(engines.values(), diagnosis, SystemClock())
            stack.push_async_callback(cancel_and_wait, asyncio.create_task(watch.run(), name="kafka-watch"))

        def app(serves: Listener) -> web.Application:
            return build_app(
                ingest=ingest,
                readiness=readiness,
                degraded=degraded,
                max_body_bytes=settings.ingest.max_body_bytes,
                registry=registry,
                status=lambda: _status(
                    publisher,
                    keys,
                    engines,
                    registry,
                    tls,
                    watch=watch,
                    gate=gate,
                    kafka_certificate=kafka_cert.end if kafka_cert is not None else None,
                ),
                serves=serves,
                components=components,
                gate=gate if serves != "admin" else None,
            )

        admin, webhook_tls = settings.admin, tls.context if tls is not None else None
        host, port = settings.ingest.host, settings.ingest.port
        if admin.port is None:
            await _listen(stack, app("all"), "ingest", host, port, webhook_tls, gate=gate)
        else:
            await _listen(stack, app("webhook"), "ingest", host, port, webhook_tls, gate=gate)
            await _listen(stack, app("admin"), "admin", admin.host, admin.port, shutdown_timeout=ADMIN_SHUTDOWN)
        tune_runtime()
        ready = asyncio.create_task(
            _notify_ready(notifier, publisher, engines, lambda: (readiness(), degraded()), stop), name="sd-status"
        )
        stack.push_async_callback(cancel_and_wait, ready)
        if reload is not None and load is not None:
            kafka_ca = kafka_trust(settings.kafka, options)
            reloading = _reload_on_request(reload, load, settings, engines, tls, kafka_cert, kafka_ca)
            reloader = asyncio.create_task(reloading, name="reload")
            stack.push_async_callback(cancel_and_wait, reloader)
        await _run_sinks(engines, stop, notifier)
        log.info("stopped")


# Why a listener may fail at start and work a moment later: an old instance or another service still holds the port
# (a rolling restart, a container on the host's network), the address is not up yet at boot (DHCP, IPv6's duplicate
# address detection), the resolver is not reachable yet. A port below 1024 without the capability, or a name that
# does not exist, fails the same way every time.
_LISTEN_NOT_YET: Final = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, socket.EAI_AGAIN})


async def _listen(
    stack: AsyncExitStack,
    app: web.Application,
    section: str,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    *,
    gate: ConnectionGate | None = None,
    **options: Any,
) -> None:
    """Serve `app` on host:port (HTTPS with `tls`, its connections bounded by `gate`) until `stack` closes
    (`RUNNER_OPTIONS`, `options` on top). If it cannot listen, an error naming `section`'s keys: `NotYetError` (exit
    1, retried) while the port is held by another process, the address is not on this host (yet) or its name does
    not resolve for now, else `ConfigError` (exit 2)."""
    runner = web.AppRunner(app, **{**RUNNER_OPTIONS, **options})
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site: web.BaseSite
    if gate is None:
        site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG, ssl_context=tls)
    else:
        site = GatedSite(runner, host, port, gate, backlog=LISTEN_BACKLOG, ssl_context=tls)
    try:
        await site.start()
    except OSError as exc:
        problem = f"{section}.host/{section}.port: cannot listen on {host}:{port}: {exc.strerror or exc}"
        if exc.errno in _LISTEN_NOT_YET:
            raise NotYetError(problem) from exc
        raise ConfigError(problem) from exc
    log.info("listening on %s://%s:%d", "http" if tls is None else "https", host, port, extra={"listener": section})


async def _run_sinks(engines: dict[str, SinkEngine], stop: asyncio.Event, notifier: Notifier) -> None:
    """Run every engine until `stop`; if one fails, stop the others (they drain and commit) and re-raise."""
    tasks = [asyncio.create_task(engine.run(stop), name=f"sink-{name}") for name, engine in engines.items()]
    stopped = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        notifier.stopping("draining in-flight deliveries, then committing")
        stopped.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    log.info("sinks drained and committed")
    for name, result in zip(engines, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            log.error("sink %s failed", name, exc_info=result)
            raise result


async def _open_sinks(
    settings: Settings, options: Mapping[str, Any], stack: AsyncExitStack, metrics: EngineMetrics, diagnosis: Diagnose
) -> dict[str, SinkEngine]:
    enabled = settings.enabled_sinks()
    if not enabled:
        return {}
    producer = dead_letter_producer(options, request_timeout=settings.kafka.request_timeout)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise BrokerError(f"cannot start the dead-letter producer: {refusal(exc) or repr(exc)}") from exc
    keep_metadata_synchronizer(producer.client, "dead letters")
    abandoned_commits.install(asyncio.get_running_loop())  # a commit past its deadline: one line, no traceback
    # The sinks have waited for their dead letters' acks before committing: what is pending now was given up on.
    stack.push_async_callback(stop_producer, producer, DEAD_LETTER_CLOSE_GRACE, "dead letters")
    dead_letters = KafkaDeadLetterWriter(producer, prefix=settings.topics.prefix)
    membership = Membership(settings.kafka.group_instance_id, settings.kafka.session_timeout)  # every sink's
    # What the backlog's age is held to: the orders topic's retention as its brokers say, the setting until then.
    orders = orders_topic(settings.topics.prefix)
    retention = RetentionWatch(
        orders,
        functools.partial(_configs_of, orders, options, settings.kafka.request_timeout, diagnosis),
        metrics.orders_retention.set,
        settings.topics.orders_retention_hours * 3600,
        SystemClock(),
    )
    stack.push_async_callback(cancel_and_wait, asyncio.create_task(retention.run(), name="orders-retention"))
    engines: dict[str, SinkEngine] = {}
    for name, sink_settings in enabled.items():
        config = engine_config(sink_settings)
        state = KafkaStateTopic(
            producer, options, state_topic(name, settings.topics.prefix), write_timeout=config.commit_timeout
        )
        engines[name] = await stack.enter_async_context(
            open_sink(
                build_sink(name, sink_settings),
                client_options=options,
                topic=orders,
                prefix=settings.topics.prefix,
                dedup_path=dedup_path(settings.state_dir, name),
                dead_letters=dead_letters,
                metrics=metrics,
                config=config,
                http=HttpConfig(sink_settings.request_timeout, sink_settings.tls_verify, sink_settings.ca_bundle),
                auth=build_auth(name, sink_settings),
                replay_topic=replay_topic(name, settings.topics.prefix),
                state=state,
                retention=sink_settings.dedup_retention_hours * 3600,
                membership=membership,
            )
        )
        engines[name].skip_unreadable(sink_settings.skips())
        engines[name].set_held(sink_settings.paused)
    return engines


def _state_dir(settings: Settings) -> None:
    """Create `state_dir` if needed; a directory that cannot be made or written is a `ConfigError` (exit 2, which
    systemd does not restart), not a traceback."""
    path = settings.state_dir
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)  # only its own user reads what it holds
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot create {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir: {path} is not writable by this user")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "state_dir %s can be read by other users (mode %04o): its files hold order numbers and idempotency "
            "keys; chmod 700 it",
            path,
            mode,
        )


def state_dir_problem(path: Path) -> str | None:
    """What would stop `_state_dir` from making or using `path`, as far as this user can tell without making it
    (`orderbus config check`: a start that fails on it exits 2, which systemd does not restart)."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"state_dir: {existing} is not a directory"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    if existing == path:
        return f"state_dir: {path} is not writable by this user"
    return f"state_dir: {path} cannot be created by this user: {existing} is not writable"


STATE_LOCK = "orderbus.lock"


def _lock_state_dir(path: Path) -> int:
    """Hold `STATE_LOCK` in `path` until the returned descriptor is closed (or the process ends, kill -9 included);
    `ConfigError` if another daemon holds it. Two daemons on one state directory would each take the other's
    idempotency keys and delivery states for their own (one SQLite writer each, no coordination between them)."""
    lock = path / STATE_LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot open {lock}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"state_dir: {path} is in use by another orderbus daemon (process {holder} holds {lock}); "
            "give each daemon a state directory of its own"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:  # a full disk: the lock holds all the same, only a second daemon's refusal lacks the id
        log.warning("state_dir: cannot write this process's id into %s: %s", lock, exc.strerror or exc)
    return fd


async def _require_topics(settings: Settings, options: Mapping[str, Any], diagnosis: Diagnose) -> bool:
    """Refuse to start (`ConfigError`, exit 2) while a topic the daemon reads or writes is missing; False if the
    topics could not be checked.

    Otherwise the ingest's producer and the sinks' consumers would have the broker create them (Kafka's default
    ``auto.create.topics.enable=true``) with its defaults, one partition and its retention, which `topics apply`
    then only reports as drift. An unreachable Kafka stops the sinks as their producer would (`BrokerError`);
    the ingest alone starts anyway and answers 503 until Kafka is back and its topic is found (`_open_ingest`).
    """
    try:
        await check_topics(settings, options, diagnosis)
    except BrokerError as exc:
        if settings.enabled_sinks():
            raise
        log.warning("kafka unreachable at start, topics not checked yet", extra={"error": str(exc)})
        return False
    for note in await replay_partition_notes(settings, options):
        log.warning(note)
    return True


async def check_topics(settings: Settings, options: Mapping[str, Any], diagnosis: Diagnose | None = None) -> None:
    """`ConfigError` if a topic the daemon reads or writes is missing; `BrokerError` if Kafka does not answer, saying
    why (`diagnosis`, else `topics.broker_diagnosis.diagnose` asked at once). `run`'s start, and `config check
    --connect`."""
    prefix = settings.topics.prefix
    names = [orders_topic(prefix)]
    for name in settings.enabled_sinks():
        names += [dlq_topic(name, prefix), replay_topic(name, prefix), state_topic(name, prefix)]
    missing = await missing_topics(names, options, timeout=settings.kafka.request_timeout, diagnosis=diagnosis)
    if missing:
        raise ConfigError(
            f"topic{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"{'do' if len(missing) > 1 else 'does'} not exist: run `orderbus topics apply` with these settings"
        )
    states = [state_topic(name, prefix) for name in settings.enabled_sinks()]
    if states:
        counts = await partition_counts(
            [orders_topic(prefix), *states], options, timeout=settings.kafka.request_timeout
        )
        orders = counts.get(orders_topic(prefix), 0)
        short = [f"{name} ({counts[name]})" for name in states if counts.get(name, orders) < orders]
        if short:
            # An order's state goes to the partition its records are in: one the topic lacks fails every flush.
            raise ConfigError(
                f"{', '.join(short)}: fewer partitions than {orders_topic(prefix)} ({orders}); run `orderbus topics "
                "apply`, which grows them"
            )


async def _configs_of(
    topic: str, options: Mapping[str, Any], timeout: float, diagnosis: Diagnose
) -> Mapping[str, str | None]:
    """`topic`'s configs as its brokers apply them (empty if it is not described)."""
    return (await topic_configs([topic], options, timeout=timeout, diagnosis=diagnosis)).get(topic, {})


async def replay_partition_notes(settings: Settings, options: Mapping[str, Any]) -> list[str]:
    """What to say of the enabled sinks' replay topics whose partition count is not the orders topic's: with several
    instances, a replay there can reach an instance that does not hold its order's state (`consumers.assignment`).
    Nothing when the counts cannot be read: the topics were found a moment before, and this is advice."""
    prefix = settings.topics.prefix
    orders, replays = orders_topic(prefix), [replay_topic(name, prefix) for name in settings.enabled_sinks()]
    if not replays:
        return []
    try:
        counts = await partition_counts([orders, *replays], options, timeout=settings.kafka.request_timeout)
    except BrokerError as exc:
        log.debug("partition counts not compared", extra={"error": str(exc)})
        return []
    if orders not in counts:
        return []
    return [
        f"{name} has {counts[name]} partitions, {orders} {counts[orders]}: with several instances, a replayed dead "
        "letter can reach an instance that does not hold its order's state (the order stays blocked); "
        + (
            "run `orderbus topics apply`, which grows it"
            if counts[name] < counts[orders]
            else "once its sink has read it (no replay-pending in `orderbus dlq list`), delete it and run "
            "`orderbus topics apply`, which makes it anew"
        )
        for name in replays
        if name in counts and counts[name] != counts[orders]
    ]


def _connection_gate(settings: Settings, registry: CollectorRegistry) -> ConnectionGate:
    """The webhook listener's `ConnectionGate` (``ingest.max_connections``), counted in `registry`."""
    metrics = ConnectionMetrics(registry)
    gate = ConnectionGate(settings.ingest.max_connections, retry_after=settings.ingest.retry_after, shed=metrics.shed)
    metrics.watch(gate.states, gate.limit)
    return gate


async def _open_ingest(
    settings: Settings,
    options: Mapping[str, Any],
    stack: AsyncExitStack,
    metrics: IngestMetrics,
    diagnosis: Diagnosis,
    *,
    topic_checked: bool = True,
) -> tuple[Ingest, KafkaPublisher, SqliteIngestKeyStore]:
    keys = SqliteIngestKeyStore(ingest_keys_path(settings.state_dir))
    await keys.open()
    stack.push_async_callback(keys.close)
    retention = settings.ingest.idempotency_retention_hours * 3600
    pruning = prune_forever(keys.prune, retention, "ingest-keys", SystemClock())
    pruner = asyncio.create_task(pruning, name="ingest-key-pruner")
    stack.push_async_callback(cancel_and_wait, pruner)

    publisher = KafkaPublisher(
        orders_topic(settings.topics.prefix),
        options,
        request_timeout=settings.kafka.request_timeout,
        # The start's check, when Kafka did not answer it: the publisher builds no producer before it passes.
        topic_check=None if topic_checked else functools.partial(check_topics, settings, options, diagnosis),
        diagnosis=diagnosis,
    )
    await publisher.start()
    stack.push_async_callback(publisher.close)

    secrets = [secret.get_secret_value() for secret in settings.ingest.webhook_secrets]
    if not secrets:
        log.warning("ingest.allow_unsigned: unsigned webhooks are accepted (no ingest.webhook_secrets)")
    ingest = Ingest(
        publisher,
        keys,
        IngestConfig(
            max_body_bytes=settings.ingest.max_body_bytes,
            body_buffer_bytes=settings.ingest.body_buffer_bytes,
            body_timeout=settings.ingest.body_timeout,
            publish_timeout=settings.ingest.publish_timeout,
            retry_after=settings.ingest.retry_after,
            source=settings.ingest.source,
        ),
        verifier=WebhookVerifier(secrets, tolerance=settings.ingest.signature_tolerance) if secrets else None,
        metrics=metrics,
    )
    stack.push_async_callback(ingest.close)
    return ingest, publisher, keys


_READY_POLL = 0.25
_STATUS_INTERVAL = 5.0  # how often the systemd status line is brought up to date
# What SIGHUP applies; everything else needs a restart (connections, pools, files and listeners are built once).
RELOADABLE = ("log_level", "sinks.*.rate", "sinks.*.skip_unreadable", "sinks.*.paused")


async def _reload_on_request(
    requested: asyncio.Event,
    load: Callable[[], Settings],
    current: Settings,
    engines: dict[str, SinkEngine],
    tls: ServerTls | None = None,
    kafka_cert: KafkaCertificate | None = None,
    kafka_ca: KafkaTrust | None = None,
) -> None:
    """On each request (SIGHUP), re-read the settings and apply what can change live: the log level, the sinks'
    rate limits, the unreadable records they skip and whether they are paused; and read the webhook's certificate
    and key again (`tls`, renewed in place), the Kafka clients' (`kafka_cert`) and the CAs they trust (`kafka_ca`,
    added to). A bad file keeps the running settings; other changes are logged as needing a restart. The
    ``settings reloaded`` line names the live keys that changed (``applied``)."""
    running = current  # what the live keys were set to last
    while True:
        await requested.wait()
        requested.clear()
        log.info("reloading settings")
        for renewable in (tls, kafka_cert):  # first, whatever becomes of the settings: a renewal must not wait
            if renewable is not None:  # for a fixed file
                _reload_certificate(renewable, time.time())
        if kafka_ca is not None:
            _reload_trust(kafka_ca)
        try:
            fresh = load()
        except ConfigError as exc:
            log.error("reload refused, the running settings stay", extra={"error": str(exc)})
            continue
        except Exception:  # a bug: said with its traceback, and the next SIGHUP is still heard
            log.exception("reload failed, the running settings stay")
            continue
        for name, engine in engines.items():
            sink = fresh.sinks[name]
            engine.set_rate(sink.rate)
            engine.skip_unreadable(sink.skips())
            engine.set_held(sink.paused)
        ignored = _restart_needed(current, fresh)
        if ignored:
            log.warning("changed settings that need a restart", extra={"settings": ignored})
        applied = [key for key in _changed_keys(running, fresh) if _reloadable(key) and _runs(key, engines)]
        running = fresh
        log.info("settings reloaded", extra={"applied": applied, "log_level": fresh.log_level})
        # After the line: a reload that raises the level to WARNING would otherwise hide what it applied.
        logging.getLogger().setLevel(fresh.log_level)


class _Renewable(Protocol):
    """A certificate pair read again at a reload: the webhook's (`ServerTls`), the Kafka clients'
    (`KafkaCertificate`)."""

    cert_file: Path

    @property
    def end(self) -> CertificateEnd: ...

    def reload(self, now: float) -> bool: ...


def _reload_certificate(tls: _Renewable, now: float) -> None:
    """Read a certificate and its key again (renewed in place); what is wrong with them keeps the pair in use and is
    said, and so is when the certificate in use expires."""
    fields: dict[str, str] = {"certificate": tls.end.subject, "certfile": str(tls.cert_file)}
    try:
        changed = tls.reload(now)
    except ConfigError as exc:
        log.error("certificate reload refused, the one in use stays", extra={**fields, "error": str(exc)})
    except Exception:  # a bug: said with its traceback, and the next SIGHUP is still heard
        log.exception("certificate reload failed, the one in use stays", extra=fields)
    else:
        if changed:
            log.info("certificate reloaded", extra=fields)
        elif _is_credential(tls.cert_file):
            # systemd copies LoadCredential= files once, at the service's start: a reload reads the same copies.
            log.info(
                "certificate unchanged: it is a systemd credential, copied when the service started; after a "
                "renewal, restart the service (systemctl restart orderbus; nothing is lost)",
                extra=fields,
            )
        else:
            log.info("certificate unchanged", extra=fields)
    tls.end.say(now)


def _reload_trust(trust: KafkaTrust) -> None:
    """Add the CAs the Kafka CA file holds now to the clients' trust; what is wrong with it changes nothing."""
    fields = {"cafile": str(trust.ca_file)}
    try:
        trusted = trust.reload()
    except ConfigError as exc:
        log.error("kafka CA reload refused, the CAs trusted stay", extra={**fields, "error": str(exc)})
    except Exception:  # a bug: said with its traceback, and the next SIGHUP is still heard
        log.exception("kafka CA reload failed, the CAs trusted stay", extra=fields)
    else:
        # Added, never taken away: a CA dropped from the file stays trusted until a restart.
        log.info(
            "kafka CA file read again: %d certificate(s) trusted, %d of them new (one dropped from the file stays "
            "trusted until a restart)",
            trusted.total,
            trusted.new,
            extra=fields,
        )


def _is_credential(path: Path) -> bool:
    """Whether `path` is in the systemd credentials directory of this service (``$CREDENTIALS_DIRECTORY``)."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    return bool(credentials) and Path(os.path.abspath(path)).is_relative_to(os.path.abspath(credentials or ""))


def _restart_needed(old: Settings, new: Settings) -> list[str]:
    """The changed settings a reload does not apply, by key: ``ingest.port``, ``sinks.crm.auth``."""
    return [key for key in _changed_keys(old, new) if not _reloadable(key)]


def _runs(key: str, engines: Mapping[str, SinkEngine]) -> bool:
    """Whether `key` is applied to something running: a sink's only when it is enabled."""
    section, _, rest = key.partition(".")
    return section != "sinks" or rest.partition(".")[0] in engines


def _reloadable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, live) for live in RELOADABLE)


def _changed_keys(old: Settings, new: Settings) -> list[str]:
    """The settings that differ, by key: ``log_level``, ``sinks.crm.rate``.

    Secrets are compared by value (a JSON dump masks every one as ``**********``, so a rotated token looked
    unchanged and "settings reloaded" was all the operator saw); only the keys are returned, never a value.
    """
    before, after = old.model_dump(), new.model_dump()  # SecretStr compares by its secret
    changed = []
    for section in sorted(set(before) | set(after)):
        depth = 3 if section == "sinks" else 2  # sinks.<name>.<key>, <section>.<key>
        changed += _changed(before.get(section), after.get(section), section, depth)
    return changed


def _changed(before: object, after: object, key: str, depth: int) -> list[str]:
    if depth <= 1 or not isinstance(before, dict) or not isinstance(after, dict):
        return [key] if before != after else []
    return [
        found
        for name in sorted(set(before) | set(after))
        for found in _changed(before.get(name), after.get(name), f"{key}.{name}", depth - 1)
    ]


_OUTCOMES = ("delivered", "duplicate", "dead_lettered")


def _status(
    publisher: KafkaPublisher | None,
    keys: SqliteIngestKeyStore | None,
    engines: dict[str, SinkEngine],
    registry: CollectorRegistry,
    tls: ServerTls | None = None,
    now: float | None = None,
    watch: KafkaWatch | None = None,
    kafka_certificate: CertificateEnd | None = None,
    gate: ConnectionGate | None = None,
) -> dict[str, object]:
    """The daemon's state for `orderbus status`: per sink what the engine knows plus its lifetime counters; the
    ingest's Kafka gate, why its key store's last batch failed, until one is written again, and its listener's
    connections against their limit (`gate`); with HTTPS, when the webhook's certificate expires (`now`: the wall
    clock's time, by default), and the Kafka client's in use (`kafka_certificate`); without the ingest, why the
    sinks' Kafka cannot be reached (`watch`)."""

    def count(metric: str, labels: dict[str, str]) -> int:
        return int(registry.get_sample_value(metric, labels) or 0)

    sinks: dict[str, object] = {}
    for name, engine in engines.items():
        sinks[name] = {
            **engine.status(),
            "outcomes": {o: count("orderbus_deliveries_total", {"sink": name, "outcome": o}) for o in _OUTCOMES},
            "dead_letters": {r: count("orderbus_dead_letters_total", {"sink": name, "reason": r}) for r in REASONS},
            "expired_records": count("orderbus_expired_records_total", {"sink": name}),
        }
    ingest: dict[str, object] | None = None
    if publisher is not None and keys is not None:
        ingest = {
            "kafka_available": publisher.available,
            "kafka_unreachable": publisher.unreachable,
            "kafka_refused": publisher.refused,
            "topic_missing": publisher.topic_missing,
            "key_store_error": keys.failing,
        }
        if gate is not None:
            ingest["connections"] = {**gate.states(), "limit": gate.limit}
    now = time.time() if now is None else now
    return {
        "ingest": ingest,
        "certificate": tls.end.document(now) if tls is not None else None,
        "kafka_certificate": kafka_certificate.document(now) if kafka_certificate is not None else None,
        "kafka_unreachable": watch.unreachable if watch is not None else None,
        "sinks": sinks,
        "not_ready": _reasons(publisher, engines, keys),
        "degraded": _degraded(engines, publisher),
    }


async def _notify_ready(
    notifier: Notifier,
    publisher: KafkaPublisher | None,
    engines: dict[str, SinkEngine],
    state: Callable[[], tuple[Mapping[str, str], Mapping[str, str]]],
    stop: asyncio.Event,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """READY=1 once Kafka answers and every enabled sink has joined its group, as /readyz (`_reasons`) says; then
    the STATUS= line that ``systemctl status`` shows follows the instance's state (`state`: its not-ready reasons
    and its degraded components), checked every `_STATUS_INTERVAL`, rather than saying "ready" through an outage;
    until `stop`, when the drain's STOPPING=1 line is the one to show (the lag measurements stop with the sinks, and
    would soon read as "kafka is unreachable").

    Neither the publisher nor the engines signal "connected" or "assigned", so this one start-up wait polls.
    """

    def connected() -> bool:
        # The ingest alone is up once it listens: it answers 503 while Kafka is away (/readyz says why). Waiting
        # for Kafka here, systemd would kill it at TimeoutStartSec and start it again, for as long as Kafka is away.
        kafka = publisher is None or publisher.available or not engines
        return kafka and all(e.joined for e in engines.values())

    while not connected():
        await sleep(_READY_POLL)
    parts = f"ingest {'off' if publisher is None else 'on'}, sinks {', '.join(engines) or 'none'}"
    failing = False

    def current() -> str | None:
        """The line now; None if `state` failed (a bug: logged once until it works again, the line kept)."""
        nonlocal failing
        try:
            line = _status_line(parts, *state())
        except Exception:
            if not failing:
                log.exception("the status line for systemd could not be made")
            failing = True
            return None
        failing = False
        return line

    line = current() or f"ready: {parts}"
    notifier.ready(line)
    while True:
        await sleep(_STATUS_INTERVAL)
        if stop.is_set():
            return
        if (now := current()) is not None and now != line:
            notifier.status(now)
            line = now


def _status_line(parts: str, reasons: Mapping[str, str], degraded: Mapping[str, str]) -> str:
    """``ready: ingest on, sinks crm``, or what is wrong first, as `orderbus status` says it: ``NOT READY ingest:
    kafka is unreachable ...; DEGRADED sink.crm: circuit open ... (ingest on, sinks crm)``."""
    said = problems(reasons, degraded)
    return f"{'; '.join(said)} ({parts})" if said else f"ready: {parts}"


def _reasons(
    publisher: KafkaPublisher | None, engines: dict[str, SinkEngine], keys: SqliteIngestKeyStore | None = None
) -> dict[str, str]:
    """Why this instance is not ready, by component ("ingest", "sink.<name>"); empty when it is.

    Only what the instance itself lacks: Kafka, its key store, its sinks' groups (joined once). A downstream system that
    fails (`_degraded`) is not a reason: a load balancer or Kubernetes that reads /readyz would take every instance
    out at once, since all see the same CRM, and the shop's webhooks would fail with it, when orders accepted now
    are delivered once the CRM is back; that is what the topic between them is for.
    """
    reasons: dict[str, str] = {}
    if publisher is not None and publisher.topic_missing:
        reasons["ingest"] = publisher.topic_missing
    elif publisher is not None and not publisher.available and publisher.refused:  # its producer refused at start
        reasons["ingest"] = "kafka refuses the ingest (an ACL): it cannot publish; orderbus status says which"
    elif publisher is not None and not publisher.available:
        # Not why (`publisher.unreachable`): /readyz is on the webhook's listener too, and the cause names the
        # brokers and their security; /status and the log say it.
        reasons["ingest"] = "kafka is unreachable: the ingest cannot publish"
    elif keys is not None and keys.failing:  # a webhook with a key gets 503 until a batch is written again
        reasons["ingest"] = f"the idempotency key store is failing: {keys.failing}"
        keys.recheck()  # a flush that writes a row: written, the next probe finds the ingest ready
    for name, engine in engines.items():
        silence = engine.kafka_silence
        if refused := engine.refused:  # an ACL missing: not "joining" nor "unreachable", nor ready
            reasons[f"sink.{name}"] = refused
        elif not engine.joined:  # not `assigned == 0`: every member has none during a rebalance, a spare one always
            # Out of it for long, a static member says its name may be another instance's too.
            reasons[f"sink.{name}"] = engine.membership_problem or "joining its consumer group (or kafka unreachable)"
        elif engine.kafka_silent:
            reasons[f"sink.{name}"] = f"kafka is unreachable: no answer to the lag measurement for {silence:.0f} s"
        elif contested := engine.membership_problem:
            reasons[f"sink.{name}"] = contested
    return reasons


def _degraded(engines: dict[str, SinkEngine], publisher: KafkaPublisher | None = None) -> dict[str, str]:
    """What keeps a part from working although the instance is ready, by component: the ingest whose records Kafka
    refuses (an ACL: every webhook gets 503 and tries again, so the first one after the grant is stored; not ready,
    a load balancer would send it none, and it would stay so); a sink the operator paused, whose downstream refuses
    our credentials or keeps failing, or which holds a partition it cannot read. Said by /readyz and `orderbus
    status`, alerted on; the sink's orders wait in Kafka meanwhile. A pause comes first, then what will still hold
    the sink once it is let go."""
    degraded: dict[str, str] = {}
    if publisher is not None and publisher.available and publisher.refused:  # which grant: /status and the log
        degraded["ingest"] = "kafka refuses the ingest's records (an ACL): webhooks get 503; orderbus status says which"
    for name, engine in engines.items():
        said = []
        if engine.held:
            said.append(f"paused by its settings (sinks.{name}.paused): nothing is sent; its orders wait in Kafka")
        if engine.auth_paused:
            said.append("paused: the downstream refused our credentials (401/403)")
        elif engine.circuit_state == "open":
            said.append("circuit open: the downstream keeps failing")
        if held := engine.unreadable:
            where = ", ".join(f"{t}:{p} at {offset}" for (t, p), offset in sorted(held.items()))
            named = ", ".join(f'"{t}:{p}@{offset}"' for (t, p), offset in sorted(held.items()))
            said.append(
                f"held, the next records cannot be read (see the log): {where}; to go on without them, add "
                f"skip_unreadable = [{named}] to [sinks.{name}] and reload"
            )
        if said:
            degraded[f"sink.{name}"] = "; also ".join(said)
    return degraded
