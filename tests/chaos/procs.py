"""The real processes of a chaos run: the daemon (`python -m daemon run --config FILE`), its config, and checks on
its SQLite files. The broker is `daemon.kafka_local`'s and the downstream systems are `daemon.sandbox`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from topics.catalogue import SINKS


@dataclass(frozen=True)
class DaemonConfig:
    """What the chaos run sets in the daemon's TOML file; the rest are the daemon's defaults."""

    bootstrap: str
    prefix: str
    state_dir: Path
    port: int
    secret: str
    system_urls: dict[str, str]
    partitions: int = 6
    max_in_flight: int = 64
    commit_interval: float = 0.5
    shutdown_grace: float = 8.0

    def toml(self) -> str:
        lines = [
            f'state_dir = "{self.state_dir}"',
            'log_level = "INFO"',
            "[kafka]",
            f'bootstrap_servers = "{self.bootstrap}"',
            "request_timeout = 5",
            "[topics]",
            f'prefix = "{self.prefix}"',
            f"orders_partitions = {self.partitions}",
            "[ingest]",
            f"port = {self.port}",
            f'webhook_secrets = ["{self.secret}"]',
            "publish_timeout = 5",
            "retry_after = 1",
        ]
        for name in SINKS:
            lines += [
                f"[sinks.{name}]",
                "enabled = true",
                f'base_url = "{self.system_urls[name]}"',
                f"max_in_flight = {self.max_in_flight}",
                f"commit_interval = {self.commit_interval}",
                f"shutdown_grace = {self.shutdown_grace}",
                "request_timeout = 10",
                "backoff_base = 0.05",
                "backoff_cap = 2",
                # Faults are temporary here; only the scripted 400s may end as dead letters.
                "max_attempts = 1000",
                "max_elapsed = 86400",
            ]
        return "\n".join(lines) + "\n"


class DaemonProcess:
    """The daemon as systemd runs it; every start appends to one log file."""

    def __init__(self, config: Path, log: Path, base_url: str) -> None:
        self.config = config
        self.log = log
        self.base_url = base_url
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"--- chaos: start {self.starts + 1} at {time.time():.3f}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    async def wait_healthy(self, session: aiohttp.ClientSession, timeout: float) -> float:
        """Seconds until /healthz answers 200 (the ingest listens once every sink has joined its group)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.running:
                raise RuntimeError(f"the daemon exited with {self.returncode} while starting:\n{self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{self.base_url}/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the daemon did not answer /healthz within {timeout:.0f} s:\n{self.log_tail()}")

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.process.wait)

    async def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code, seconds to exit). A daemon still there after `timeout` is killed (code None)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            await self.kill()
            code = None
        return code, time.monotonic() - started

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def integrity(files: Iterable[Path]) -> dict[str, str]:
    """`PRAGMA integrity_check` of each SQLite file (run while the daemon is down)."""
    results = {}
    for path in sorted(files):
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
                results[path.name] = str(db.execute("PRAGMA integrity_check").fetchone()[0])
        except sqlite3.Error as exc:
            results[path.name] = f"error: {exc}"
    return results


def sqlite_files(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("*.sqlite"))
