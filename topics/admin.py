"""Apply the topic catalogue to a cluster: create what is missing, report drift, never delete or shrink.

`apply_catalogue` is safe to run any number of times. A topic that exists with another partition count or other
managed configs is reported as drift: changing partitions would move keys between partitions (breaking
per-order ordering) and retention changes deserve a human decision, so neither is done automatically. The one
exception is a replay topic with fewer partitions than the orders topic (`TopicSpec.follows`): it is grown, because
its records only wait for their sink to read them, and with fewer partitions a replay could reach an instance that
does not hold its order's state (`consumers.assignment`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import InvalidPartitionsError, KafkaError, TopicAuthorizationFailedError, for_code
from aiokafka.protocol.metadata import MetadataRequest

from topics.acls import GRANT
from topics.broker_diagnosis import Diagnose, unreachable
from topics.catalogue import TopicSpec
from topics.errors import BrokerError, NotYetError, RefusedError

_TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True, slots=True)
class Drift:
    """One difference between a live topic and its spec."""

    topic: str
    setting: str
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.topic}: {self.setting} is {self.actual}, catalogue says {self.expected}"


@dataclass(slots=True)
class ApplyReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    drift: list[Drift] = field(default_factory=list)
    grown: list[tuple[str, int, int]] = field(default_factory=list)  # topic, partitions before, after


async def apply_catalogue(
    specs: Sequence[TopicSpec], client_options: Mapping[str, Any], *, timeout: float = 30.0
) -> ApplyReport:
    """Create the missing topics of `specs` and report drift of the existing ones.

    `client_options` are aiokafka client keyword arguments (bootstrap_servers, security settings).
    Raises `BrokerError` when the cluster cannot be reached or refuses a creation.
    """
    async with _admin(client_options, timeout, "apply topics") as admin:
        return await _apply(admin, specs, timeout)


@contextlib.asynccontextmanager
async def _admin(
    client_options: Mapping[str, Any], timeout: float, doing: str, diagnosis: Diagnose | None = None
) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client, started, closed at the end of the block; a `KafkaError` within it is a `BrokerError` that
    says why the brokers cannot be reached for `doing` (`topics.broker_diagnosis.unreachable`)."""
    admin = AIOKafkaAdminClient(**client_options, request_timeout_ms=int(timeout * 1000))
    try:
        await admin.start()
        yield admin
    except KafkaError as exc:
        raise BrokerError(await unreachable(doing, client_options, exc, diagnosis)) from exc
    finally:
        await admin.close()


async def _apply(admin: AIOKafkaAdminClient, specs: Sequence[TopicSpec], timeout: float) -> ApplyReport:
    report = ApplyReport()
    existing = set(await admin.list_topics())
    listed = [spec.name for spec in specs if spec.name in existing]
    partitions = await _partition_counts(admin, listed) if listed else {}
    # A topic that follows another has that one's count as it is, not as the settings say it should be.
    specs = [
        dataclasses.replace(spec, partitions=partitions[spec.follows]) if spec.follows in partitions else spec
        for spec in specs
    ]
    missing = [spec for spec in specs if spec.name not in existing]
    if missing:
        await _create(admin, missing, timeout)
        await until_listed(admin, [spec.name for spec in missing], timeout)
        report.created.extend(spec.name for spec in missing)
    present = [spec for spec in specs if spec.name in existing]
    if present:
        configs = await _configs(admin, [spec.name for spec in present])
        growing = {
            spec.name: spec.partitions
            for spec in present
            if spec.follows is not None and 0 < partitions.get(spec.name, 0) < spec.partitions
        }
        if growing:
            await _grow(admin, growing, timeout)
            report.grown.extend((name, partitions[name], count) for name, count in growing.items())
            partitions.update(growing)
        for spec in present:
            drift = _compare(spec, partitions.get(spec.name, 0), configs.get(spec.name, {}))
            report.drift.extend(drift)
            if not drift and spec.name not in growing:
                report.unchanged.append(spec.name)
    return report


async def _grow(
    admin: AIOKafkaAdminClient,
    counts: Mapping[str, int],
    timeout: float,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Add partitions to the topics in `counts`, up to their count there, and return once the broker describes them
    so (a daemon started right after would see the old count). Another `apply` that grew them a moment ago is the
    state we want."""
    wanted = {name: NewPartitions(total_count=count) for name, count in counts.items()}
    refused: KafkaError | None = None
    try:
        await admin.create_partitions(wanted, timeout_ms=int(timeout * 1000))
    except InvalidPartitionsError as exc:
        refused = exc  # as many already, after another `apply`? Then the broker describes them so in a moment.
    except KafkaError as exc:
        raise BrokerError(f"cannot add partitions to {', '.join(sorted(counts))}: {exc}") from exc
    deadline = clock() + timeout
    while True:
        described = await _partition_counts(admin, list(counts))
        if not (short := sorted(name for name, count in counts.items() if described.get(name, 0) < count)):
            return
        if clock() >= deadline:
            why = f"the broker refused ({refused})" if refused else "added, but the broker does not describe them"
            raise BrokerError(f"partitions of {', '.join(short)}: {why}, after {timeout:g} s")
        await sleep(0.1)


async def _create(admin: AIOKafkaAdminClient, specs: Sequence[TopicSpec], timeout: float) -> None:
    new_topics = [
        NewTopic(
            name=spec.name,
            num_partitions=spec.partitions,
            replication_factor=spec.replication_factor,
            topic_configs=dict(spec.configs),
        )
        for spec in specs
    ]
    response = await admin.create_topics(new_topics, timeout_ms=int(timeout * 1000))
    for entry in response.to_object()["topic_errors"]:
        code = entry["error_code"]
        # Another `apply` may have created it a moment ago: that is the state we want.
        if code not in (0, _TOPIC_ALREADY_EXISTS):
            message = entry.get("error_message") or f"error code {code}"
            raise BrokerError(f"cannot create topic {entry['topic']}: {message}")


async def until_listed(
    admin: AIOKafkaAdminClient,
    names: Sequence[str],
    timeout: float,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Return once the broker lists every one of `names`, else a `BrokerError` after `timeout` seconds.

    The controller answers a creation once it has recorded it; the brokers learn of the topic a moment later. Until
    then a listing lacks it, and the daemon started right after `orderbus topics apply` (a deploy script, a test)
    refused to start on a topic that "does not exist" -- exit 2, which systemd does not restart."""
    deadline = clock() + timeout
    while missing := await _unlisted(admin, names):
        if clock() >= deadline:
            raise BrokerError(
                f"created, but the broker has not listed them after {timeout:g} s: {', '.join(sorted(missing))}"
            )
        await sleep(0.1)


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    """The partition counts of those of `names` the broker describes (absent: not described, as for a topic just
    created whose partitions have no leader yet). The names must be listed: a metadata request may create a topic."""
    described = await admin.describe_topics(names)
    return {t["topic"]: len(t["partitions"]) for t in described if t.get("error_code", 0) == 0 and t["partitions"]}


async def _configs(
    admin: AIOKafkaAdminClient, names: list[str], errors: dict[str, int] | None = None
) -> dict[str, dict[str, str]]:
    """The configs of those of `names` the brokers describe; the error code of each they do not goes into `errors`
    (no such topic, not authorized to describe its configs)."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    result: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.to_object()["resources"]:
            if resource["error_code"] != 0:
                if errors is not None:
                    errors[resource["resource_name"]] = resource["error_code"]
                continue
            entries = resource["config_entries"]
            result[resource["resource_name"]] = {
                entry.get("config_name", entry.get("config_names")): entry["config_value"] for entry in entries
            }
    return result


def _compare(spec: TopicSpec, partitions: int, configs: Mapping[str, str]) -> list[Drift]:
    drift = []
    if partitions != spec.partitions:
        drift.append(Drift(spec.name, "partitions", str(spec.partitions), str(partitions)))
    for key, expected in sorted(spec.configs.items()):
        actual = configs.get(key)
        if actual != expected:
            drift.append(Drift(spec.name, key, expected, "unset" if actual is None else actual))
    return drift


async def missing_topics(
    names: Sequence[str], client_options: Mapping[str, Any], *, timeout: float = 30.0, diagnosis: Diagnose | None = None
) -> list[str]:
    """Those of `names` the cluster does not have, from a listing of every topic.

    A metadata request that names a topic may create it (aiokafka asks for auto-creation, which brokers allow by
    default), with the broker's defaults rather than the catalogue's; a listing names none, so it creates none.
    Raises `BrokerError` when the cluster cannot be reached, saying why (`diagnosis`: a daemon's, which asks at most
    once a minute; else `topics.broker_diagnosis.diagnose`, asked at once).
    """
    async with _admin(client_options, timeout, "list topics", diagnosis) as admin:
        missing = await _unlisted(admin, names)
        hidden = await _hidden(admin, missing) if missing else []
    if hidden:
        raise NotYetError(
            f"the brokers do not let {_principal(client_options)} see topic{'s' if len(hidden) > 1 else ''} "
            f"{', '.join(hidden)} (TopicAuthorizationFailedError: not authorized to describe; they may well exist): "
            f"{GRANT}"
        )
    return missing


async def _unlisted(admin: AIOKafkaAdminClient, names: Sequence[str]) -> list[str]:
    """Those of `names` a listing of every topic lacks, in their order."""
    existing = set(await admin.list_topics())
    return [name for name in names if name not in existing]


async def _hidden(admin: AIOKafkaAdminClient, names: Sequence[str]) -> list[str]:
    """Those of `names` (unlisted) the brokers do not let this principal describe: a listing leaves them out as if
    they did not exist. Asked by name without auto-creation (Metadata v4 and later), so that none is created."""
    request = MetadataRequest(list(names), allow_auto_topic_creation=False)
    # aiokafka's own `describe_topics` asks with auto-creation on, and its admin client has no other way in.
    answer = await admin._send_request(request)
    code = TopicAuthorizationFailedError.errno
    refused = {t["topic"] for t in answer.to_object()["topics"] if t["error_code"] == code}
    return [name for name in names if name in refused]


def _principal(client_options: Mapping[str, Any]) -> str:
    """Who the brokers take these clients for, as far as the settings say: the SASL user, else the certificate."""
    if user := client_options.get("sasl_plain_username"):
        return f"this daemon's principal (User:{user})"
    if client_options.get("security_protocol") in ("SSL", "SASL_SSL"):
        return "this daemon's principal (its client certificate's subject)"
    return "this daemon's principal"


async def group_offsets(
    admin: AIOKafkaAdminClient, group: str, partitions: Sequence[TopicPartition]
) -> dict[TopicPartition, int] | None:
    """`group`'s committed offset of each of `partitions` (-1: none committed there), or None while the broker does
    not tell them.

    While a broker's group coordinator is not ready (it loads the groups after a start), OffsetFetch carries the
    error at the group level and no partition at all, and aiokafka's `list_consumer_group_offsets` ignores that
    error: the answer reads as an empty dict. Taken as "nothing committed", it made every record look unread.
    """
    answer = await admin.list_consumer_group_offsets(group, partitions=list(partitions))
    if any(tp not in answer for tp in partitions):
        return None
    return {tp: answer[tp].offset for tp in partitions}


async def partition_counts(
    names: Sequence[str], client_options: Mapping[str, Any], *, timeout: float = 30.0
) -> dict[str, int]:
    """How many partitions each of `names` has (absent: it does not exist, or is not described yet). Asked only of
    the listed ones: a metadata request that names a topic may create it (see `missing_topics`)."""
    async with _admin(client_options, timeout, "describe topics") as admin:
        existing = set(await admin.list_topics())
        listed = [name for name in names if name in existing]
        return await _partition_counts(admin, listed) if listed else {}


async def topic_configs(
    names: Sequence[str], client_options: Mapping[str, Any], *, timeout: float = 30.0, diagnosis: Diagnose | None = None
) -> dict[str, dict[str, str]]:
    """Each of `names`' configs as its brokers apply them, the defaults included; `BrokerError` naming the error of
    one they do not describe (no such topic; `RefusedError` when not authorized to), or why the brokers cannot be
    reached (`diagnosis`: a daemon's, asked at most once a minute). A DescribeConfigs request creates no topic."""
    errors: dict[str, int] = {}
    async with _admin(client_options, timeout, "describe topic configs", diagnosis) as admin:
        configs = await _configs(admin, list(names), errors)
    if errors:
        said = ", ".join(f"{name}: {for_code(code).__name__}" for name, code in errors.items())
        refused = TopicAuthorizationFailedError.errno in errors.values()
        raise (RefusedError if refused else BrokerError)(f"the brokers did not describe the configs of {said}")
    return configs


async def partition_ids(topic: str, client_options: Mapping[str, Any], *, timeout: float = 30.0) -> list[int]:
    """The partition ids of `topic`, 0 to its count (empty when it does not exist): `partition_counts`."""
    return list(range((await partition_counts([topic], client_options, timeout=timeout)).get(topic, 0)))
