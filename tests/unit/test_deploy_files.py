"""The deployment files, checked without deploying: the systemd unit, the container image and the compose stack.

The unit goes through the real ``systemd-analyze`` (``verify`` and ``security --offline``); its credentials and
the example config through the real settings loader; ``MemoryDenyWriteExecute=`` through the seccomp filter
systemd installs for it. Docker is not needed: the Dockerfile and compose.yaml are read as text (the compose
file keeps to plain block YAML and JSON-style flow lists, so a small reader below finds its keys).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from prometheus_client import CollectorRegistry
from support import free_port, log_line, longest_shutdown

from daemon.app import build_app
from daemon.settings import (
    ApiKeyAuthSettings,
    BearerAuthSettings,
    OAuth2Settings,
    Settings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "orderbus.service"
UNIT_CONFIG = DEPLOY / "systemd" / "orderbus.toml"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
CONTAINER_CONFIG = DEPLOY / "container" / "orderbus.toml"
COMPOSE = DEPLOY / "compose.yaml"
# The venv's console script stands in for /usr/bin/orderbus, which `verify` insists exists.
VENV_ORDERBUS = Path(sys.executable).parent / "orderbus"
MAX_EXPOSURE = 2.0


# --- systemd ----------------------------------------------------------------------------------------------------


def unit_options(text: str) -> dict[str, list[str]]:
    """``Section.Key`` → every value it is given, in order (systemd keys may repeat)."""
    options: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        options.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return options


def one(options: Mapping[str, list[str]], key: str) -> str:
    """The effective value of a [Service] key (the last one given)."""
    values = options.get(f"Service.{key}")
    assert values, f"{key}= is missing from {UNIT.name}"
    return values[-1]


@pytest.fixture(scope="module")
def options() -> dict[str, list[str]]:
    return unit_options(UNIT.read_text())


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or shutil.which("systemd-analyze", path="/usr/bin:/bin")
    if found is None:
        pytest.fail("systemd-analyze is missing: install the Debian package `systemd` (apt-get install systemd)")
    return found


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at the venv's orderbus instead of /usr/bin/orderbus."""
    assert VENV_ORDERBUS.is_file(), f"{VENV_ORDERBUS} is missing: the package is not installed in this venv"
    rewritten, count = re.subn(
        r"^ExecStart=/usr/bin/orderbus ", f"ExecStart={VENV_ORDERBUS} ", UNIT.read_text(), flags=re.M
    )
    assert count == 1, "expected exactly one ExecStart=/usr/bin/orderbus line"
    path = tmp_path / "orderbus.service"
    path.write_text(rewritten)
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


HARDENING = {
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "30",
    "Restart": "on-failure",
    "ExecStart": "/usr/bin/orderbus run --config /etc/orderbus/orderbus.toml",
    "KillSignal": "SIGTERM",
    "StateDirectory": "orderbus",
    "DynamicUser": "yes",
    "UMask": "0077",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "DevicePolicy": "closed",
    "PrivateUsers": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
}


def test_the_unit_has_every_hardening_option(options: dict[str, list[str]]) -> None:
    wrong = {key: options.get(f"Service.{key}") for key, want in HARDENING.items() if one(options, key) != want}
    assert not wrong, f"options differ from {HARDENING}: {wrong}"
    assert options["Service.SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "Service.IPAddressDeny" not in options  # Kafka and the APIs live at addresses only the operator knows


def test_systemd_analyze_verify_passes(systemd_analyze: str, testable_unit: Path) -> None:
    result = run([systemd_analyze, "verify", str(testable_unit)])
    # verify exits 0 on "Unknown key", a bad value or an unresolvable specifier, and only warns: require silence.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_systemd_analyze_verify_would_catch_a_typo(systemd_analyze: str, testable_unit: Path) -> None:
    testable_unit.write_text(testable_unit.read_text().replace("ProtectClock=", "ProtectClok="))
    assert "Unknown key" in run([systemd_analyze, "verify", str(testable_unit)]).stderr


def test_systemd_analyze_security_rates_the_unit_ok(systemd_analyze: str, testable_unit: Path) -> None:
    # --offline (systemd >= 250) rates the file itself, without a running systemd; --threshold is in tenths.
    threshold = f"--threshold={MAX_EXPOSURE * 10:.0f}"
    result = run([systemd_analyze, "security", "--offline=yes", threshold, str(testable_unit)])
    found = re.search(r"Overall exposure level for orderbus\.service: (\d+\.\d+) ", result.stdout)
    assert found, f"no exposure level in the output of systemd-analyze security:\n{result.stdout}{result.stderr}"
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stderr


async def test_systemctl_reload_makes_the_daemon_reread_its_settings(
    options: dict[str, list[str]], tmp_path: Path
) -> None:
    # The README documents `systemctl reload orderbus`; without ExecReload= systemd refuses it. The unit's own
    # command goes to a real `orderbus run` (no ingest, no sinks: no Kafka needed), which must reload and live on.
    reload = one(options, "ExecReload").split()
    assert reload[0] == "/bin/kill"
    config = tmp_path / "orderbus.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[ingest]\nenabled = false\nport = 0\n')
    daemon = await asyncio.create_subprocess_exec(
        str(VENV_ORDERBUS),
        "run",
        "--config",
        str(config),
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},  # this checkout, not the one the venv installed
    )
    assert daemon.stderr is not None
    try:
        await asyncio.wait_for(log_line(daemon.stderr, "listening on"), timeout=30)
        argv = [part.replace("$MAINPID", str(daemon.pid)) for part in reload]
        kill = await asyncio.create_subprocess_exec(*argv)
        assert await asyncio.wait_for(kill.wait(), timeout=10) == 0
        await asyncio.wait_for(log_line(daemon.stderr, "settings reloaded"), timeout=30)
    finally:
        if daemon.returncode is None:
            daemon.terminate()
        code = await asyncio.wait_for(daemon.wait(), timeout=30)
    assert code == 0, "the daemon did not survive the reload"


CREDENTIALS = ("webhook-secret", "crm-token", "accounting-client-secret", "shipping-api-key")


def credential_env(options: Mapping[str, list[str]], directory: str) -> dict[str, str]:
    """The unit's ORDERBUS_* variables with %d (the credentials directory) resolved to `directory`."""
    assignments = (item.partition("=") for item in options.get("Service.Environment", []))
    return {name: value.replace("%d", directory) for name, _, value in assignments if name.startswith("ORDERBUS_")}


def fake_secret(name: str) -> str:
    """A credential file's content for `name`: a Standard Webhooks secret (base64 after its prefix)."""
    return "whsec_" + base64.b64encode(f"{name}, a credential for the tests".encode()).decode()


@pytest.fixture
def unit_settings(options: dict[str, list[str]], tmp_path: Path) -> Settings:
    """deploy/systemd/orderbus.toml as the service reads it: the unit's variables, its credentials as files."""
    for name in CREDENTIALS:
        (tmp_path / name).write_text(f"{fake_secret(name)}\n")
    return load_settings(UNIT_CONFIG, env=credential_env(options, str(tmp_path)))


def test_every_credential_is_loaded_and_read_through_a_file_variable(options: dict[str, list[str]]) -> None:
    loaded = dict(item.split(":", 1) for item in options["Service.LoadCredential"])
    read = {
        value.removeprefix("%d/") for name, value in credential_env(options, "%d").items() if name.endswith("_FILE")
    }
    assert set(loaded) == read == set(CREDENTIALS)
    assert loaded == {name: f"/etc/orderbus/credentials/{name}" for name in CREDENTIALS}


def test_the_readme_installs_every_credential_the_unit_loads(options: dict[str, list[str]]) -> None:
    # A missing one fails the start (exit 243), so the README's steps must create each of them.
    readme = (ROOT / "README.md").read_text()
    steps = readme[readme.index("### systemd") : readme.index("### Container")]
    created = set(re.findall(r"^install -m 0600 /dev/stdin /etc/orderbus/credentials/([\w-]+) ", steps, re.M))
    assert created == {item.split(":", 1)[0] for item in options["Service.LoadCredential"]}
    assert "orderbus topics apply --config /etc/orderbus/orderbus.toml" in steps


def test_a_start_that_cannot_succeed_is_not_restarted(options: dict[str, list[str]]) -> None:
    # 2: a bad setting (ConfigError); 243: systemd's EXIT_CREDENTIALS, a LoadCredential= file is missing.
    assert one(options, "RestartPreventExitStatus").split() == ["2", "243"]


def test_the_example_config_loads_with_the_units_credentials(
    options: dict[str, list[str]], unit_settings: Settings
) -> None:
    assert one(options, "ExecStart").endswith(" --config /etc/orderbus/orderbus.toml")  # where UNIT_CONFIG goes
    assert unit_settings.state_dir == Path("/var/lib") / one(options, "StateDirectory")
    secrets = [secret.get_secret_value() for secret in unit_settings.ingest.webhook_secrets]
    assert secrets == [fake_secret("webhook-secret")]
    sinks = unit_settings.enabled_sinks()
    crm, accounting, shipping = sinks["crm"].auth, sinks["accounting"].auth, sinks["shipping"].auth
    assert isinstance(crm, BearerAuthSettings)
    assert crm.token.get_secret_value() == fake_secret("crm-token")
    assert isinstance(accounting, OAuth2Settings)
    assert accounting.client_secret.get_secret_value() == fake_secret("accounting-client-secret")
    assert isinstance(shipping, ApiKeyAuthSettings)
    assert shipping.key.get_secret_value() == fake_secret("shipping-api-key")


def test_systemd_waits_longer_than_the_shutdown_drains(options: dict[str, list[str]], unit_settings: Settings) -> None:
    assert int(one(options, "TimeoutStopSec")) > longest_shutdown(unit_settings)


def test_prometheus_scrapes_the_systemd_hosts_admin_listener_not_its_webhook(unit_settings: Settings) -> None:
    scrape = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    [targets] = re.findall(r"^ +- targets: (\[.*\])", scrape, re.MULTILINE)
    assert unit_settings.admin.port not in (None, unit_settings.ingest.port)
    assert json.loads(targets) == [f"{unit_settings.admin.host}:{unit_settings.admin.port}"]


# MemoryDenyWriteExecute= is, in systemd 252, this seccomp filter: no mmap that is writable and executable, no
# mprotect/pkey_mprotect that adds execute, no shmat with SHM_EXEC. The child installs the same filter, proves
# it bites, then imports and runs what the daemon runs: uvloop, aiohttp's C parser, pydantic-core, aiosqlite,
# aiokafka's C record builder, OpenSSL, zlib.
_MDWE_CHILD = r"""
import ctypes, ctypes.util, mmap, os, platform, struct, sys
ARCHES = {  # audit arch, mmap, mprotect, pkey_mprotect, shmat
    "x86_64": (0xC000003E, 9, 10, 329, 30),
    "aarch64": (0xC00000B7, 222, 226, 288, 196),
}
if platform.machine() not in ARCHES:
    sys.exit(f"no seccomp syscall table for {platform.machine()} in this test")
arch, nr_mmap, nr_mprotect, nr_pkey_mprotect, nr_shmat = ARCHES[platform.machine()]
LD_W_ABS, JEQ, JSET, AND, RET = 0x20, 0x15, 0x45, 0x54, 0x06
ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
PROT_W, PROT_X, SHM_EXEC = 2, 4, 0o100000
ARG2 = 16 + 2 * 8  # seccomp_data.args[2], low half (little endian)
program = [  # (label, code, jump-if-true label, jump-if-false label, k)
    ("", LD_W_ABS, None, None, 4),
    ("", JEQ, None, "allow", arch),
    ("", LD_W_ABS, None, None, 0),
    ("", JEQ, "mmap", None, nr_mmap),
    ("", JEQ, "prot", None, nr_mprotect),
    ("", JEQ, "prot", None, nr_pkey_mprotect),
    ("", JEQ, "shmat", None, nr_shmat),
    ("", RET, None, None, ALLOW),
    ("mmap", LD_W_ABS, None, None, ARG2),
    ("", AND, None, None, PROT_W | PROT_X),
    ("", JEQ, "deny", "allow", PROT_W | PROT_X),
    ("prot", LD_W_ABS, None, None, ARG2),
    ("", JSET, "deny", "allow", PROT_X),
    ("shmat", LD_W_ABS, None, None, ARG2),
    ("", JSET, "deny", "allow", SHM_EXEC),
    ("deny", RET, None, None, EPERM),
    ("allow", RET, None, None, ALLOW),
]
labels = {label: pc for pc, (label, *_) in enumerate(program) if label}
jump = lambda pc, label: 0 if label is None else labels[label] - pc - 1
code = b"".join(struct.pack("HBBI", c, jump(pc, t), jump(pc, f), k) for pc, (_, c, t, f, k) in enumerate(program))
buffer = ctypes.create_string_buffer(code)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
prog = Prog(len(program), ctypes.cast(buffer, ctypes.c_void_p))
if libc.prctl(38, 1, None, 0, 0) or libc.prctl(22, 2, ctypes.cast(ctypes.pointer(prog), ctypes.c_void_p), 0, 0):
    sys.exit(f"cannot install the seccomp filter: {os.strerror(ctypes.get_errno())}")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("the filter does not bite: a writable and executable mapping was allowed")

import asyncio, random, ssl, tempfile, zlib
import uvloop
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from prometheus_client import CollectorRegistry
import daemon.cli
from daemon.app import build_app
from daemon.ingest_keys import SqliteIngestKeyStore
from topics.codec import decode, encode
from topics.samples import sample_event

async def main():
    event = sample_event(random.Random(1))
    assert decode(encode(event).value) == event
    batch = DefaultRecordBatchBuilder(2, 1, 0, -1, -1, -1, 1 << 16)  # magic 2, gzip
    batch.append(0, None, b"key", zlib.compress(b"value"), [])
    assert len(batch.build()) > 0
    ssl.create_default_context()
    await asyncio.get_running_loop().getaddrinfo("localhost", 80)
    with tempfile.TemporaryDirectory() as directory:
        async with SqliteIngestKeyStore(os.path.join(directory, "keys.sqlite")) as keys:
            await keys.claim("key-1", "0" * 64, 1.0)
    app = build_app(ingest=None, readiness=dict, registry=CollectorRegistry())
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/metrics")).status == 200

with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(main())
print("ok")
"""


def test_the_daemon_runs_under_memory_deny_write_execute() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_CHILD], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


# --- the container image ----------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def last(instructions: list[tuple[str, str]], keyword: str) -> str:
    found = [arguments for name, arguments in instructions if name == keyword]
    assert found, f"no {keyword} in {DOCKERFILE}"
    return found[-1]


def runtime_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [index for index, (name, _) in enumerate(instructions) if name == "FROM"]
    return instructions[starts[-1] :]


def test_the_image_is_a_slim_multi_stage_build(dockerfile: list[tuple[str, str]]) -> None:
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in dockerfile
    stages = [arguments for name, arguments in dockerfile if name == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    build_steps = " ".join(arguments for name, arguments in dockerfile[: dockerfile.index(("FROM", stages[1]))])
    assert "pip wheel --constraint constraints.txt --wheel-dir /wheels ." in build_steps
    runtime = runtime_stage(dockerfile)
    assert ("COPY", "--from=build /opt/orderbus /opt/orderbus") in runtime
    assert not [arguments for name, arguments in runtime if name == "RUN" and "pip" in arguments]


def test_the_build_copies_what_the_package_is_made_of(dockerfile: list[tuple[str, str]]) -> None:
    sources = [
        part
        for name, arguments in dockerfile
        if name == "COPY" and not arguments.startswith("--from")
        for part in arguments.split()[:-1]
    ]
    assert sources == ["pyproject.toml", "README.md", "constraints.txt", "topics/", "consumers/", "daemon/"]
    assert all((ROOT / source).exists() for source in sources)
    packages = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text())
    assert packages is not None
    assert set(re.findall(r'"(\w+)\*"', packages.group(1))) == {"daemon", "topics", "consumers"}


def test_every_dependency_is_pinned_within_the_range_pyproject_allows() -> None:
    # The venv of `make test` and the image install constraints.txt exactly: a release upstream changes nothing
    # until `make lock` takes it in. A dependency added to pyproject.toml without a pin would float again.
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not a pin (name==version)"
            pins[canonicalize_name(name)] = Version(version)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(text) for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} has no pin in constraints.txt (make lock)"
        assert requirement.specifier.contains(pins[name]), f"{requirement.name}: {pins[name]} not in {requirement}"
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --constraint constraints.txt -e '.[dev]'" in makefile
    assert re.search(r"^\$\(INSTALLED\): pyproject.toml constraints.txt$", makefile, re.MULTILINE)


def test_the_image_runs_orderbus_unprivileged_as_pid_1(dockerfile: list[tuple[str, str]]) -> None:
    user = last(dockerfile, "USER")
    assert user.split(":")[0] not in ("0", "root")
    assert int(user.split(":")[0]) >= 1000
    assert json.loads(last(dockerfile, "ENTRYPOINT")) == ["/opt/orderbus/bin/orderbus"]  # exec form: no shell
    assert json.loads(last(dockerfile, "CMD")) == ["run", "--config", "/etc/orderbus/orderbus.toml"]
    assert last(dockerfile, "STOPSIGNAL") == "SIGTERM"
    assert json.loads(last(dockerfile, "VOLUME")) == ["/var/lib/orderbus"]
    assert last(dockerfile, "WORKDIR") == "/var/lib/orderbus"


def healthcheck_argv(dockerfile: list[tuple[str, str]]) -> list[str]:
    options, _, command = last(dockerfile, "HEALTHCHECK").partition(" CMD ")
    assert "--interval=" in options
    assert "--start-period=" in options
    argv: list[str] = json.loads(command)  # exec form: no shell needed in the image
    return argv


def test_the_healthcheck_is_orderbus_health_within_the_checks_timeout(dockerfile: list[tuple[str, str]]) -> None:
    # Review (operator): a fixed http://127.0.0.1:8080/healthz failed every check of a daemon whose webhook speaks
    # HTTPS, or listens on another port, until HEALTHCHECK_URL was set by hand.
    argv = healthcheck_argv(dockerfile)
    assert argv[:2] == ["/opt/orderbus/bin/orderbus", "health"]
    options = last(dockerfile, "HEALTHCHECK").partition(" CMD ")[0]
    timeout = float(re.search(r"--timeout=(\d+)s", options).group(1))  # type: ignore[union-attr]
    assert float(argv[argv.index("--timeout") + 1]) < timeout, "its own answer (an error line) before Docker's kill"


async def test_the_healthcheck_command_passes_on_a_live_daemon_and_fails_on_a_dead_one(
    dockerfile: list[tuple[str, str]], tmp_path: Path
) -> None:
    # The image's own command, found where the settings say (no [admin]: the webhook's port), not at 8080.
    argv = [sys.executable, "-m", "daemon", *healthcheck_argv(dockerfile)[1:]]
    app = build_app(ingest=None, readiness=lambda: {"sink.crm": "joining its group"}, registry=CollectorRegistry())
    async with TestServer(app, host="127.0.0.1") as server:
        config = tmp_path / "orderbus.toml"
        config.write_text(f'[ingest]\nenabled = false\nhost = "127.0.0.1"\nport = {server.port}\n')
        url = f"http://127.0.0.1:{server.port}/healthz"
        assert await healthcheck(argv, config) == (0, f"alive: {url}")
        code, said = await healthcheck([*argv, "--ready"], config)
        assert (code, said.splitlines()[-1]) == (1, "NOT READY sink.crm: joining its group")
        elsewhere = tmp_path / "elsewhere.toml"
        elsewhere_port = free_port()
        elsewhere.write_text(f"[ingest]\nenabled = false\nport = {elsewhere_port}\n")
        elsewhere_url = f"http://127.0.0.1:{elsewhere_port}"
        code, said = await healthcheck(argv, elsewhere)
        assert (code, said.split(": <")[0]) == (1, f"orderbus: no orderbus daemon answers at {elsewhere_url}/healthz")
    code, said = await healthcheck(argv, config)
    assert (code, said.split(": <")[0]) == (1, f"orderbus: no orderbus daemon answers at {url}"), "nobody listens"
    config.write_text("[ingest]\nport = 70000\n")
    code, said = await healthcheck(argv, config)
    assert (code, said.split(":")[0]) == (1, "orderbus"), "a bad setting: 1 too, Docker reserves 2"
    assert "ingest.port" in said


async def healthcheck(argv: list[str], config: Path) -> tuple[int, str]:
    """The exit status and output of `argv` run with `config` as its settings file (``ORDERBUS_CONFIG``)."""
    process = await asyncio.create_subprocess_exec(
        *argv, env={"ORDERBUS_CONFIG": str(config)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    return await process.wait(), output.decode().strip()


def test_the_build_context_holds_only_what_the_image_copies(dockerfile: list[tuple[str, str]]) -> None:
    # Review (operator): without a .dockerignore the context carried .venv, .run (a Kafka's data) and .git.
    copied = {
        part.rstrip("/")
        for kind, args in dockerfile
        if kind == "COPY" and "--from" not in args
        for part in args.split()[:-1]
    }
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert {line.removeprefix("!").rstrip("/") for line in lines if line.startswith("!")} == copied


# --- compose.yaml -----------------------------------------------------------------------------------------------


def yaml_block(lines: list[str], *path: str) -> list[str]:
    """The lines nested under `path` in a block-style YAML mapping (a reader for this file, not for YAML)."""
    for key in path:
        found = None
        for index, line in enumerate(lines):
            match = re.match(rf"^(\s*){re.escape(key)}:(\s|$)", line)
            if match and (found is None or len(match.group(1)) < found[1]):
                found = (index, len(match.group(1)))
        assert found is not None, f"{'.'.join(path)}: no key {key!r} in {COMPOSE.name}"
        index, indent = found
        block = []
        for line in lines[index + 1 :]:
            if line.strip() and not line.lstrip().startswith("#") and len(line) - len(line.lstrip()) <= indent:
                break
            block.append(line)
        lines = block
    return lines


def yaml_value(lines: list[str], key: str) -> str:
    """The scalar or flow value of `key` at the top level of `lines`."""
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip() and not line.lstrip().startswith("#"))
    for line in lines:
        match = re.match(rf"^ {{{indent}}}{re.escape(key)}:\s*(.*?)\s*$", line)
        if match:
            return match.group(1).strip('"')
    raise AssertionError(f"no {key}: in {lines}")


def yaml_items(lines: list[str]) -> list[str]:
    """The items of a block sequence (``- item``), quotes removed."""
    return [re.sub(r"^\s*-\s*", "", line).strip().strip('"') for line in lines if re.match(r"^\s*- ", line)]


@pytest.fixture(scope="module")
def compose() -> list[str]:
    text = COMPOSE.read_text()
    assert "\t" not in text
    return text.splitlines()


def service(compose: list[str], name: str) -> list[str]:
    return yaml_block(compose, "services", name)


@pytest.fixture(scope="module")
def container_settings() -> Settings:
    """The container config with the environment compose gives it."""
    environment = yaml_block(service(COMPOSE.read_text().splitlines(), "orderbus"), "environment")
    name = "ORDERBUS_INGEST__WEBHOOK_SECRETS"
    return load_settings(CONTAINER_CONFIG, env={name: yaml_value(environment, name)})


def test_compose_runs_the_whole_stack(compose: list[str]) -> None:
    services = yaml_block(compose, "services")
    names = [match.group(1) for line in services if (match := re.match(r"^  ([a-z][\w-]*):\s*$", line))]
    assert names == ["kafka", "topics", "sandbox", "orderbus", "prometheus", "grafana"]
    assert yaml_value(service(compose, "kafka"), "image") == "apache/kafka:4.1.1"
    assert yaml_value(service(compose, "prometheus"), "image").startswith("prom/prometheus:")
    assert yaml_value(service(compose, "grafana"), "image").startswith("grafana/grafana:")


def test_compose_builds_one_image_for_orderbus_topics_and_sandbox(compose: list[str]) -> None:
    anchor = yaml_block(compose, "x-orderbus-image")
    assert yaml_value(anchor, "image") == "orderbus:dev"
    build = yaml_block(anchor, "build")
    assert (COMPOSE.parent / yaml_value(build, "context")).resolve() == ROOT
    assert ROOT / yaml_value(build, "dockerfile") == DOCKERFILE
    assert "x-orderbus-image: &orderbus-image" in compose
    for name in ("topics", "sandbox", "orderbus"):
        assert yaml_value(service(compose, name), "<<") == "*orderbus-image", name


def test_kafka_is_a_single_kraft_node_the_daemon_can_reach(compose: list[str], container_settings: Settings) -> None:
    environment = yaml_block(service(compose, "kafka"), "environment")
    assert yaml_value(environment, "KAFKA_PROCESS_ROLES") == "broker,controller"
    assert yaml_value(environment, "KAFKA_CONTROLLER_QUORUM_VOTERS") == "1@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in yaml_value(environment, "KAFKA_ADVERTISED_LISTENERS")
    assert container_settings.kafka.bootstrap_servers == "kafka:9092"
    healthcheck = json.loads(yaml_value(yaml_block(service(compose, "kafka"), "healthcheck"), "test"))
    assert healthcheck[:2] == ["CMD", "/opt/kafka/bin/kafka-broker-api-versions.sh"]


def test_orderbus_starts_after_its_dependencies_and_keeps_its_state(
    compose: list[str], dockerfile: list[tuple[str, str]], container_settings: Settings
) -> None:
    orderbus = service(compose, "orderbus")
    depends = yaml_block(orderbus, "depends_on")
    conditions = {name: yaml_value(yaml_block(depends, name), "condition") for name in ("kafka", "topics", "sandbox")}
    assert conditions == {
        "kafka": "service_healthy",
        "topics": "service_completed_successfully",
        "sandbox": "service_healthy",
    }
    volumes = yaml_items(yaml_block(orderbus, "volumes"))
    config_path = json.loads(last(dockerfile, "CMD"))[-1]
    assert f"./container/orderbus.toml:{config_path}:ro" in volumes
    assert f"orderbus-state:{json.loads(last(dockerfile, 'VOLUME'))[0]}" in volumes
    assert "  orderbus-state:" in yaml_block(compose, "volumes")
    assert str(container_settings.state_dir) == json.loads(last(dockerfile, "VOLUME"))[0]
    ports = yaml_items(yaml_block(orderbus, "ports"))
    assert ports == [
        f"127.0.0.1:{port}:{port}" for port in (container_settings.ingest.port, container_settings.admin.port)
    ]
    assert ipaddress.ip_address(container_settings.admin.host).is_unspecified
    assert ipaddress.ip_address(container_settings.ingest.host).is_unspecified  # inside the container: all
    topics = json.loads(yaml_value(service(compose, "topics"), "command"))
    assert topics == ["topics", "apply", "--config", config_path]


def test_orderbus_gets_sigterm_and_time_to_drain(compose: list[str], container_settings: Settings) -> None:
    orderbus = service(compose, "orderbus")
    assert yaml_value(orderbus, "stop_signal") == "SIGTERM"
    grace = yaml_value(orderbus, "stop_grace_period")
    assert grace.endswith("s")
    assert float(grace[:-1]) > longest_shutdown(container_settings)


def test_the_sinks_deliver_to_the_sandbox_service(compose: list[str], container_settings: Settings) -> None:
    sandbox = service(compose, "sandbox")
    assert json.loads(yaml_value(sandbox, "entrypoint")) == ["/opt/orderbus/bin/python", "-m", "daemon.sandbox"]
    host_option, host, port_option, port = json.loads(yaml_value(sandbox, "command"))
    assert (host_option, port_option, port) == ("--host", "--port", "8700")
    assert ipaddress.ip_address(host).is_unspecified
    # The image's healthcheck asks orderbus's /healthz; the sandbox must bring its own.
    assert "/_sandbox/stats" in yaml_value(yaml_block(sandbox, "healthcheck"), "test")
    sinks = container_settings.enabled_sinks()
    assert {name: sink.base_url for name, sink in sinks.items()} == {
        name: f"http://sandbox:8700/{name}" for name in ("crm", "accounting", "shipping")
    }


def test_prometheus_scrapes_orderbus_with_the_shared_rules(compose: list[str], container_settings: Settings) -> None:
    prometheus = service(compose, "prometheus")
    assert "./prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in yaml_items(yaml_block(prometheus, "volumes"))
    assert yaml_value(yaml_block(prometheus, "configs"), "- source") == "prometheus-config"
    config = yaml_block(compose, "configs", "prometheus-config", "content")
    assert yaml_items(yaml_block(config, "rule_files")) == ["rules.yml"]
    scrape = yaml_block(config, "scrape_configs")
    assert "job_name: orderbus" in "\n".join(scrape)  # the alert rules select job="orderbus"
    targets = json.loads(yaml_value(yaml_block(scrape, "static_configs"), "- targets"))
    assert targets == [f"orderbus:{container_settings.admin.port}"], "the admin listener: not the webhook's port"
    assert 'job="orderbus"' in (DEPLOY / "prometheus" / "rules.yml").read_text()


def test_grafana_gets_the_dashboard_and_a_datasource_on_the_prometheus_service(compose: list[str]) -> None:
    grafana = service(compose, "grafana")
    volumes = dict(item.removesuffix(":ro").rsplit(":", 1) for item in yaml_items(yaml_block(grafana, "volumes")))
    provider = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "orderbus.yml").read_text()
    dashboards_path = re.search(r"^\s*path:\s*(\S+)", provider, re.M)
    assert dashboards_path is not None
    assert volumes["./grafana/dashboards"] == dashboards_path.group(1)
    assert volumes["./grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    datasource = yaml_block(compose, "configs", "grafana-datasource", "content")
    assert "url: http://prometheus:9090" in "\n".join(datasource)


def test_every_host_path_compose_mounts_exists_and_ports_stay_local(compose: list[str]) -> None:
    mounts = [match.group(1) for line in compose if (match := re.match(r"^\s*- (\./[^:]+):", line))]
    assert mounts
    missing = [mount for mount in mounts if not (COMPOSE.parent / mount).exists()]
    assert not missing
    ports = [match.group(1) for line in compose if (match := re.match(r'^\s*- "([\d.:]+)"$', line))]
    assert len(ports) == 6
    assert all(port.startswith("127.0.0.1:") for port in ports), ports
