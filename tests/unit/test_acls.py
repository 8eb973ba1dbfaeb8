"""`topics.acls`: the grants a daemon needs for its parts, their kafka-acls.sh lines, and the words for a refusal."""

from __future__ import annotations

import logging

import pytest
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
)

from topics.acls import GRANT, Acl, Refusals, daemon_acls, kafka_acls_command, refusal


def test_each_part_gets_the_least_it_needs_each_resource_once() -> None:
    assert daemon_acls("p.", [], ingest=True) == [Acl("topic", "p.orders", ("Write",), "the ingest publishes orders")]
    sinks_only = daemon_acls("", ["crm"], ingest=False)
    assert [(acl.resource, acl.name, acl.operations) for acl in sinks_only] == [
        ("topic", "orders", ("Read", "DescribeConfigs")),
        ("topic", "orders.dlq.crm", ("Write",)),
        ("topic", "orders.replay.crm", ("Read",)),
        ("topic", "orders.state.crm", ("Read", "Write")),
        ("group", "orderbus.crm", ("Read",)),
    ]
    both = daemon_acls("", ["crm", "shipping"], ingest=True)
    assert both[0].operations == ("Write", "Read", "DescribeConfigs")
    assert len({(acl.resource, acl.name) for acl in both}) == len(both) == 9
    assert daemon_acls("", [], ingest=False) == []


def test_a_grant_is_one_kafka_acls_line() -> None:
    acl = Acl("topic", "orders", ("Read", "DescribeConfigs"), "why")
    assert kafka_acls_command(acl, "User:orderbus", "k1:9092,k2:9092") == (
        "kafka-acls.sh --bootstrap-server k1:9092,k2:9092 --add --allow-principal User:orderbus "
        "--operation Read --operation DescribeConfigs --topic orders"
    )
    assert kafka_acls_command(Acl("group", "orderbus.crm", ("Read",), "why"), "User:o", "k:1").endswith(
        "--operation Read --group orderbus.crm"
    )


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            GroupAuthorizationFailedError("orderbus.crm"),
            "use consumer group orderbus.crm (GroupAuthorizationFailedError)",
        ),
        (TopicAuthorizationFailedError({"orders", "b"}), "use topics b, orders (TopicAuthorizationFailedError)"),
        (TopicAuthorizationFailedError("orders"), "use topic orders (TopicAuthorizationFailedError)"),
        (TopicAuthorizationFailedError(), "use a topic (TopicAuthorizationFailedError)"),
        (ClusterAuthorizationFailedError(), "start an idempotent producer (ClusterAuthorizationFailedError: it needs"),
    ],
)
def test_a_refusal_names_what_is_refused_and_where_the_grants_are(error: BaseException, said: str) -> None:
    words = refusal(error)
    assert words is not None
    assert words.startswith(f"kafka does not let this daemon's principal {said}")
    assert words.endswith(f": {GRANT}")


def test_other_errors_are_no_refusal() -> None:
    assert refusal(KafkaConnectionError("refused")) is None
    assert refusal(RuntimeError("a bug")) is None


def test_refusals_are_said_when_they_begin_or_change_and_when_they_end(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("orderbus.test.refusals")
    refusals = Refusals(log, "refused %s: %s", "allowed %s again", {"sink": "crm"})
    with caplog.at_level(logging.INFO, log.name):
        assert not refusals.note("fetch", KafkaConnectionError("refused"))  # not an authorization refusal
        for _ in range(3):
            assert refusals.note("fetch", GroupAuthorizationFailedError("orderbus.crm"))
        assert refusals.note("fetch", TopicAuthorizationFailedError("orders"))  # another cause: said again
        assert refusals.note("commit", TopicAuthorizationFailedError("orders"))
        assert refusals.first is not None
        assert "topic orders" in refusals.first
        refusals.forget("commit")  # its offsets gone: nothing to say
        refusals.allowed("fetch")
        refusals.allowed("fetch")  # said once
    assert refusals.first is None
    said = [(r.levelname, r.getMessage().split(": kafka")[0]) for r in caplog.records]
    assert said == [
        ("WARNING", "refused fetch"),
        ("WARNING", "refused fetch"),
        ("WARNING", "refused commit"),
        ("INFO", "allowed fetch again"),
    ]
    assert {getattr(r, "sink", None) for r in caplog.records} == {"crm"}


def test_what_a_shell_would_split_is_quoted() -> None:
    acl = Acl("group", "orderbus.crm", ("Read",), "why")
    line = kafka_acls_command(acl, "User:CN=orderbus,O=Shop Ltd", "k1:9093")
    assert "--allow-principal 'User:CN=orderbus,O=Shop Ltd' --operation Read --group orderbus.crm" in line
