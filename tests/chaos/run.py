"""One chaos run: a broker, the sandbox systems and the daemon as real processes, orders and bad input flowing in,
and kills, SIGTERMs and broker kills at random moments; then the proof, as a report (a JSON-able dict).

Steps of `run_chaos`:

1. Start a broker in a data dir of its own, the sandbox process (faults: 503s, resets after the effect, 400s for
   scripted order numbers; throttle episodes of 429 + Retry-After driven from here), the topics, the daemon.
2. Send the orders (half signed webhooks, half direct Kafka records) and the bad input, paced by `Gate`.
3. Meanwhile, at random points of the sending, one event after the other: SIGKILL the daemon (check every SQLite
   file, restart), SIGTERM it (restart), or SIGKILL the broker (restart it on the same data); after each, wait
   until throughput is back.
4. Wait until every sink's group has committed the end of the orders topic; stop the daemon with SIGTERM.
5. Check: every expected order applied exactly once per sink, dead letters exactly the scripted 400s and the
   malformed records, offsets, duplicate requests per event, recovery times, integrity; `report["passed"]`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from support import free_port

from chaos import verify
from chaos.config import ChaosConfig, Plan
from chaos.load import Gate, KafkaSender, Outgoing, SendStats, WebhookSender, outgoing_bad, outgoing_event
from chaos.malformed import bad_record, bad_webhook
from chaos.observe import Event, Monitor, Throttle, first_effect, recovery
from chaos.procs import DaemonConfig, DaemonProcess, integrity, sqlite_files
from daemon import kafka_local
from daemon.sandbox import SandboxClient, SandboxProcess, start_sandbox_process
from topics.admin import apply_catalogue
from topics.catalogue import SINKS, TopicLayout, catalogue, orders_topic
from topics.samples import sample_event, sample_submission

Log = Callable[[str], None]
_RECOVERY_WAIT = 60.0  # how long the run waits for it before moving on
_SECONDS_PER_EVENT = 25.0  # about what an event and its recovery take: the default pace spreads orders over them


class ChaosRun:
    def __init__(self, config: ChaosConfig, work: Path, log: Log) -> None:
        self.config = config
        self.work = work
        self.log = log
        self.rng = random.Random(f"chaos:{config.seed}")
        self.plan = Plan.make(config)
        self.stats = SendStats()
        self.kafka_dir = work / "kafka"
        self.state_dir = work / "state"
        self.prefix = "chaos."
        self.secret = "whsec_" + base64.b64encode(random.Random(config.seed).randbytes(24)).decode()
        self.started = time.monotonic()
        self.deadline = self.started + config.budget
        self.events: list[dict[str, Any]] = []
        self.crashes: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.event_running = False
        self.bootstrap = ""
        self.sandbox_process: SandboxProcess | None = None
        self.daemon: DaemonProcess | None = None
        self.final_stop: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup

    def _faults(self) -> dict[str, dict[str, Any]]:
        config = self.config
        faults: dict[str, dict[str, Any]] = {}
        for name in SINKS:
            faults[name] = {
                "latency_ms": config.latency_ms,
                "latency_jitter_ms": config.latency_jitter_ms,
                "p503": config.p503,
                "p_reset_after_effect": config.p_reset_after_effect,
                "reject_order_numbers": sorted(self.plan.rejected[name]),
            }
            if config.independent_429:
                faults[name] |= {"p429": config.p429, "retry_after": round(sum(config.retry_after) / 2)}
        return faults

    async def _start(self) -> tuple[SandboxClient, DaemonProcess]:
        self.log(f"chaos: work dir {self.work}")
        broker = await asyncio.to_thread(kafka_local.start, self.kafka_dir, heap=self.config.broker_heap)
        self.bootstrap = broker.bootstrap
        self.sandbox_process = await asyncio.to_thread(
            start_sandbox_process,
            seed=self.config.seed,
            faults=self._faults(),
            keep_bodies=False,
            log_file=self.work / "sandbox.log",
        )
        layout = TopicLayout(prefix=self.prefix, orders_partitions=self.config.partitions)
        await apply_catalogue(catalogue(layout), {"bootstrap_servers": self.bootstrap})
        port = free_port()
        daemon_config = DaemonConfig(
            bootstrap=self.bootstrap,
            prefix=self.prefix,
            state_dir=self.state_dir,
            port=port,
            secret=self.secret,
            system_urls={name: self.sandbox_process.system_url(name) for name in SINKS},
            partitions=self.config.partitions,
            max_in_flight=self.config.max_in_flight,
        )
        config_path = self.work / "orderbus.toml"
        config_path.write_text(daemon_config.toml())
        self.daemon = DaemonProcess(config_path, self.work / "daemon.log", f"http://127.0.0.1:{port}")
        self.daemon.start()
        return self.sandbox_process.client(), self.daemon

    # ------------------------------------------------------------------ the run

    async def main(self) -> dict[str, Any]:
        sandbox, daemon = await self._start()
        async with sandbox, aiohttp.ClientSession() as session:
            await daemon.wait_healthy(session, 90)
            monitor = Monitor(sandbox)
            throttle = Throttle(
                sandbox,
                monitor,
                share=0.0 if self.config.independent_429 else self.config.p429,
                retry_after=self.config.retry_after,
                seed=self.config.seed,
            )
            stop_watch = asyncio.Event()
            watchers = [
                asyncio.create_task(monitor.run(stop_watch), name="monitor"),
                asyncio.create_task(throttle.run(stop_watch), name="throttle"),
                asyncio.create_task(self._watch_daemon(session, stop_watch), name="watch-daemon"),
                asyncio.create_task(self._progress_log(monitor, stop_watch), name="progress"),
            ]
            self.log(f"chaos: daemon up; sending {self.config.orders} orders")
            try:
                completed = await self._traffic_and_events(session, monitor, throttle)
                if completed:
                    completed = await self._wait_committed()
                throttle.paused = True
                self.event_running = True  # the final stop is expected
                code, seconds = await daemon.terminate(60)
                self.final_stop = {"exit_code": code, "seconds": round(seconds, 2)}
            finally:
                stop_watch.set()
                await asyncio.gather(*watchers, return_exceptions=True)
            return await self._report(sandbox, monitor, throttle, completed)

    async def _traffic_and_events(self, session: aiohttp.ClientSession, monitor: Monitor, throttle: Throttle) -> bool:
        config = self.config
        events = config.kills + config.sigterms + config.broker_kills
        rate = config.rate or (config.orders / (events * _SECONDS_PER_EVENT) if events else None)
        gate = Gate(rate, config.ahead, monitor.min_applied, lambda: self.stats.valid_sent, cap=config.orders)
        assert self.daemon is not None
        webhook = WebhookSender(f"{self.daemon.base_url}/v1/orders", self.secret, session, self.stats)
        topic = orders_topic(self.prefix)
        kafka_valid = KafkaSender(self.bootstrap, topic, self.stats)
        kafka_bad = KafkaSender(self.bootstrap, topic, self.stats)
        orders, bad = _Cursor(), _Cursor()  # shared by the workers of each kind
        senders = [
            *(self._webhook_orders(webhook, gate, orders) for _ in range(config.webhook_workers)),
            self._kafka_orders(kafka_valid, gate),
            *(self._bad_webhooks(webhook, bad) for _ in range(2)),
            self._bad_records(kafka_bad),
        ]
        tasks = [asyncio.create_task(sender) for sender in senders]
        chaos = asyncio.create_task(self._events(session, monitor, throttle, gate))
        try:
            return await self._until_deadline(asyncio.gather(*tasks, chaos))
        finally:
            for task in [*tasks, chaos]:
                task.cancel()
            await asyncio.gather(*tasks, chaos, return_exceptions=True)
            await kafka_valid.close()
            await kafka_bad.close()

    async def _until_deadline(self, work: Awaitable[Any]) -> bool:
        try:
            await asyncio.wait_for(work, max(1.0, self.deadline - time.monotonic()))
        except TimeoutError:
            self.failures.append(f"the run did not finish within its budget of {self.config.budget:.0f} s")
            return False
        except Exception as exc:  # a broken harness still reports what it saw
            self.failures.append(f"the chaos harness failed: {exc!r}")
            self.log(f"chaos: harness error {exc!r}")
            return False
        return True

    async def _webhook_orders(self, sender: WebhookSender, gate: Gate, cursor: _Cursor) -> None:
        numbers = self.plan.webhook
        while (i := cursor.take()) < len(numbers):
            await gate.wait()
            rng = random.Random(f"webhook:{self.config.seed}:{i}")
            body = sample_submission(rng, order_number=numbers[i]).model_dump_json().encode()
            await sender.send_order(numbers[i], body)

    async def _kafka_orders(self, sender: KafkaSender, gate: Gate) -> None:
        numbers, batch = self.plan.kafka, 25
        for start in range(0, len(numbers), batch):
            await gate.wait(batch)
            events = [
                sample_event(random.Random(f"kafka:{self.config.seed}:{i}"), order_number=numbers[i])
                for i in range(start, min(start + batch, len(numbers)))
            ]
            await sender.send([outgoing_event(event) for event in events])

    async def _progress(self, share: float) -> None:
        """Wait until `share` of the valid orders are sent, so bad input is spread over the run."""
        while self.stats.valid_sent < share * self.config.orders:  # noqa: ASYNC110 - a counter, no event
            await asyncio.sleep(0.1)

    async def _bad_webhooks(self, sender: WebhookSender, cursor: _Cursor) -> None:
        total = self.config.bad_webhooks
        while (j := cursor.take()) < total:
            await self._progress(j / total)
            await sender.send_bad(j, bad_webhook(self.config.seed, j))

    async def _bad_records(self, sender: KafkaSender) -> None:
        total, batch = self.config.bad_records, 20
        for start in range(0, total, batch):
            await self._progress(start / total)
            records: list[Outgoing] = [
                outgoing_bad(bad_record(self.config.seed, j)) for j in range(start, min(start + batch, total))
            ]
            await sender.send(records)

    # ------------------------------------------------------------------ chaos events

    async def _events(self, session: aiohttp.ClientSession, monitor: Monitor, throttle: Throttle, gate: Gate) -> None:
        config = self.config
        kinds = ["kill"] * config.kills + ["sigterm"] * config.sigterms + ["broker"] * config.broker_kills
        self.rng.shuffle(kinds)
        triggers = sorted(self.rng.uniform(0.04, 0.93) * config.orders for _ in kinds)
        for i, (kind, trigger) in enumerate(zip(kinds, triggers, strict=True)):
            # Orders flow on during this event and its recovery, up to the event after the next: events that take
            # longer than planned hold the senders back rather than end up after the last order.
            gate.cap = int(triggers[i + 2]) if i + 2 < len(triggers) else config.orders
            while self.stats.valid_sent < trigger:  # noqa: ASYNC110 - a counter, no event
                await asyncio.sleep(0.05)
            await asyncio.sleep(self.rng.uniform(0.0, 1.5))  # a random moment, not the instant of a batch
            self.event_running = True
            throttle.paused = True  # the recovery time is the daemon's, not the downstream's pace
            try:
                result = await self._event(i, kind, session, monitor)
            finally:
                throttle.paused = False
                self.event_running = False
            self.events.append(result)
            self.log(f"chaos: event {i + 1}/{len(kinds)} {kind}: {_brief(result)}")
        gate.cap = config.orders

    async def _event(self, index: int, kind: str, session: aiohttp.ClientSession, monitor: Monitor) -> dict[str, Any]:
        daemon = self.daemon
        assert daemon is not None
        at = time.time()
        monitor.events.append(Event(index, kind, at))
        result: dict[str, Any] = {"index": index, "kind": kind, "at_s": round(time.monotonic() - self.started, 1)}
        if kind == "broker":
            await asyncio.to_thread(kafka_local.kill, self.kafka_dir)
            down = self.rng.uniform(1.0, 5.0)
            await asyncio.sleep(down)
            began = time.monotonic()
            await asyncio.to_thread(kafka_local.start, self.kafka_dir, heap=self.config.broker_heap)
            result |= {"broker_down_s": round(down, 1), "broker_start_s": round(time.monotonic() - began, 1)}
        else:
            if kind == "kill":
                await daemon.kill()
            else:
                code, seconds = await daemon.terminate(60)
                result |= {"exit_code": code, "stop_s": round(seconds, 2)}
            result["integrity"] = integrity(sqlite_files(self.state_dir))
            daemon.start()
            result["healthy_after_restart_s"] = round(await daemon.wait_healthy(session, 90), 2)
        recovered = None
        while recovered is None and time.time() - at < _RECOVERY_WAIT and time.monotonic() < self.deadline:
            await asyncio.sleep(0.5)
            recovered = recovery(monitor.samples, at)
        first = first_effect(monitor.samples, at)
        result["first_effect_s"] = None if first is None else round(first, 2)
        result["recovered_s"] = None if recovered is None else round(recovered, 2)
        return result

    async def _watch_daemon(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """A daemon that exits when no event stopped it has crashed: record it, restart it."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            daemon = self.daemon
            if daemon is None or self.event_running or daemon.running or stop.is_set():
                continue
            crash: dict[str, Any] = {"at_s": round(time.monotonic() - self.started, 1), "exit_code": daemon.returncode}
            crash["log_tail"] = daemon.log_tail(30)
            self.crashes.append(crash)
            self.log(f"chaos: the daemon exited on its own ({daemon.returncode}); restarting it")
            daemon.start()
            with contextlib.suppress(TimeoutError, RuntimeError):
                await daemon.wait_healthy(session, 90)

    async def _progress_log(self, monitor: Monitor, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 60.0)
            applied = {name: monitor.applied(name) for name in SINKS}
            elapsed = time.monotonic() - self.started
            self.log(f"chaos: {elapsed:.0f} s: {self.stats.valid_sent} orders sent, applied {applied}")

    async def _wait_committed(self) -> bool:
        """Until every sink's group committed the end of the orders topic (every record terminal)."""
        self.log("chaos: all sent; waiting until every group has committed the end of the orders topic")
        while time.monotonic() < self.deadline:
            with contextlib.suppress(Exception):
                positions = await verify.offsets(self.bootstrap, self.prefix)
                if all(p["equal"] for p in positions.values()):
                    return True
            await asyncio.sleep(2.0)
        self.failures.append("the groups did not commit the end of the orders topic within the budget")
        return False

    # ------------------------------------------------------------------ the proof

    async def _report(
        self, sandbox: SandboxClient, monitor: Monitor, throttle: Throttle, completed: bool
    ) -> dict[str, Any]:
        config, stats = self.config, self.stats
        self.log("chaos: checking ledgers, dead-letter topics and offsets")
        sent_numbers = stats.sent_numbers
        expected: dict[str, set[str]] = {name: sent_numbers - self.plan.rejected[name] for name in SINKS}
        effects = await verify.effects(sandbox, expected)
        bad_ids = [f"bad-{j:05d}" for j in range(config.bad_records)]
        rejected: dict[str, set[str]] = {name: self.plan.rejected[name] & sent_numbers for name in SINKS}
        dead = await verify.dead_letters(self.bootstrap, self.prefix, rejected, bad_ids)
        positions = await verify.offsets(self.bootstrap, self.prefix)
        (self.work / "samples.json").write_text(json.dumps(monitor.samples))
        charged, unexplained = monitor.duplicates_by_event()
        for event in self.events:
            event["duplicate_requests"] = dict(charged.get(event["index"], Counter()))
        downstream = monitor.stats.get("systems", {})
        report: dict[str, Any] = {
            "config": _jsonable(dataclasses.asdict(config)),
            "completed": completed,
            "duration_s": round(time.monotonic() - self.started, 1),
            "orders": {
                "planned": config.orders,
                "sent": stats.valid_sent,
                "via_webhook": stats.webhook_sent,
                "via_kafka": stats.kafka_sent,
                "webhook_refused": stats.webhook_refused_valid[:10],
            },
            "effects": {
                "expected": sum(e["expected"] for e in effects.values()),
                "applied": sum(e["applied"] for e in effects.values()),
                "lost": sum(e["lost"] for e in effects.values()),
                "applied_twice": sum(e["applied_twice"] for e in effects.values()),
                "per_sink": effects,
            },
            "dead_letters": {
                "expected": sum(d["expected"] for d in dead.values()),
                "found": sum(d["found"] for d in dead.values()),
                "copies_written_again_after_kills": sum(d["copies_written_again"] for d in dead.values()),
                "per_sink": dead,
            },
            "bad_input": {
                "webhooks": {
                    "sent": sum(stats.bad_webhook_answers.values()),
                    "answers": dict(stats.bad_webhook_answers),
                    "unexpected": stats.bad_webhook_unexpected[:20],
                },
                "records": {"sent": stats.bad_records_sent},
            },
            "duplicate_requests": {
                "after_each_kill": [e["duplicate_requests"] for e in self.events if e["kind"] == "kill"],
                "after_each_sigterm": [e["duplicate_requests"] for e in self.events if e["kind"] == "sigterm"],
                "after_each_broker_kill": [e["duplicate_requests"] for e in self.events if e["kind"] == "broker"],
                "resends_after_reset_faults": dict(monitor.fault_duplicates),
                "unexplained": len(unexplained),
                "unexplained_examples": [dataclasses.asdict(d) for d in unexplained[:10]],
                "in_flight_window_per_sink": config.max_in_flight,
                "request_log_gaps": monitor.log_gaps,
            },
            "recovery_s_after_each_kill": [e["recovered_s"] for e in self.events if e["kind"] == "kill"],
            "offsets": positions,
            "integrity_after_each_kill": [e["integrity"] for e in self.events if "integrity" in e],
            "events": self.events,
            "daemon_crashes": self.crashes,
            "final_stop": self.final_stop,
            "downstream": {
                "per_system": {
                    name: {k: downstream.get(name, {}).get(k) for k in ("requests", "applied", "by_status")}
                    for name in SINKS
                },
                "share_429": {name: _share(downstream.get(name, {}), "429") for name in SINKS},
                "share_503": {name: _share(downstream.get(name, {}), "503") for name in SINKS},
                "throttle_episodes": dict(throttle.episodes),
                "resets_after_effect": {name: downstream.get(name, {}).get("resets") for name in SINKS},
            },
            "webhook": {"attempts": stats.webhook_attempts, "answers": dict(stats.webhook_answers)},
            "kafka_producer_failures": stats.kafka_send_failures,
            "work_dir": str(self.work),
        }
        report["failures"] = self.failures + verify.judge(report, config)
        report["passed"] = not report["failures"]
        return report

    async def close(self) -> None:
        if self.daemon is not None and self.daemon.running:
            await self.daemon.kill()
        if self.sandbox_process is not None:
            await asyncio.to_thread(self.sandbox_process.stop)
        await asyncio.to_thread(kafka_local.stop, self.kafka_dir, grace=20.0)


class _Cursor:
    """A shared counter: several workers take the next index of one sequence."""

    def __init__(self) -> None:
        self._next = 0

    def take(self) -> int:
        index, self._next = self._next, self._next + 1
        return index


def _share(stats: dict[str, Any], status: str) -> float | None:
    requests = stats.get("requests") or 0
    return round(stats.get("by_status", {}).get(status, 0) / requests, 4) if requests else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _brief(result: dict[str, Any]) -> str:
    keys = ("exit_code", "healthy_after_restart_s", "broker_start_s", "first_effect_s", "recovered_s")
    return ", ".join(f"{k}={result[k]}" for k in keys if k in result)


async def run_chaos(config: ChaosConfig, log: Log = print) -> dict[str, Any]:
    """One whole run in its own work dir (removed afterwards unless `keep`, or the run failed)."""
    work = config.work_dir or Path(tempfile.mkdtemp(prefix="orderbus-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    run = ChaosRun(config, work, log)
    report: dict[str, Any] = {}
    try:
        report = await run.main()
        return report
    finally:
        await run.close()
        if report.get("passed") and not config.keep and config.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
