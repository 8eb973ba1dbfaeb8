"""How an instance belongs to its sinks' consumer groups: which partitions it gets, and keeps across a restart.

Each instance keeps its sinks' delivery states on its own disk (`consumers.dedup`): the downstream id of every
order it created, and the orders a dead letter blocks. A partition that moves to another instance leaves them
behind: there an update goes by order number (`urls.by_number`), which a system may not serve, and a blocked
order's later events are delivered. With Kafka's dynamic membership, every restart moves partitions twice (the
instance leaves its groups, then joins them again), and the round-robin assignor hands them out by member id,
random at each start: after a rolling deploy of three instances almost every partition lives elsewhere.

**Static membership** (KIP-345, ``kafka.group_instance_id``) keeps them in place: the instance joins under a name
of its own. A stop does not leave the groups, and the same name joining again within the session timeout gets its
partitions back without a rebalance: nothing moves while a daemon restarts, is killed and started again, or is
upgraded. The price: the partitions of an instance stopped for good wait for its session to time out before
another instance takes them. An instance that dies keeps its partitions waiting as long, so the session timeout is
the time a restart must fit in (45 s by default with a name, Kafka's own default since 3.0; 6 s without).

When a rebalance does happen (an instance added, or gone for good), the partitions are dealt over the members in
the order of their member ids (`consumers.assignment`: partition p of each topic to member p mod M), and the broker
names a static member's id after its instance (``<group_instance_id>-<uuid>``): the same set of names is dealt the
same partitions again.

Two live instances under one name fence each other. When the second joins a group the first already holds, they
fence each other in turn, each rejoining as the other's heartbeat fails: both hold the same partitions, a second
at a time, for as long as both run. Nothing is delivered twice in effect (the idempotency keys), but it is a
setting to fix: `ChurnWatch` notices the assignments coming every few seconds and says so, and the daemon reports
the sink not ready. The broker may also refuse one of them for good (FENCED_INSTANCE_ID, which aiokafka reports as
an unknown error, and keeps rejoining with its refused member id): that one stays out of the group, and
`ChurnWatch` says so once it has waited longer than a join can take.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Final

from consumers.clock import Clock

DYNAMIC_SESSION_TIMEOUT: Final = 6.0  # the smallest a broker allows by default (group.min.session.timeout.ms)
STATIC_SESSION_TIMEOUT: Final = 45.0  # a restart fits in it: systemd's RestartSec=10 and a start of a few seconds
# Assignments within the window that mean another instance joins under the same name: fenced in turn, each member
# is assigned at every heartbeat (2 s); a rolling deploy of a few instances assigns a member a handful of times.
CHURN_LIMIT: Final = 10
CHURN_WINDOW: Final = 60.0
# Seconds out of the group after which a static member says its name may be taken: longer than a join may wait for
# the other members' drains (their rebalance timeout, `consumers.kafka_io.REBALANCE_TIMEOUT_MS`).
JOIN_WAIT: Final = 75.0


@dataclass(frozen=True, slots=True)
class Membership:
    """`instance_id`: the static member name (``kafka.group_instance_id``), or None for dynamic membership;
    `session_timeout`: seconds, None for the default of the kind of membership."""

    instance_id: str | None = None
    session_timeout: float | None = None

    @property
    def session_timeout_ms(self) -> int:
        if self.session_timeout is not None:
            return round(self.session_timeout * 1000)
        return round((DYNAMIC_SESSION_TIMEOUT if self.instance_id is None else STATIC_SESSION_TIMEOUT) * 1000)

    def consumer_options(self) -> dict[str, Any]:
        """The `AIOKafkaConsumer` keywords of this membership."""
        return {
            "group_instance_id": self.instance_id,
            "session_timeout_ms": self.session_timeout_ms,
        }


DYNAMIC: Final = Membership()


class ChurnWatch:
    """Tells a static member whose name another live consumer uses too (module docstring), two ways:

    - its assignments come at every heartbeat: `CHURN_LIMIT` within `CHURN_WINDOW` seconds (said until its last
      `CHURN_LIMIT` assignments no longer fall within a window);
    - it has been out of its group for `JOIN_WAIT` seconds since it began to join, or since a rebalance took its
      partitions and they were drained (the broker refused it).
    """

    def __init__(self, membership: Membership, group: str, clock: Clock) -> None:
        self._membership = membership
        self._group = group
        self._clock = clock
        self._out_since: float | None = clock.now()  # not assigned since then
        self._limit = CHURN_LIMIT
        self._times: collections.deque[float] = collections.deque(maxlen=self._limit)
        self._said = False

    @property
    def membership(self) -> Membership:
        return self._membership

    def revoked(self) -> None:
        """A rebalance took the partitions (and they are drained): out of the group until the next assignment.
        Between a revoke and its assignment, a churn already seen is still said (fenced in turn, a member is out of
        the group half the time)."""
        if self._out_since is None:
            self._out_since = self._clock.now()

    def assigned(self) -> str | None:
        """Count an assignment; the problem when this one makes the membership contested (once an episode)."""
        self._out_since = None
        if self._membership.instance_id is None:
            return None
        self._times.append(self._clock.now())
        problem = self.problem
        news = problem is not None and not self._said
        self._said = problem is not None
        return problem if news else None

    @property
    def problem(self) -> str | None:
        """Why the membership is contested, or None."""
        name = self._membership.instance_id
        if name is None:
            return None
        now, times = self._clock.now(), self._times
        if self._out_since is not None and now - self._out_since > JOIN_WAIT:
            return (
                f"not in consumer group {self._group} for {now - self._out_since:.0f} s: kafka unreachable, or "
                f"another instance runs under kafka.group_instance_id {name!r} too (the broker refuses a second "
                "member of one name); give every instance a name of its own"
            )
        if len(times) < self._limit or now - times[0] > CHURN_WINDOW:
            return None
        return (
            f"assigned {self._limit} times within {times[-1] - times[0]:.0f} s: another consumer of group "
            f"{self._group} runs under kafka.group_instance_id {name!r} too, and the two fence each other in turn; "
            "give every instance a name of its own"
        )
