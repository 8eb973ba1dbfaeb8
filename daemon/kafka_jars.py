"""The Apache Kafka jars for `daemon.kafka_local`: resolved once by Maven into a cache outside the repository.

deploy/kafka/pom.xml names the broker's artifacts; `fetch_jars` copies them with their dependencies into
``<cache>/libs`` and marks that directory complete with the pom's hash, so a changed pom fetches again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from topics.errors import LocalKafkaError

KAFKA_VERSION = "4.1.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"
POM_PATH = DEPLOY_DIR / "pom.xml"

_MARKER = ".complete"  # written into libs/ last, holding the pom's hash
_MVN_TIMEOUT = 900.0

Log = Callable[[str], None]


def no_log(message: str) -> None:
    """The default `log`: the tooling never prints; callers pass `print` or a logger method."""


def default_cache_dir() -> Path:
    """$ORDERBUS_KAFKA_CACHE, else $XDG_CACHE_HOME/orderbus/kafka-<version>, else ~/.cache/orderbus/..."""
    if explicit := os.environ.get("ORDERBUS_KAFKA_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "orderbus" / f"kafka-{KAFKA_VERSION}"


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Serialise start/stop (or jar downloads) of one directory across processes."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def require(tool: str) -> str:
    if path := shutil.which(tool):
        return path
    raise LocalKafkaError(f"{tool!r} is not on PATH; the local Kafka broker needs Java 17+ and Maven")


def fetch_jars(cache_dir: Path | None = None, *, log: Log = no_log) -> Path:
    """Resolve the broker's jars with Maven into `cache_dir/libs` and return that directory.

    Idempotent: nothing happens while libs/.complete holds the pom's hash. Maven writes into a temporary
    sibling that is renamed into place only when complete: an interrupted download leaves no half-filled libs.
    """
    cache = (cache_dir or default_cache_dir()).resolve()
    libs = cache / "libs"
    digest = hashlib.sha256(POM_PATH.read_bytes()).hexdigest()

    def current() -> bool:
        with suppress(OSError):
            return (libs / _MARKER).read_text().strip() == digest
        return False

    if current():
        return libs
    mvn = require("mvn")
    require("java")
    with locked(cache):
        if current():  # another process finished the download while we waited for the lock
            return libs
        for stale in cache.glob("libs.*-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix="libs.partial-", dir=cache))
        try:
            log(f"resolving Apache Kafka {KAFKA_VERSION} jars with Maven into {libs}")
            argv = [mvn, "-B", "-q", "-f", str(POM_PATH), "dependency:copy-dependencies"]
            argv += [f"-DoutputDirectory={partial}", "-DincludeScope=runtime"]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=_MVN_TIMEOUT, check=False)
            except subprocess.TimeoutExpired as exc:
                raise LocalKafkaError(f"mvn did not finish within {_MVN_TIMEOUT:.0f} s") from exc
            output = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
            if done.returncode != 0:
                raise LocalKafkaError(f"mvn failed (exit code {done.returncode}):\n{output}")
            if not any(partial.glob("kafka_2.13-*.jar")):
                raise LocalKafkaError(f"mvn succeeded but copied no kafka_2.13 jar:\n{output}")
            (partial / _MARKER).write_text(digest + "\n")
            if libs.exists():
                libs.rename(cache / f"libs.old-{os.getpid()}")
            partial.rename(libs)
        finally:
            for leftover in cache.glob("libs.*-*"):
                shutil.rmtree(leftover, ignore_errors=True)
    return libs


__all__ = [
    "KAFKA_VERSION",
    "POM_PATH",
    "REPO_ROOT",
    "Log",
    "default_cache_dir",
    "fetch_jars",
    "locked",
    "no_log",
    "require",
]
