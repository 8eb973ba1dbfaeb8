"""How a sink's group deals its partitions: partition p of each topic it reads to the same member.

A sink's group reads the orders topic and the sink's replay topic (`topics.catalogue`). Both are keyed by order
number and have the same partition count, so an order's records are in partition p of each. The member that holds
orders partition p holds the order's delivery state in its own file (`consumers.dedup`: the downstream id, the dead
letters that block the order). A replayed dead letter must reach that member: dealt to another, it was delivered by
an instance that did not know the order was blocked, and the instance that did kept it blocked (its later events
dead-lettered behind a dead letter already delivered), and a replayed create's downstream id went to a file that
never sees the order's updates.

Kafka's round robin deals the partitions of every topic in one sequence, so replay partition p went to the member of
position N + p (N: the orders topic's partitions), the same member only when the members' count divides N. This
assignor deals each topic on its own: partition p to member p mod M, the members sorted by id (a static member's id
begins with its name, `consumers.membership`). For the orders topic that is round robin's dealing, so an upgrade
moves none of its partitions.

It is announced under round robin's name, alone: its members' metadata is round robin's (the topics, nothing
else), so during a rolling upgrade old and new members agree on the protocol at once, and whichever member leads
the group deals (round robin while an old one leads: the replay topic as before, until the upgrade ends). Listed
after a protocol of its own, it would cost every join two JoinGroup requests (aiokafka 0.14 sends one per listed
assignor) and depend on aiokafka ignoring the first one's refusal in a mixed group.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Final

from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

log = logging.getLogger(__name__)


class CoLocatedAssignor(AbstractPartitionAssignor):  # type: ignore[misc]  # aiokafka ships no types
    """Partition p of every topic to the same member: p mod M of the topic's readers sorted by member id."""

    name = RoundRobinPartitionAssignor.name  # the module docstring says why
    version = RoundRobinPartitionAssignor.version

    @classmethod
    def assign(
        cls, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        dealt: dict[str, dict[str, list[int]]] = {member: defaultdict(list) for member in members}
        for topic in sorted({topic for metadata in members.values() for topic in metadata.subscription}):
            partitions = cluster.partitions_for_topic(topic)
            if partitions is None:
                log.warning("no partition metadata for topic %s", topic)
                continue
            readers = sorted(member for member, metadata in members.items() if topic in metadata.subscription)
            for partition in sorted(partitions):
                dealt[readers[partition % len(readers)]][topic].append(partition)
        return {
            member: ConsumerProtocolMemberAssignment(cls.version, sorted(topics.items()), b"")
            for member, topics in dealt.items()
        }

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(cls.version, list(topics), b"")

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        return None


# The `AIOKafkaConsumer` keyword.
ASSIGNORS: Final = (CoLocatedAssignor,)
