"""A real Apache Kafka broker on this machine, without Docker: for tests, the demo and benchmarks.

One combined broker+controller KRaft node on 127.0.0.1, run from jars that Maven resolves once into a cache
outside the repository (`fetch_jars`, `daemon.kafka_jars`); `probe` (`daemon.kafka_wire`) tells when it answers.
This is synchronous CLI and test tooling; the daemon never imports it. Background and pitfalls:
/work/shared/design/kafka-local.md.

A data dir holds everything of one broker::

    broker.json         state: cluster id, ports, pid of the running broker (null once stopped)
    server.properties   rendered from deploy/kafka/server.properties.tmpl
    kafka.out           the JVM's stdout and stderr: errors only (see deploy/kafka/log4j2.properties)
    logs/server.log     the broker's log
    kraft/              log.dirs: the metadata log and the topic partitions

The broker is started detached (its own session), so it outlives the CLI that started it; `stop` and `kill`
find it again through broker.json. The static quorum ties the controller address to the formatted storage,
so a restart on the same data dir reuses the recorded ports unless others are asked for.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from daemon.kafka_jars import (
    DEPLOY_DIR,
    KAFKA_VERSION,
    POM_PATH,
    REPO_ROOT,
    Log,
    default_cache_dir,
    fetch_jars,
    locked,
    no_log,
    require,
)
from daemon.kafka_wire import decode_api_versions_response, encode_api_versions_request, probe
from topics.errors import LocalKafkaError

TEMPLATE_PATH = DEPLOY_DIR / "server.properties.tmpl"
LOG4J2_PATH = DEPLOY_DIR / "log4j2.properties"

STATE_FILE = "broker.json"
PROPERTIES_FILE = "server.properties"
OUT_FILE = "kafka.out"
LOGS_DIR = "logs"
KRAFT_DIR = "kraft"
HOST = "127.0.0.1"

_POLL_INTERVAL = 0.1
_KILL_WAIT = 15.0
_HEAP_RE = re.compile(r"^[1-9][0-9]*[kKmMgG]?$")


# Brokers this process started, so their exit status is collected (no zombies, no ResourceWarning).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class BrokerInfo:
    """A running local broker."""

    pid: int
    bootstrap: str
    port: int
    controller_port: int
    data_dir: Path
    cluster_id: str
    log_file: Path
    # Whether the `start` that returned this launched the process; False when it found the broker running (and
    # from `status`). Whoever did not launch a broker must not stop it: someone else is using it.
    launched: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class BrokerStatus:
    """What `status` found: `info` is set only while the recorded broker process runs."""

    running: bool
    answering: bool
    info: BrokerInfo | None
    detail: str


@dataclass(frozen=True)
class BrokerState:
    """The content of broker.json: what a later start, status or stop needs to know."""

    cluster_id: str
    port: int
    controller_port: int
    pid: int | None = None

    def to_json(self) -> str:
        fields = {"kafka_version": KAFKA_VERSION, "cluster_id": self.cluster_id, "port": self.port}
        return json.dumps({**fields, "controller_port": self.controller_port, "pid": self.pid}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> BrokerState:
        """Parse broker.json; raises ValueError naming the bad field."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        cluster_id, pid = raw.get("cluster_id"), raw.get("pid")
        if not isinstance(cluster_id, str) or not cluster_id:
            raise ValueError(f"cluster_id: expected a non-empty string, got {cluster_id!r}")
        ports = [raw.get("port"), raw.get("controller_port")]
        for name, value in zip(("port", "controller_port"), ports, strict=True):
            if not isinstance(value, int) or not 0 < value < 65536:
                raise ValueError(f"{name}: expected a TCP port, got {value!r}")
        if pid is not None and (not isinstance(pid, int) or pid <= 0):
            raise ValueError(f"pid: expected a positive integer or null, got {pid!r}")
        return cls(cluster_id=cluster_id, port=raw["port"], controller_port=raw["controller_port"], pid=pid)


# --- pure helpers ------------------------------------------------------------------------------------------


def new_cluster_id() -> str:
    """A cluster id as `kafka-storage random-uuid` makes it: 22 base64url chars, not starting with '-'."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def render_server_properties(template: str, *, port: int, controller_port: int, log_dirs: Path) -> str:
    """Fill the server.properties template; a path is escaped for the Java properties format."""
    if port == controller_port:
        raise LocalKafkaError(f"broker and controller need different ports, both are {port}")
    try:
        return template.format(BROKER_PORT=port, CONTROLLER_PORT=controller_port, LOG_DIRS=_escaped(str(log_dirs)))
    except (KeyError, IndexError, ValueError) as exc:
        raise LocalKafkaError(
            f"server.properties template: bad placeholder {exc} (literal braces are doubled)"
        ) from exc


def _escaped(value: str) -> str:
    """`value` as a Java properties value: backslashes doubled; a line break cannot be one."""
    if "\n" in value or "\r" in value:
        raise LocalKafkaError(f"a server property cannot hold a line break: {value!r}")
    return value.replace("\\", "\\\\")


def plan_ports(
    previous: BrokerState | None, port: int, controller_port: int, free_ports: Callable[[int], list[int]]
) -> tuple[int, int]:
    """Choose (broker port, controller port): an explicit port wins, else the earlier run's, else a free one.

    Reusing the earlier ports matters because the static quorum voter (node 1 at the controller address) must
    stay the same for a data dir; the broker port is kept too so that a restarted broker has the same address.
    """
    chosen = [
        port or (previous.port if previous else 0),
        controller_port or (previous.controller_port if previous else 0),
    ]
    fresh = iter(free_ports(chosen.count(0)))
    broker_port, ctl_port = (p or next(fresh) for p in chosen)
    if broker_port == ctl_port:
        raise LocalKafkaError(f"broker and controller need different ports, both are {broker_port}")
    return broker_port, ctl_port


def jvm_options(data_dir: Path, heap: str) -> list[str]:
    """JVM flags for a small, quick-starting broker on a shared 2-core machine (kafka-local.md section 5)."""
    if not _HEAP_RE.match(heap):
        raise LocalKafkaError(f"heap: expected a JVM size such as 512m, got {heap!r}")
    return [
        f"-Xmx{heap}",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-XX:+ExitOnOutOfMemoryError",
        "-XX:ActiveProcessorCount=2",
        "-Djava.awt.headless=true",
        "-Djava.net.preferIPv4Stack=true",
        f"-Dlog4j2.configurationFile={LOG4J2_PATH}",
        f"-Dkafka.logs.dir={data_dir / LOGS_DIR}",
    ]


# --- files, processes, sockets -----------------------------------------------------------------------------


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a text file, or '' if it does not exist.

    Indented lines are left out: they are the config dumps Kafka logs at every start, never the error.
    """
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return ""
    kept = [line for line in data.decode(errors="replace").splitlines() if not line.startswith("\t")]
    return "\n".join(kept[-lines:])


def log_tail(data_dir: Path, lines: int = 30) -> str:
    """kafka.out and logs/server.log tails of a data dir, for error reports."""
    parts = []
    for path in (data_dir / OUT_FILE, data_dir / LOGS_DIR / "server.log"):
        if text := tail(path, lines):
            parts.append(f"--- last lines of {path} ---\n{text}")
    return "\n".join(parts) or f"(no output in {data_dir})"


def read_state(data_dir: Path) -> BrokerState | None:
    """broker.json of a data dir, or None if there is none."""
    path = data_dir / STATE_FILE
    try:
        return BrokerState.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise LocalKafkaError(f"{path} is not a valid broker state file: {exc}") from exc


def _write_state(data_dir: Path, state: BrokerState) -> None:
    tmp = data_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(state.to_json() + "\n")
    tmp.replace(data_dir / STATE_FILE)


def _formatted_cluster_id(log_dir: Path) -> str | None:
    """The cluster id `format` wrote into meta.properties, or None if the storage is not formatted."""
    try:
        text = (log_dir / "meta.properties").read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "cluster.id":
            return value.strip()
    raise LocalKafkaError(f"{log_dir / 'meta.properties'} has no cluster.id")


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ensure_port_free(port: int, role: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Java's server sockets do
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise LocalKafkaError(f"{role} port {HOST}:{port} is not free: {exc.strerror}") from exc


def _is_broker(pid: int, data_dir: Path) -> bool:
    """Whether `pid` is a live broker of this data dir (a reused pid or a zombie is not)."""
    if (child := _children.get(pid)) is not None:
        # Our own child: its pid cannot be reused before we reap it. (Its cmdline reads empty for a moment
        # after Popen returns, while the kernel is still setting up the exec'd image.)
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"kafka.Kafka" in argv and str(data_dir / PROPERTIES_FILE).encode() in argv


def _wait_gone(pid: int, data_dir: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_broker(pid, data_dir):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # it exited on its own meanwhile
        os.kill(pid, sig)


def _kill_and_wait(pid: int, data_dir: Path) -> None:
    _signal(pid, signal.SIGKILL)
    if not _wait_gone(pid, data_dir, _KILL_WAIT):
        raise LocalKafkaError(f"broker pid {pid} is still there {_KILL_WAIT:.0f} s after SIGKILL")


def _info(state: BrokerState, pid: int, data_dir: Path) -> BrokerInfo:
    return BrokerInfo(
        pid=pid,
        bootstrap=f"{HOST}:{state.port}",
        port=state.port,
        controller_port=state.controller_port,
        data_dir=data_dir,
        cluster_id=state.cluster_id,
        log_file=data_dir / LOGS_DIR / "server.log",
    )


# --- public operations -------------------------------------------------------------------------------------


def start(
    data_dir: Path,
    *,
    port: int = 0,
    controller_port: int = 0,
    cache_dir: Path | None = None,
    heap: str = "512m",
    timeout: float = 90.0,
    log: Log = no_log,
    extra_properties: Mapping[str, str] | None = None,
    scram_users: Mapping[str, str] | None = None,
) -> BrokerInfo:
    """Start the broker of `data_dir` (or find it running) and return once it answers ApiVersions; the answer's
    `launched` tells which.

    `extra_properties` are added to server.properties after the template's (a key given there wins: more
    listeners, TLS, SASL, to try orderbus's Kafka security settings against a real broker); `scram_users` (name to
    password) get SCRAM-SHA-256 and SCRAM-SHA-512 credentials when the storage is formatted, that is on a data dir's
    first start (on the format command's line, which `ps` shows: test users only). A broker found running keeps what
    it was started with.

    Steps: 1. jars; 2. ports and cluster id (reused from an earlier run of this data dir); 3. render
    server.properties; 4. format the storage unless already formatted; 5. launch `kafka.Kafka` detached and
    record its pid; 6. poll until it answers, failing early (with its output) if the JVM exits.
    """
    data_dir = data_dir.resolve()
    deadline = time.monotonic() + timeout
    extra = {key: _escaped(value) for key, value in (extra_properties or {}).items()}  # refused before anything runs
    for name, password in (scram_users or {}).items():
        if not all(part and part.isprintable() and not set(part) & set(",=[]") for part in (name, password)):
            raise LocalKafkaError(f"SCRAM user {name!r}: a name and password without , = [ ] (kafka-storage's syntax)")
    java = require("java")
    with locked(data_dir):
        previous = read_state(data_dir)
        if previous is not None and previous.pid is not None and _is_broker(previous.pid, data_dir):
            wanted = (port or previous.port, controller_port or previous.controller_port)
            if wanted != (previous.port, previous.controller_port):
                raise LocalKafkaError(
                    f"the broker of {data_dir} already runs on port {previous.port} (controller "
                    f"{previous.controller_port}); stop it before asking for other ports"
                )
            log(f"broker already running (pid {previous.pid}) on {HOST}:{previous.port}")
            _wait_ready(previous.pid, previous.port, data_dir, deadline)
            return _info(previous, previous.pid, data_dir)

        # Step 1.
        libs = fetch_jars(cache_dir, log=log)
        # Step 2.
        broker_port, ctl_port = plan_ports(previous, port, controller_port, free_ports)
        _ensure_port_free(broker_port, "broker")
        _ensure_port_free(ctl_port, "controller")
        log_dir = data_dir / KRAFT_DIR
        formatted_id = _formatted_cluster_id(log_dir)
        cluster_id = formatted_id or (previous.cluster_id if previous else new_cluster_id())
        state = BrokerState(cluster_id=cluster_id, port=broker_port, controller_port=ctl_port)
        _write_state(data_dir, state)
        # Step 3.
        properties = data_dir / PROPERTIES_FILE
        rendered = render_server_properties(
            TEMPLATE_PATH.read_text(), port=broker_port, controller_port=ctl_port, log_dirs=log_dir
        )
        if extra:
            rendered += "\n# --- added by kafka_local.start(extra_properties=...) ---\n"
            rendered += "".join(f"{key}={value}\n" for key, value in extra.items())
        properties.write_text(rendered)
        classpath = f"{libs}/*"
        # Step 4.
        if formatted_id is None:
            _format_storage(java, classpath, data_dir, cluster_id, log, scram_users or {})
        # Step 5.
        log(f"starting Apache Kafka {KAFKA_VERSION} on {HOST}:{broker_port} (data in {data_dir})")
        argv = [java, *jvm_options(data_dir, heap), "-cp", classpath, "kafka.Kafka", str(properties)]
        with (data_dir / OUT_FILE).open("wb") as out:
            child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=data_dir,
                start_new_session=True,  # outlives the CLI; a Ctrl-C in its terminal does not reach it
            )  # fmt: skip
        _children[child.pid] = child
        state = replace(state, pid=child.pid)
        _write_state(data_dir, state)
        # Step 6.
        try:
            _wait_ready(child.pid, broker_port, data_dir, deadline)
        except BaseException:
            _kill_and_wait(child.pid, data_dir)
            _write_state(data_dir, replace(state, pid=None))
            raise
        log(f"broker ready in {timeout - (deadline - time.monotonic()):.1f} s (pid {child.pid})")
        return replace(_info(state, child.pid, data_dir), launched=True)


def _format_storage(
    java: str, classpath: str, data_dir: Path, cluster_id: str, log: Log, scram_users: Mapping[str, str]
) -> None:
    log(f"formatting {data_dir / KRAFT_DIR} for cluster {cluster_id}")
    argv = [java, *jvm_options(data_dir, "128m"), "-cp", classpath, "kafka.tools.StorageTool", "format"]
    argv += ["-t", cluster_id, "-c", str(data_dir / PROPERTIES_FILE), "--ignore-formatted"]
    for name, password in scram_users.items():
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
            argv += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        raise LocalKafkaError(f"kafka-storage format failed (exit code {done.returncode}):\n{output}")


def _wait_ready(pid: int, port: int, data_dir: Path, deadline: float) -> None:
    while True:
        if not _is_broker(pid, data_dir):
            raise LocalKafkaError(f"the broker (pid {pid}) exited during start\n{log_tail(data_dir)}")
        remaining = deadline - time.monotonic()
        if probe(port, host=HOST, timeout=max(0.1, min(1.0, remaining))):
            return
        if time.monotonic() >= deadline:
            raise LocalKafkaError(
                f"the broker (pid {pid}) did not answer on {HOST}:{port} in time\n{log_tail(data_dir)}"
            )
        time.sleep(_POLL_INTERVAL)


def status(data_dir: Path) -> BrokerStatus:
    """Whether the broker of `data_dir` runs and answers ApiVersions."""
    data_dir = data_dir.resolve()
    state = read_state(data_dir)
    if state is None:
        return BrokerStatus(False, False, None, f"no broker was started in {data_dir}")
    if state.pid is None or not _is_broker(state.pid, data_dir):
        return BrokerStatus(False, False, None, f"not running (last on {HOST}:{state.port})")
    answering = probe(state.port, host=HOST)
    how = "answering" if answering else "not answering (starting, stopping or stuck)"
    detail = f"running (pid {state.pid}), {how} on {HOST}:{state.port}"
    return BrokerStatus(True, answering, _info(state, state.pid, data_dir), detail)


def stop(data_dir: Path, *, grace: float = 30.0, log: Log = no_log) -> bool:
    """SIGTERM the broker (a controlled shutdown), SIGKILL it after `grace` s; whether one was running."""
    return _end(data_dir, grace=grace, log=log)


def kill(data_dir: Path, *, log: Log = no_log) -> bool:
    """SIGKILL the broker at once, as a crash would, and wait until it is gone; whether one was running."""
    return _end(data_dir, grace=None, log=log)


def _end(data_dir: Path, *, grace: float | None, log: Log) -> bool:
    data_dir = data_dir.resolve()
    state = read_state(data_dir)
    if state is None or state.pid is None:
        return False
    with locked(data_dir):
        state = read_state(data_dir)
        if state is None or state.pid is None:
            return False
        pid, running = state.pid, _is_broker(state.pid, data_dir)
        if running and grace is not None:
            log(f"stopping the broker (pid {pid})")
            _signal(pid, signal.SIGTERM)
            if not _wait_gone(pid, data_dir, grace):
                log(f"the broker (pid {pid}) did not stop within {grace:.0f} s; killing it")
                _kill_and_wait(pid, data_dir)
        elif running:
            log(f"killing the broker (pid {pid})")
            _kill_and_wait(pid, data_dir)
        _write_state(data_dir, replace(state, pid=None))
        return running


__all__ = [
    "HOST",
    "KAFKA_VERSION",
    "POM_PATH",
    "REPO_ROOT",
    "STATE_FILE",
    "TEMPLATE_PATH",
    "BrokerInfo",
    "BrokerState",
    "BrokerStatus",
    "decode_api_versions_response",
    "default_cache_dir",
    "encode_api_versions_request",
    "fetch_jars",
    "free_ports",
    "jvm_options",
    "kill",
    "log_tail",
    "new_cluster_id",
    "plan_ports",
    "probe",
    "read_state",
    "render_server_properties",
    "start",
    "status",
    "stop",
    "tail",
]
