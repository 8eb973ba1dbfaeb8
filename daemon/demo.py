"""`orderbus demo`, which `make run` runs: the whole flow on this machine, watched live, stopped cleanly.

    generator ──signed webhook──▶ daemon: ingest ──▶ Kafka "orders" ──▶ crm, accounting, shipping sinks
    (the shop)                                                              └──▶ the sandbox process: three systems

Start, in dependency order (one `AsyncExitStack` closes everything in reverse):

1. the sandbox process, in a session of its own, so that a Ctrl-C in the terminal reaches the demo alone and the
   sandbox outlives the daemon's drain; its faults come from a file (``deploy/dev/sandbox-faults.json``), each
   system's credentials from the sinks' ``auth`` settings, set through its control API (never on a command line);
2. local Kafka (`daemon.kafka_local`, while the sandbox starts) and the topic catalogue;
3. the daemon in this process (`daemon.lifecycle.serve`), its metrics on a registry the view reads and its JSON
   log in a file, so that the terminal shows the view alone;
4. the generator (`daemon.generator`), posting orders through the signed webhook;
5. the live view (`daemon.live_view`), once a second, until Ctrl-C, SIGTERM or ``--duration``.

Stop (the first Ctrl-C, SIGTERM or SIGHUP): the generator stops and waits for its answers; the sinks get up to
``catch_up`` seconds to finish what was sent (their committed offsets reach the end of the topic), so that the
next run starts with nothing left over; the daemon drains and commits; the sandbox's counts are read; the sandbox
stops, and Kafka too unless it was running before the demo (``orderbus kafka start``: that broker is left
running); the summary is printed. A second Ctrl-C stops at once (exit code 130).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from consumers.clock import SystemClock
from consumers.tasks import cancel_and_wait
from daemon import kafka_local
from daemon.demo_settings import RUN_DIR, DemoLayout, DemoOptions, demo_layout, sandbox_auth
from daemon.generator import Generator, GeneratorStats, Plan, http_poster
from daemon.kafka_options import client_options, topic_layout
from daemon.lifecycle import serve
from daemon.live_view import LiveView, SinkSummary, Summary, render_summary, snapshot
from daemon.logs import configure
from daemon.sandbox import SandboxClient, SandboxError
from daemon.settings import Settings
from topics.admin import apply_catalogue, group_offsets, partition_ids
from topics.catalogue import catalogue, consumer_group, orders_topic
from topics.errors import BrokerError, ConfigError, LocalKafkaError, NotYetError

# SIGHUP too: the terminal closed. The sandbox, in a session of its own, would not get it and stay behind.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_REFRESH = 1.0  # seconds between frames of the live view
_STARTUP_TIMEOUT = 60.0
_PROBE_TIMEOUT = 1.0  # seconds for one /healthz probe during the start
# Seconds to wait for the sinks' groups to take a commit: a broker just started, or a killed run's members not yet
# timed out (`consumers.membership.DYNAMIC_SESSION_TIMEOUT`, then the rebalance).
_COORDINATOR_WAIT = 30.0
_CATCH_UP_POLL = 0.5  # committed offsets are looked at this often while the sinks catch up
_FIRST_DELIVERY_WAIT = 600.0  # the sandbox's longest server-side wait


async def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """The whole demo; 0 after a clean stop, 130 after a second Ctrl-C, 1 if another demo runs on the same Kafka
    data dir. Signals: see the module docstring."""
    with _only_demo(options.kafka_dir) as holder:
        if holder is not None:
            print(
                f"orderbus demo: another demo (pid {holder}) is running with {_shown(options.kafka_dir)}; stop it "
                "first (Ctrl-C in its terminal), or give this one --kafka-dir and ports of its own",
                file=out,
            )
            return 1
        return await _run_demo(options, out)


@contextmanager
def _only_demo(kafka_dir: Path) -> Iterator[str | None]:
    """Hold the demo lock of `kafka_dir` while the block runs; yields None, or the pid of the demo holding it.

    A second demo on the same data dir found the first one's broker, failed on its busy ports, and on its way out
    stopped that broker, which it had not started: the first demo went on drawing "ok" frames with Kafka gone. The
    lock is the kernel's (flock), so a demo killed with -9 leaves none behind.
    """
    path = kafka_dir.parent / f"{kafka_dir.name}.demo.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            yield handle.read().strip() or "unknown"
            return
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield None


async def _run_demo(options: DemoOptions, out: TextIO) -> int:
    started = time.monotonic(), time.time()
    layout = demo_layout(options)
    options.log_dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main_task = asyncio.current_task()
    hard = False

    def on_signal() -> None:
        nonlocal hard
        if stop.is_set() and not hard and main_task is not None:
            hard = True
            main_task.cancel()
        stop.set()

    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal)
    try:
        with (options.log_dir / "orderbus.log").open("a", encoding="utf-8") as log:
            configure(layout.settings.log_level, log)
            summary = await _Demo(layout, options, out, stop, started).run()
    except asyncio.CancelledError:
        over_echo = "\r" if out.isatty() else ""  # back over the "^C" the terminal echoed
        print(f"{over_echo}orderbus demo: stopped at once (second Ctrl-C)", file=out)
        return 130
    finally:
        configure(layout.settings.log_level)  # the log file is closed: back to stderr
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    print("\n".join(render_summary(summary)), file=out, flush=True)
    return 0


class _Demo:
    """One run: starts everything on an exit stack, shows the view until stopped, then collects the summary."""

    def __init__(
        self, layout: DemoLayout, options: DemoOptions, out: TextIO, stop: asyncio.Event, started: tuple[float, float]
    ) -> None:
        self.layout = layout
        self.settings = layout.settings
        self.options = options
        self.out = out
        self.stop = stop
        self.started, self.started_wall = started
        self.sinks = list(self.settings.enabled_sinks())
        self.registry = CollectorRegistry()
        self.view = LiveView(out)
        self.generator: Generator | None = None
        self.broker: kafka_local.BrokerInfo | None = None  # once Kafka answers
        self._daemon_stop = asyncio.Event()
        self._start_failed = False  # the daemon ended during its start, and `_wait_listening` raised why

    def say(self, text: str) -> None:
        print(f"orderbus demo: {text}", file=self.out, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def run(self) -> Summary:
        async with AsyncExitStack() as stack:
            # The sandbox starts while Kafka does, and stops after the daemon and before Kafka.
            sandbox_process = await self._spawn_sandbox()
            try:
                await self._start_kafka(stack)
            except BaseException:
                await self._stop_sandbox(sandbox_process)
                raise
            stack.push_async_callback(self._stop_sandbox, sandbox_process)
            sandbox = await self._sandbox_ready(stack, sandbox_process)
            await self._apply_topics()
            await self._skip_leftovers()
            daemon = await self._start_daemon(stack)
            first = {name: asyncio.create_task(self._first_delivery(sandbox, name)) for name in self.sinks}
            stack.push_async_callback(cancel_and_wait, *first.values())
            generator, generator_stop, generating = await self._start_generator(stack)
            if self.options.duration is not None:
                stack.callback(asyncio.get_running_loop().call_later(self.options.duration, self.stop.set).cancel)

            await self._show_until(asyncio.ensure_future(self.stop.wait()), daemon, "Ctrl-C stops")
            await _finish(generator_stop, generating)
            left = await self._catch_up(daemon)
            then = "the sandbox and Kafka" if self._kafka_ours() else "the sandbox"
            self.say(f"stopping the daemon (drain + commit), then {then}")
            await self._stop_daemon(daemon)
            sandbox_stats = await self._sandbox_stats(sandbox)
            return self._summary(generator.stats, sandbox_stats, left, first)

    # --- start --------------------------------------------------------------------------------------------------

    async def _spawn_sandbox(self) -> asyncio.subprocess.Process:
        argv = [sys.executable, "-m", "daemon.sandbox", "--port", str(self.layout.sandbox_port), "--stop-on-stdin-eof"]
        argv += ["--faults", str(self.options.faults), "--seed", str(random.SystemRandom().randrange(1 << 31))]
        with (self.options.log_dir / "sandbox.log").open("ab") as log:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,  # never written: it ends with this process, and the sandbox with it
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # not in the terminal's process group: Ctrl-C is the demo's to handle
            )

    async def _start_kafka(self, stack: AsyncExitStack) -> None:
        began = time.monotonic()
        where, port = self.options.kafka_dir, self.layout.kafka_port
        self.say(f"starting Kafka {kafka_local.KAFKA_VERSION} on 127.0.0.1:{port} (data in {_shown(where)})")
        # Shielded and pushed first: a second Ctrl-C during the start leaves the thread starting the broker, and
        # `_stop_kafka` waits for that start to learn whether it launched the broker or found it running.
        starting = asyncio.ensure_future(asyncio.to_thread(kafka_local.start, where, port=port))
        stack.push_async_callback(self._stop_kafka, starting)
        try:
            self.broker = await asyncio.shield(starting)
        except LocalKafkaError as exc:
            if _port_in_use(exc) and str(exc).startswith("broker port"):
                raise LocalKafkaError(f"{exc}; run the demo on another port: --kafka-port N") from exc
            raise
        if self.broker.launched:
            self.say(f"Kafka ready in {time.monotonic() - began:.1f} s")
        else:
            self.say(f"Kafka was already running (pid {self.broker.pid}): the demo uses it and leaves it running")

    async def _sandbox_ready(self, stack: AsyncExitStack, process: asyncio.subprocess.Process) -> SandboxClient:
        """Wait for the sandbox's first stdout line (its URL, printed once it listens), then set its credentials."""
        assert process.stdout is not None
        with suppress(TimeoutError):
            line = await asyncio.wait_for(process.stdout.readline(), _STARTUP_TIMEOUT)
            if line.startswith(b"http://"):
                client = await stack.enter_async_context(SandboxClient(self.layout.sandbox_url))
                for name in self.sinks:
                    await client.configure(name, auth=sandbox_auth(self.settings.sinks[name]))
                faults = _shown(self.options.faults)
                self.say(f"sandbox systems {', '.join(self.sinks)} on {self.layout.sandbox_url} (faults: {faults})")
                return client
        log = kafka_local.tail(self.options.log_dir / "sandbox.log", 10)
        raise SandboxError(
            f"the sandbox did not start on port {self.layout.sandbox_port} (if an earlier demo was killed, its "
            f"sandbox may still hold the port: `pgrep -af daemon.sandbox`; or run the demo on another port: "
            f"--sandbox-port N); its log ends:\n{log}"
        )

    async def _apply_topics(self) -> None:
        specs = catalogue(topic_layout(self.settings.topics))
        report = await apply_catalogue(specs, client_options(self.settings.kafka))
        self.say(f"topics: {len(report.created)} created, {len(report.unchanged)} already there")

    async def _skip_leftovers(self) -> None:
        """Orders a previous run sent and its sinks never delivered (it was stopped at once, or killed) were meant for
        that run's sandbox, which is gone: this one knows none of those orders, and their updates and cancels would
        come back 404 and be dead-lettered. The sinks start at the end of the topic instead, and the demo says so.
        Bounded: if the groups do not take the commit in time, the demo says so and goes on with the leftovers."""
        deadline = time.monotonic() + _COORDINATOR_WAIT
        waited = False
        while True:
            try:
                # aiokafka retries some coordinator errors by itself, without end: each try has the time left.
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    async with _Progress(self.settings, self.sinks) as progress:
                        skipped = await progress.skip_to_end()
                break
            except (BrokerError, TimeoutError) as exc:
                # A broker just started loads its group coordinator for a few seconds, and a killed run's members
                # stay in their groups (which then refuse an outsider's commit) until their session times out.
                if time.monotonic() >= deadline:
                    self.say(f"could not skip what the last run left undelivered ({exc or 'no answer'}): it follows")
                    return
                if not waited:
                    self.say(
                        "waiting for the sinks' consumer groups (Kafka loads them after its start; a killed run's "
                        "consumers stay in them until their sessions time out)"
                    )
                    waited = True
                await asyncio.sleep(_CATCH_UP_POLL)
        if any(skipped.values()):
            counts = ", ".join(f"{name} {count}" for name, count in skipped.items() if count)
            self.say(f"skipped the records the last run left undelivered (its sandbox is gone): {counts}")

    async def _start_daemon(self, stack: AsyncExitStack) -> asyncio.Task[None]:
        daemon = asyncio.create_task(serve(self.settings, self._daemon_stop, registry=self.registry), name="daemon")
        stack.push_async_callback(self._stop_daemon, daemon)
        await self._wait_listening(daemon)
        url, log = self.layout.ingest_url, _shown(self.options.log_dir / "orderbus.log")
        self.say(f"daemon: ingest {url}/v1/orders, metrics {self.layout.settings.admin_url()}/metrics")
        self.say(f"daemon: sinks {', '.join(self.sinks)}; its JSON log goes to {log}")
        self.say(f"the sinks at a glance, from another terminal: {self._status_command()}")
        return daemon

    def _status_command(self) -> str:
        """``orderbus status`` for this run's daemon, to copy: by its URL, since the config file does not know a
        port moved with --ingest-port (``status --config`` asked the file's port, another process's or none)."""
        return f"{_program()} status --url {self.layout.settings.admin_url()}"

    async def _wait_listening(self, daemon: asyncio.Task[None]) -> None:
        """Until /healthz answers; `serve` has no "listening" signal, so this one start-up wait polls. Each probe
        is short: a process that holds the port and never answers must not hold the demo with it."""
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT)) as session:
            while time.monotonic() < deadline:
                if daemon.done():
                    self._start_failed = True
                    try:
                        await daemon  # raises what stopped it (a port in use, Kafka unreachable)
                    except (ConfigError, NotYetError) as exc:
                        if _port_in_use(exc):
                            raise ConfigError(f"{exc}; run the demo on another port: --ingest-port N") from exc
                        raise
                    raise BrokerError("the daemon stopped during start-up")
                with suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.layout.ingest_url}/healthz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise BrokerError(f"the daemon did not answer on {self.layout.ingest_url} within {_STARTUP_TIMEOUT:.0f} s")

    async def _start_generator(self, stack: AsyncExitStack) -> tuple[Generator, asyncio.Event, asyncio.Task[None]]:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        seed = random.SystemRandom().randrange(1 << 63)  # webhook-ids and order numbers new on every run
        generator = Generator(
            http_poster(session, f"{self.layout.ingest_url}/v1/orders"),
            self.layout.secret,
            rate=self.options.rate,
            plan=Plan(random.Random(seed)),
            clock=SystemClock(),
        )
        self.generator = generator
        generator_stop = asyncio.Event()
        task = asyncio.create_task(generator.run(generator_stop), name="generator")
        stack.push_async_callback(_finish, generator_stop, task)
        until = "Ctrl-C" if self.options.duration is None else f"{self.options.duration:g} s have passed"
        self.say(f"generator: {self.options.rate:g} orders/s through the signed webhook until {until}")
        return generator, generator_stop, task

    async def _first_delivery(self, sandbox: SandboxClient, system: str) -> float | None:
        """Seconds from the demo's start to the system's first applied effect (the sandbox waits, nobody polls)."""
        try:
            entries = await sandbox.wait_ledger(system, 1, timeout=_FIRST_DELIVERY_WAIT)
        except (SandboxError, aiohttp.ClientError, TimeoutError):
            return None
        return entries[0]["at"] - self.started_wall

    # --- run and stop -------------------------------------------------------------------------------------------

    async def _show_until(self, done: asyncio.Future[Any], daemon: asyncio.Task[None], status: str) -> None:
        """Redraw the view every second until `done` completes or the daemon stops; the last frame is drawn too."""
        assert self.generator is not None
        try:
            while True:
                current = snapshot(self.registry, self.sinks, self.generator.stats, time.monotonic())
                self.view.show(current, self.elapsed(), status)
                if done.done() or daemon.done():
                    return
                await asyncio.wait((done, daemon), timeout=_REFRESH, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()

    async def _catch_up(self, daemon: asyncio.Task[None]) -> dict[str, int] | None:
        """Give the sinks up to `catch_up` s to commit everything sent; what each has left (None: unknown)."""
        if daemon.done():
            return None
        try:
            async with _Progress(self.settings, self.sinks) as progress:
                waiting = asyncio.ensure_future(progress.wait_done(self.options.catch_up))
                status = (
                    f"stopping: the sinks finish what was sent (up to {self.options.catch_up:g} s; Ctrl-C: at once)"
                )
                await self._show_until(waiting, daemon, status)
                with suppress(asyncio.CancelledError):
                    await waiting
                return await progress.unfinished()
        except BrokerError:
            return None

    async def _stop_daemon(self, daemon: asyncio.Task[None]) -> None:
        """A clean stop (drain + commit); while the demo is being cancelled (a second Ctrl-C), a hard one.

        A daemon that failed to start has had its error raised by `_wait_listening`, with a hint where there is
        one: raised again here, while the stack unwinds, it would replace that one.
        """
        if self._start_failed:
            return
        self._daemon_stop.set()
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            daemon.cancel()
        with suppress(asyncio.CancelledError):
            await daemon

    async def _sandbox_stats(self, sandbox: SandboxClient) -> dict[str, Any] | None:
        try:
            return await sandbox.stats()
        except (SandboxError, aiohttp.ClientError):
            return None

    async def _stop_sandbox(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 5.0)
            except TimeoutError:
                process.kill()
                await process.wait()

    async def _stop_kafka(self, starting: asyncio.Future[kafka_local.BrokerInfo]) -> None:
        """Stop the broker the demo launched. One it found running was started by someone else (``orderbus kafka
        start``, the README's flow without the demo), who is still using it; a start that failed has already
        stopped what it launched (`kafka_local.start`)."""
        await asyncio.wait([starting])  # after a second Ctrl-C the start goes on in its thread: wait for it
        if starting.cancelled() or starting.exception() is not None:
            return
        if starting.result().launched:
            await asyncio.to_thread(kafka_local.stop, self.options.kafka_dir)
        else:
            self.say(f"Kafka left running, as it was before the demo; `{self._kafka_command('stop')}` stops it")

    def _kafka_ours(self) -> bool:
        """Whether the demo launched the broker it uses, and so stops it at the end."""
        return self.broker is not None and self.broker.launched

    def _summary(
        self,
        stats: GeneratorStats,
        sandbox: Mapping[str, Any] | None,
        left: Mapping[str, int] | None,
        first: Mapping[str, asyncio.Task[float | None]],
    ) -> Summary:
        final = snapshot(self.registry, self.sinks, stats, time.monotonic())
        systems = (sandbox or {}).get("systems", {})
        rows = {}
        for name in self.sinks:
            sink, system = final.sinks[name], systems.get(name)
            task = first[name]
            rows[name] = SinkSummary(
                delivered=int(sink.delivered),
                dead_lettered=int(sink.dead_lettered),
                dedup_skipped=int(sink.duplicates),
                downstream_replays=None if system is None else system["duplicate_requests"],
                applied=None if system is None else system["applied"],
                left=None if left is None else left[name],
                first_delivery=task.result() if task.done() and not task.cancelled() else None,
            )
        return Summary(self.elapsed(), stats, rows, self._hints(rows))

    def _kafka_command(self, action: str) -> str:
        """``orderbus kafka ACTION`` for the demo's data dir, to copy."""
        data_dir = "" if self.options.kafka_dir == RUN_DIR / "kafka" else f" --data-dir {self.options.kafka_dir}"
        return f"{_program()} kafka {action}{data_dir}"

    def _hints(self, rows: Mapping[str, SinkSummary]) -> list[str]:
        program = _program()
        config = _shown(self.options.config)
        # The port option is not in the file: say it again.
        port = self.options.kafka_port
        broker = "" if port is None else f"ORDERBUS_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:{port} "
        hints = []
        dead = [name for name, row in rows.items() if row.dead_lettered]
        if dead:
            listings = [f"  {broker}{program} dlq list --sink {name} --config {config}" for name in dead]
            if self._kafka_ours():  # stopped with the demo: started again to read them, and stopped again
                listings = [f"  {self._kafka_command('start')}", *listings, f"  {self._kafka_command('stop')}"]
            hints += [
                "Dead letters stay in Kafka with their reason, the answer (status, first KiB of its body) and "
                "attempts; to look at them:",
                *listings,
            ]
        logs = self.options.log_dir
        kafka, state = _shown(self.options.kafka_dir), _shown(self.settings.state_dir)
        return [
            *hints,
            f"Logs: {_shown(logs / 'orderbus.log')} (the daemon, JSON lines) and {_shown(logs / 'sandbox.log')}.",
            f"Kafka's data ({kafka}) and the delivery state ({state}) stay for the next run.",
        ]


async def _finish(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await task


def _program() -> str:
    """How the user called orderbus (``.venv/bin/orderbus`` under make run), for commands to copy."""
    called = Path(sys.argv[0])
    return _shown(called) if called.name == "orderbus" else "orderbus"


def _port_in_use(exc: BaseException) -> bool:
    """Whether `exc` comes from a bind to a port another process holds."""
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is under it, else absolute."""
    absolute = path.resolve()
    cwd = Path.cwd()
    return str(absolute.relative_to(cwd)) if absolute.is_relative_to(cwd) else str(absolute)


class _OffsetsUnknown(BrokerError):
    """The broker answered without a group's committed offsets: not known yet, never "nothing committed"."""


class _Progress:
    """How much of the orders topic each sink's group has not committed yet: end offsets - committed offsets."""

    def __init__(self, settings: Settings, sinks: list[str]) -> None:
        self._options = client_options(settings.kafka)
        self._topic = orders_topic(settings.topics.prefix)
        self._groups = {name: consumer_group(name, settings.topics.prefix) for name in sinks}
        self._admin = AIOKafkaAdminClient(**self._options)
        self._consumer = AIOKafkaConsumer(**self._options, enable_auto_commit=False)
        self._partitions: list[TopicPartition] = []

    async def __aenter__(self) -> _Progress:
        try:
            await self._admin.start()
            await self._consumer.start()
            ids = await partition_ids(self._topic, self._options)  # a BrokerError of its own
        except KafkaError as exc:
            await self.__aexit__()
            raise BrokerError(f"cannot read the sinks' progress: {exc!r}") from exc
        except BrokerError:
            await self.__aexit__()
            raise
        self._partitions = [TopicPartition(self._topic, p) for p in ids]
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def unfinished(self, ends: Mapping[TopicPartition, int] | None = None) -> dict[str, int]:
        """Per sink, the records its group has not committed; `ends`: the topic's end offsets, if just read."""
        try:
            if ends is None:
                ends = await self._consumer.end_offsets(self._partitions)
            left = {}
            for name, group in self._groups.items():
                done = await self._committed(group)
                left[name] = sum(max(0, ends[tp] - done[tp]) for tp in self._partitions)
        except KafkaError as exc:
            raise BrokerError(f"cannot read the sinks' progress: {exc!r}") from exc
        return left

    async def _committed(self, group: str) -> dict[TopicPartition, int]:
        """`group`'s committed offset of every partition, 0 where it has committed none (the broker's -1);
        `_OffsetsUnknown`, to ask again, while the broker does not tell them (`topics.admin.group_offsets`: taken
        as "nothing committed", they made the whole topic the last run's leftovers)."""
        offsets = await group_offsets(self._admin, group, self._partitions)
        if offsets is None:
            raise _OffsetsUnknown(
                f"the broker did not tell {group}'s committed offsets: its group coordinator is not ready"
            )
        return {tp: max(0, offset) for tp, offset in offsets.items()}

    async def skip_to_end(self) -> dict[str, int]:
        """Commit the end of the topic for every group that has not reached it; what each skipped."""
        try:
            ends = await self._consumer.end_offsets(self._partitions)
        except KafkaError as exc:
            raise BrokerError(f"cannot read the end of {self._topic}: {exc!r}") from exc
        if not any(ends.values()):  # an empty topic (a new broker): nothing to skip, no group to ask
            return dict.fromkeys(self._groups, 0)
        left = await self.unfinished(ends)
        try:
            for name, count in left.items():
                if count:
                    await self._commit(self._groups[name], ends)
        except KafkaError as exc:
            raise BrokerError(f"cannot move the sinks past the last run's records: {exc!r}") from exc
        return left

    async def _commit(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        """`offsets` as `group`'s committed offsets; no member of the group runs (the daemon starts after this)."""
        consumer = AIOKafkaConsumer(**self._options, group_id=group, enable_auto_commit=False)
        try:
            await consumer.start()
            consumer.assign(list(offsets))
            await consumer.commit(dict(offsets))
        finally:
            await consumer.stop()

    async def wait_done(self, timeout: float) -> None:
        """Until every sink has committed the whole topic, or `timeout` s; commits have no event, so this polls.
        An answer without the committed offsets counts as not done yet."""
        deadline = time.monotonic() + timeout
        while True:
            with suppress(_OffsetsUnknown):
                if not any((await self.unfinished()).values()):
                    return
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(_CATCH_UP_POLL)
