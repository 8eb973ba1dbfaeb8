"""The local Kafka tooling without a broker: config rendering, port reuse, state file, ApiVersions framing."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import struct
from pathlib import Path

import pytest

from daemon import kafka_local
from daemon.kafka_local import BrokerState
from topics.errors import LocalKafkaError


def parse_properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def render(port: int = 19092, controller_port: int = 19093, log_dirs: str = "/data/kraft") -> dict[str, str]:
    template = kafka_local.TEMPLATE_PATH.read_text()
    text = kafka_local.render_server_properties(
        template, port=port, controller_port=controller_port, log_dirs=Path(log_dirs)
    )
    assert not set("{}") & set(text), "a placeholder was left unfilled"
    return parse_properties(text)


def test_rendered_properties_make_a_single_loopback_kraft_node() -> None:
    props = render()
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == props["listeners"]
    assert props["log.dirs"] == "/data/kraft"


def test_rendered_properties_suit_one_node_and_fast_tests() -> None:
    props = render()
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "min.insync.replicas",
    ):
        assert props[key] == "1", key
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["group.min.session.timeout.ms"] == "1000"
    assert 1 << 20 < int(props["log.cleaner.dedupe.buffer.size"]) <= 16 << 20


def test_rendering_escapes_backslashes_and_rejects_one_port_for_both() -> None:
    assert render(log_dirs="/data/a\\b")["log.dirs"] == "/data/a\\\\b"
    with pytest.raises(LocalKafkaError, match="different ports"):
        render(port=9092, controller_port=9092)
    with pytest.raises(LocalKafkaError, match="placeholder 'NODE_ID'"):
        kafka_local.render_server_properties("node.id={NODE_ID}", port=1, controller_port=2, log_dirs=Path("/d"))


def test_extra_properties_and_scram_users_refuse_what_their_formats_cannot_hold(tmp_path: Path) -> None:
    # Checked before any jar is fetched or process started.
    with pytest.raises(LocalKafkaError, match="cannot hold a line break"):
        kafka_local.start(tmp_path / "a", extra_properties={"listeners": "PLAINTEXT://x:1\nsasl.enabled=x"})
    with pytest.raises(LocalKafkaError, match=r"SCRAM user 'ob': a name and password without , = \[ \]"):
        kafka_local.start(tmp_path / "b", scram_users={"ob": "pass,word"})


class FakeFreePorts:
    def __init__(self, *ports: int) -> None:
        self.ports = list(ports)
        self.asked: list[int] = []

    def __call__(self, count: int) -> list[int]:
        self.asked.append(count)
        taken, self.ports = self.ports[:count], self.ports[count:]
        return taken


PREVIOUS = BrokerState(cluster_id="abc", port=4000, controller_port=4001, pid=None)


@pytest.mark.parametrize(
    ("previous", "port", "controller_port", "expected", "fresh_needed"),
    [
        (None, 0, 0, (5000, 5001), 2),  # first run: two free ports
        (None, 9092, 0, (9092, 5000), 1),
        (PREVIOUS, 0, 0, (4000, 4001), 0),  # restart: the quorum voter keeps its address
        (PREVIOUS, 9092, 0, (9092, 4001), 0),  # an explicit port wins over the recorded one
        (PREVIOUS, 9092, 9093, (9092, 9093), 0),
    ],
)
def test_plan_ports_reuses_recorded_ports_unless_told_otherwise(
    previous: BrokerState | None,
    port: int,
    controller_port: int,
    expected: tuple[int, int],
    fresh_needed: int,
) -> None:
    free = FakeFreePorts(5000, 5001)
    assert kafka_local.plan_ports(previous, port, controller_port, free) == expected
    assert free.asked == [fresh_needed]


def test_plan_ports_refuses_a_collision() -> None:
    with pytest.raises(LocalKafkaError, match="different ports"):
        kafka_local.plan_ports(PREVIOUS, 0, 4000, FakeFreePorts())


def test_state_file_round_trip(tmp_path: Path) -> None:
    assert kafka_local.read_state(tmp_path) is None
    state = BrokerState(cluster_id="Cun6WyqKT9ePRfOVeazagQ", port=4000, controller_port=4001, pid=123)
    (tmp_path / kafka_local.STATE_FILE).write_text(state.to_json())
    assert kafka_local.read_state(tmp_path) == state


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "Expecting"),
        ("[]", "not a JSON object"),
        ('{"cluster_id": "x", "port": 0, "controller_port": 1}', "port"),
        ('{"cluster_id": "x", "port": 1, "controller_port": 2, "pid": "7"}', "pid"),
        ('{"port": 1, "controller_port": 2}', "cluster_id"),
    ],
)
def test_a_broken_state_file_is_named(tmp_path: Path, content: str, problem: str) -> None:
    (tmp_path / kafka_local.STATE_FILE).write_text(content)
    with pytest.raises(LocalKafkaError, match=problem) as caught:
        kafka_local.read_state(tmp_path)
    assert kafka_local.STATE_FILE in str(caught.value)


def test_cluster_ids_look_like_kafkas() -> None:
    for _ in range(200):
        cluster_id = kafka_local.new_cluster_id()
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_api_versions_request_framing() -> None:
    frame = kafka_local.encode_api_versions_request(7)
    (size,) = struct.unpack_from(">i", frame)
    assert size == len(frame) - 4
    api_key, version, correlation_id, client_len = struct.unpack_from(">hhih", frame, 4)
    assert (api_key, version, correlation_id) == (18, 0, 7)
    assert frame[14:] == b"orderbus-kafka-local"
    assert client_len == len(frame) - 14


def api_versions_response(correlation_id: int, error_code: int, apis: list[tuple[int, int, int]]) -> bytes:
    body = struct.pack(">ihi", correlation_id, error_code, len(apis))
    return body + b"".join(struct.pack(">hhh", *api) for api in apis)


def test_api_versions_response_decoding() -> None:
    ok = api_versions_response(7, 0, [(0, 3, 12), (18, 0, 4)])
    assert kafka_local.decode_api_versions_response(ok, 7) == 0
    assert kafka_local.decode_api_versions_response(api_versions_response(7, 35, []), 7) == 35
    with pytest.raises(ValueError, match="correlation id"):
        kafka_local.decode_api_versions_response(ok, 8)
    with pytest.raises(ValueError, match="api_keys"):
        kafka_local.decode_api_versions_response(ok[:-3], 7)
    with pytest.raises(ValueError, match="too short"):
        kafka_local.decode_api_versions_response(ok[:4], 7)


def test_probe_of_a_closed_port_is_false() -> None:
    (port,) = kafka_local.free_ports(1)
    assert kafka_local.probe(port, timeout=0.5) is False


def test_jvm_options_keep_logs_in_the_data_dir_and_refuse_odd_heaps(tmp_path: Path) -> None:
    options = kafka_local.jvm_options(tmp_path, "384m")
    assert {"-Xmx384m", "-XX:+UseSerialGC"} <= set(options)
    assert f"-Dkafka.logs.dir={tmp_path / 'logs'}" in options
    with pytest.raises(LocalKafkaError, match="heap"):
        kafka_local.jvm_options(tmp_path, "512m -XX:+Foo")


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ORDERBUS_KAFKA_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kafka_local.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ORDERBUS_KAFKA_CACHE")
    assert kafka_local.default_cache_dir() == tmp_path / "xdg" / "orderbus" / "kafka-4.1.1"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kafka_local.default_cache_dir() == tmp_path / "home" / ".cache" / "orderbus" / "kafka-4.1.1"


def no_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)


def test_fetch_jars_does_nothing_while_the_marker_matches_the_pom(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_tools(monkeypatch)  # proves that Maven is not run
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / ".complete").write_text(hashlib.sha256(kafka_local.POM_PATH.read_bytes()).hexdigest())
    assert kafka_local.fetch_jars(tmp_path) == libs


def test_fetch_jars_names_a_missing_maven(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_tools(monkeypatch)
    (tmp_path / "libs").mkdir()
    (tmp_path / "libs" / ".complete").write_text("hash of an older pom")
    with pytest.raises(LocalKafkaError, match="'mvn' is not on PATH"):
        kafka_local.fetch_jars(tmp_path)


def test_status_and_stop_ignore_a_pid_that_is_not_this_broker(tmp_path: Path) -> None:
    assert kafka_local.status(tmp_path).running is False
    assert kafka_local.stop(tmp_path) is False
    # A recorded pid now used by another process (this one) is neither reported nor signalled.
    state = BrokerState(cluster_id="abc", port=4000, controller_port=4001, pid=os.getpid())
    (tmp_path / kafka_local.STATE_FILE).write_text(state.to_json())
    status = kafka_local.status(tmp_path)
    assert (status.running, status.info) == (False, None)
    assert kafka_local.stop(tmp_path) is False
    assert kafka_local.kill(tmp_path) is False
    assert kafka_local.read_state(tmp_path) == BrokerState(cluster_id="abc", port=4000, controller_port=4001)
