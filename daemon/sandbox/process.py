"""The sandbox as a process of its own (``python -m daemon.sandbox``), so it never competes with the daemon's loop."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from daemon.logs import configure
from daemon.sandbox.client import SandboxClient
from daemon.sandbox.faults import Auth, Faults, SystemConfig, parse_faults
from daemon.sandbox.records import CONTROL, SandboxError
from daemon.sandbox.server import Sandbox, build_sandbox_app
from topics.errors import ConfigError

log = logging.getLogger(__name__)


class SandboxProcess:
    """A sandbox running as its own process (`start_sandbox_process`); stopping sends SIGTERM."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_file: Path, own_log: bool) -> None:
        self.process = process
        self.url = url  # http://host:port, without a trailing slash
        self.port = int(url.rpartition(":")[2])
        self.log_file = log_file
        self._own_log = own_log

    def system_url(self, system: str) -> str:
        """Where a sink's base URL points for `system`: ``POST {system_url}/orders``."""
        return f"{self.url}/{system}"

    @property
    def token_url(self) -> str:
        """The OAuth2 token endpoint, for a sink's ``auth.token_url``."""
        return f"{self.url}{CONTROL}/oauth/token"

    def client(self, session: aiohttp.ClientSession | None = None) -> SandboxClient:
        return SandboxClient(self.url, session=session)

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; the exit code (0 after a clean stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._own_log and self.process.returncode == 0:
            self.log_file.unlink(missing_ok=True)
        return self.process.returncode

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_sandbox_process(
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    seed: int = 0,
    faults: Mapping[str, Mapping[str, Any]] | None = None,
    auth: Mapping[str, str] | None = None,
    keep_bodies: bool = True,
    log_file: Path | None = None,
    startup_timeout: float = 20.0,
) -> SandboxProcess:
    """Start ``python -m daemon.sandbox`` and return once it answers ``/_sandbox/stats``.

    Blocking (it is a few hundred milliseconds): call it from a sync fixture. `port` None takes a free port, which
    the child picks itself and reports on stdout, so there is no race for it. The child's log goes to `log_file`
    (by default a temporary file, deleted after a clean stop; a failed start quotes it in its `SandboxError`).
    """
    own_log = log_file is None
    if log_file is None:
        fd, name = tempfile.mkstemp(prefix="orderbus-sandbox-", suffix=".log")
        os.close(fd)
        log_file = Path(name)
    argv = [sys.executable, "-m", "daemon.sandbox", "--host", host, "--port", str(port or 0), "--seed", str(seed)]
    if faults:
        argv += ["--faults", json.dumps(faults)]
    if not keep_bodies:
        argv.append("--no-bodies")
    for system, spec in (auth or {}).items():
        argv += ["--auth", f"{system}={spec}"]
    with log_file.open("ab") as log_out:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_out, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + startup_timeout
    try:
        url = _read_url(process, deadline)
        # S310: the URL is the child's own http:// address, read from its stdout.
        stats_url = f"{url}{CONTROL}/stats"
        with urllib.request.urlopen(stats_url, timeout=max(0.1, deadline - time.monotonic())):  # noqa: S310
            pass
    except (OSError, SandboxError) as exc:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
        tail = log_file.read_text(errors="replace")[-2000:]
        if own_log:
            log_file.unlink()
        raise SandboxError(f"the sandbox process did not start: {exc}; its log ends:\n{tail}") from None
    return SandboxProcess(process, url, log_file, own_log)


def _read_url(process: subprocess.Popen[bytes], deadline: float) -> str:
    """The first stdout line of the child: the URL it listens on, printed once its socket is bound."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if selector.select(remaining):
                line = process.stdout.readline().decode().strip()
                if line.startswith("http://"):
                    return line
                raise SandboxError(f"exited with code {process.wait()}")
    raise SandboxError("no answer within the start-up timeout")


def main(argv: list[str] | None = None) -> int:
    """``python -m daemon.sandbox``: serve until SIGTERM/SIGINT. Exit codes: 0 stopped, 2 bad options."""
    parser = argparse.ArgumentParser(prog="python -m daemon.sandbox", description="Sandbox downstream systems.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8700, help="0: any free port (printed on stdout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    parser.add_argument("--faults", help='JSON file, or inline JSON such as {"crm": {"p503": 0.1}}')
    parser.add_argument("--auth", action="append", default=[], metavar="SYSTEM=SPEC", help="e.g. crm=bearer:TOKEN")
    parser.add_argument("--max-request-log", type=int, default=20_000, help="requests kept per system")
    parser.add_argument("--no-bodies", action="store_true", help="keep no bodies (read-back: null); for benchmarks")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--stop-on-stdin-eof",
        action="store_true",
        help="stop when stdin closes: a parent holding a pipe to it stops it by ending, a kill -9 included",
    )
    args = parser.parse_args(argv)
    configure(args.log_level)
    try:
        sandbox = Sandbox(
            seed=args.seed,
            faults=_load_faults(args.faults),
            config=_auth_options(args.auth),
            max_request_log=args.max_request_log,
            keep_bodies=not args.no_bodies,
        )
    except ConfigError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve_until_signal(sandbox, args.host, args.port, stdin_eof=args.stop_on_stdin_eof))


def _load_faults(option: str | None) -> dict[str, Faults]:
    if option is None:
        return {}
    try:
        text = option if option.lstrip().startswith("{") else Path(option).read_text()
        data = json.loads(text)
    except OSError as exc:
        raise ConfigError(f"--faults: cannot read {option}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"--faults: not JSON: {exc}") from None
    return parse_faults(data)


def _auth_options(options: Sequence[str]) -> dict[str, SystemConfig]:
    config: dict[str, SystemConfig] = {}
    for option in options:
        system, sep, spec = option.partition("=")
        if not sep:
            raise ConfigError(f"--auth {option.split(':')[0]}...: expected SYSTEM=SPEC")
        config[system] = SystemConfig(auth=Auth.parse(spec, f"--auth {system}"))
    return config


async def _serve_until_signal(sandbox: Sandbox, host: str, port: int, *, stdin_eof: bool = False) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if stdin_eof:
        # `orderbus demo` starts it in a session of its own (Ctrl-C is the demo's): killed with -9, the demo left
        # it running for good, holding its port, and the next `make run` failed on it. Watched by the loop, not by a
        # thread blocked in a read: that thread held stdin's lock at exit, and the interpreter died on it (SIGABRT,
        # "could not acquire lock for <stdin> at interpreter shutdown") after a failed start.
        def on_stdin() -> None:
            try:
                ended = not os.read(fd, 4096)
            except OSError:  # a terminal hung up (EIO): as good as closed
                ended = True
            if ended:
                loop.remove_reader(fd)
                stop.set()

        try:
            fd = sys.stdin.fileno()
            loop.add_reader(fd, on_stdin)
        except (AttributeError, ValueError, OSError):
            # No stdin, or one the loop cannot watch (/dev/null, a regular file: EPERM): it has nothing more to
            # give, which is what the option waits for.
            stop.set()
    # Everything alive now (modules, classes) lives as long as the process: move it out of the collector's sight,
    # so that full collections during a benchmark walk only what requests create.
    gc.collect()
    gc.freeze()
    # handler_cancellation: a held request (p_timeout, delays) ends when its client gives up.
    runner = web.AppRunner(build_sandbox_app(sandbox), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            print(f"sandbox: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return 2
        bound = runner.addresses[0][1]
        print(f"http://{host}:{bound}", flush=True)
        log.info("sandbox listening", extra={"url": f"http://{host}:{bound}", "seed": sandbox.seed})
        await stop.wait()
        log.info("sandbox stopping")
    finally:
        await runner.cleanup()
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


__all__ = ["SandboxProcess", "main", "start_sandbox_process"]
