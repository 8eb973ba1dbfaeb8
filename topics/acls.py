"""The Kafka ACLs a daemon needs on a cluster that authorizes its clients, as data.

`orderbus topics acls` prints them as kafka-acls.sh commands for the settings at hand (the prefix, whether the
ingest runs, which sinks); the errors of a daemon that a broker refuses point there. Each grant is the least its
part needs, checked against a real broker with Kafka's StandardAuthorizer (tests/integration/test_kafka_acls.py):

- the ingest: Write on the orders topic (with Kafka 3.0 and later, Write on a topic also allows an idempotent
  producer's InitProducerId; older brokers want IdempotentWrite on the cluster as well, for the sinks' dead-letter
  producer too);
- each sink: Read on the orders topic and on its replay topic, Write on its dead-letter topic, Read and Write on
  its state topic (`consumers.order_state`), Read on its consumer group; and DescribeConfigs on the orders topic,
  whose retention the backlog alert is held to (`daemon.topic_retention`).

Read and Write imply Describe, which lists a topic: a topic the principal may not describe is left out of a
listing as if it did not exist.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
)

from topics.catalogue import consumer_group, dlq_topic, orders_topic, replay_topic, state_topic

__all__ = ["GRANT", "Acl", "Refusals", "daemon_acls", "kafka_acls_command", "refusal"]

GRANT: Final = "grant it what `orderbus topics acls` prints for these settings"


@dataclass(frozen=True, slots=True)
class Acl:
    """Allow `operations` (as kafka-acls.sh names them: Read, Write, DescribeConfigs) on one topic or group."""

    resource: Literal["topic", "group"]
    name: str
    operations: tuple[str, ...]
    why: str


def daemon_acls(prefix: str, sinks: Sequence[str], *, ingest: bool) -> list[Acl]:
    """What a daemon with these parts needs, each resource once, in the catalogue's order."""
    orders: list[str] = []
    whys: list[str] = []
    if ingest:
        orders.append("Write")
        whys.append("the ingest publishes orders")
    if sinks:
        orders += ["Read", "DescribeConfigs"]
        whys.append("the sinks read orders and its retention")
    acls = [Acl("topic", orders_topic(prefix), tuple(orders), "; ".join(whys))] if orders else []
    for sink in sinks:
        acls += [
            Acl("topic", dlq_topic(sink, prefix), ("Write",), f"sink {sink} writes its dead letters"),
            Acl("topic", replay_topic(sink, prefix), ("Read",), f"sink {sink} reads its replayed dead letters"),
            Acl("topic", state_topic(sink, prefix), ("Read", "Write"), f"sink {sink} shares its order state"),
            Acl("group", consumer_group(sink, prefix), ("Read",), f"sink {sink}'s consumer group"),
        ]
    return acls


def kafka_acls_command(acl: Acl, principal: str, bootstrap: str) -> str:
    """The kafka-acls.sh line that grants `acl` to `principal` (``User:orderbus``), quoted for a shell where it
    must be (a certificate's subject has spaces and commas)."""
    operations = " ".join(f"--operation {operation}" for operation in acl.operations)
    return (
        f"kafka-acls.sh --bootstrap-server {shlex.quote(bootstrap)} --add --allow-principal {shlex.quote(principal)} "
        f"{operations} --{acl.resource} {shlex.quote(acl.name)}"
    )


def refusal(error: BaseException) -> str | None:
    """What a broker's authorization refusal `error` says the daemon's principal may not do, with where the grants
    are; None for any other error."""
    kind = type(error).__name__
    if isinstance(error, GroupAuthorizationFailedError):
        return f"kafka does not let this daemon's principal use {_named(error, 'consumer group')} ({kind}): {GRANT}"
    if isinstance(error, TopicAuthorizationFailedError):
        return f"kafka does not let this daemon's principal use {_named(error, 'topic')} ({kind}): {GRANT}"
    if isinstance(error, ClusterAuthorizationFailedError):
        return (
            f"kafka does not let this daemon's principal start an idempotent producer ({kind}: it needs Write on a "
            f"topic, or IdempotentWrite on the cluster before Kafka 3.0): {GRANT}"
        )
    return None


def _named(error: BaseException, kind: str) -> str:
    """The topics or groups aiokafka put in `error` (a name, or a set of them), sorted, after `kind` ("topic")."""
    named = error.args[0] if error.args else None
    names = [named] if isinstance(named, str) else sorted(map(str, named)) if isinstance(named, Iterable) else []
    if not names:
        return f"a {kind}"
    return f"{kind}{'s' if len(names) > 1 else ''} {', '.join(names)}"


class Refusals:
    """What the brokers refuse one part of the daemon, by step (a sink's "fetch" and "commit", the ingest's
    "records"): said at WARNING when it begins or changes (`refused` % (step, why)), and at INFO when the step is let
    again (`allowed` % step); not at every retry, since a grant takes minutes and the part's readiness, or its
    status, says it meanwhile."""

    def __init__(
        self, log: logging.Logger, refused: str, allowed: str, extra: Mapping[str, object] | None = None
    ) -> None:
        self._log, self._refused_said, self._allowed_said = log, refused, allowed
        self._extra = dict(extra or {})
        self._refused: dict[str, str] = {}

    @property
    def first(self) -> str | None:
        """What is refused (the first step's words), or None."""
        return next(iter(self._refused.values()), None)

    def note(self, step: str, error: BaseException) -> bool:
        """Whether `error` is an authorization refusal (`refusal`); kept for `step`, said if it is new."""
        why = refusal(error)
        if why is None:
            return False
        if self._refused.get(step) != why:
            self._log.warning(self._refused_said, step, why, extra=self._extra)
        self._refused[step] = why
        return True

    def allowed(self, step: str) -> None:
        """`step` went through: its refusal, if any, is over, and said so."""
        if self._refused.pop(step, None) is not None:
            self._log.info(self._allowed_said, step, extra=self._extra)

    def forget(self, step: str) -> None:
        """`step`'s refusal no longer matters (what it was refused is gone); nothing said."""
        self._refused.pop(step, None)
