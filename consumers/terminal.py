"""A record's terminal bookkeeping: its state put for the group commit, its dead letter written, and what is
reported (metrics, a log event) once that state is durable.

The lane (`consumers.lane`) decides what happens to a record; these functions record it. Each terminal step
returns a `Settling`: the record, and what to report once its state is on disk (nothing is counted as delivered
or dead-lettered before that, so a crash in between reports it again, never twice).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from consumers.deadletter import DeadLetter, Reason
from consumers.dedup import DeliveryState, DeliveryStatus
from consumers.delivery import Reply, TransportFailure
from consumers.policy import Decision
from consumers.work import Work
from topics.errors import PublishError

if TYPE_CHECKING:
    from consumers.lane import LaneContext

__all__ = ["Attempts", "Settling", "already_delivered", "dead_letter", "delivered", "put_state"]

log = logging.getLogger(__name__)

_DLQ_RETRY = 1.0  # first wait after a failed dead-letter write; doubles up to the backoff cap


@dataclass(slots=True)
class Settling:
    """A record whose terminal state is put, waiting for it to be durable; then `after` (metrics, logs) runs."""

    work: Work
    after: Callable[[], None]
    holds_unsettled: bool = False  # it holds a place of `LaneContext.unsettled`, given back once durable
    failed_flushes: int = 0  # flushes of its state that failed so far (`Lane._flush_again`)
    unblocks: str | None = None  # the order it took the last record off the chain of: `Blocks.settled` once durable


@dataclass(slots=True)
class Attempts:
    """One record's attempts so far: how many, when the first and the last began, and the last outcome."""

    count: int = 0
    first_wall: float | None = None
    first_mono: float | None = None
    last_wall: float | None = None
    last: Reply | TransportFailure | None = None


def delivered(
    context: LaneContext, work: Work, attempts: Attempts, outcome: Reply | TransportFailure, decision: Decision
) -> Settling:
    """The downstream took the record (``done``), or had it already (``duplicate``): put that state."""
    assert work.prepared is not None
    assert isinstance(outcome, Reply)
    downstream_id = context.sink.downstream_id(work.prepared, outcome.status, outcome.body, outcome.location)
    if downstream_id is not None:
        context.store.put_downstream_id(work.order_ref, downstream_id, origin=work.origin)
    status: DeliveryStatus = "done" if decision.action == "done" else "duplicate"
    put_state(context, work, status, attempts, downstream_id=downstream_id, digest=outcome.digest)
    report = functools.partial(_report_delivered, context, work, attempts.count, outcome.status, status)
    return Settling(work, report, unblocks=_off_the_chain(context, work))


def already_delivered(context: LaneContext, work: Work) -> Settling:
    """A replayed record that the dedup table has as delivered: skipped, as the engine skips one it finds so.

    A replay can hold two copies of a record (one dead-lettered again after an earlier replay); the engine
    looked both up before the first was delivered. Nothing is written, but for its order's chain.
    """
    return Settling(work, context.hot.skipped_duplicate, unblocks=_off_the_chain(context, work))


def _off_the_chain(context: LaneContext, work: Work) -> str | None:
    """A delivered (or unreadable) record leaves its order's dead-letter chain, if it is on one
    (`consumers.blocks`): in the same write buffer as its state, so in the same flush. If that empties the chain,
    return the order: it is unblocked for the other lanes once the record's state is durable (`Lane._settled`,
    with whichever flush makes it so: a failed flush is tried again with a later one)."""
    return work.order_ref if context.blocked.delivered(work) else None


def _report_delivered(context: LaneContext, work: Work, attempt: int, http_status: int, status: DeliveryStatus) -> None:
    """Once the ``done`` (or ``duplicate``) state is durable."""
    assert work.prepared is not None
    outcome_label = "delivered" if status == "done" else "duplicate"
    context.hot.deliveries[outcome_label].inc()
    if status == "done" and work.timestamp_ms > 0:
        latency = max(0.0, context.clock.wall() - work.timestamp_ms / 1000)
        context.hot.end_to_end_seconds.observe(latency)
    if log.isEnabledFor(logging.DEBUG):  # not even its fields are built per delivery at INFO
        log.debug(
            "delivered",
            extra={
                "sink": context.sink.name,
                "event_id": work.prepared.event_id,
                "order": work.order_ref,
                "attempt": attempt,
                "status": http_status,
            },
        )


async def dead_letter(
    context: LaneContext,
    work: Work,
    reason: Reason,
    rule: str,
    attempts: Attempts,
    park: Callable[[float], Awaitable[None]],
    detail: str = "",
) -> Settling:
    """Write the dead letter durably (retrying until the broker takes it), then put the key as dead."""
    last = attempts.last
    letter = DeadLetter(
        sink=context.sink.name,
        reason=reason,
        rule=rule,
        topic=work.tp[0],
        partition=work.tp[1],
        offset=work.offset,
        key=work.key,
        value=work.value,
        headers=work.headers,
        idempotency_key=work.idempotency_key,
        http_status=last.status if isinstance(last, Reply) else None,
        body_excerpt=last.excerpt if isinstance(last, Reply) else "",
        detail=detail or (last.detail if isinstance(last, TransportFailure) else ""),
        attempts=attempts.count,
        first_attempt_at=attempts.first_wall,
        last_attempt_at=attempts.last_wall,
    )
    wait = _DLQ_RETRY
    while True:
        try:
            await context.dead_letters.write(letter)
            break
        except PublishError as exc:
            log.error("dead-letter write failed, retrying", extra={"sink": context.sink.name, "error": str(exc)})
            await park(wait)
            wait = min(wait * 2, context.backoff.cap)
    unblocks = None
    if reason == "invalid":
        # Unreadable: no replay can deliver it and its order number is not to be trusted, so it blocks nothing
        # (`consumers.blocks`). One that blocked its order (an earlier version) leaves the chain when replayed.
        unblocks = _off_the_chain(context, work)
    else:
        context.blocked.dead_lettered(work)  # its order's later records follow it
    put_state(context, work, "dead", attempts, reason=reason)
    report = functools.partial(_report_dead_lettered, context, work, reason, rule, attempts.count, letter)
    return Settling(work, report, unblocks=unblocks)


def _report_dead_lettered(
    context: LaneContext, work: Work, reason: Reason, rule: str, attempt: int, letter: DeadLetter
) -> None:
    """Once the ``dead`` state is durable."""
    context.metrics.dead_letters.labels(context.sink.name, reason).inc()
    context.hot.deliveries["dead_lettered"].inc()
    log.warning(
        "dead-lettered",
        extra={
            "sink": context.sink.name,
            "reason": reason,
            "rule": rule,
            "order": work.order_ref,
            "event_id": work.prepared.event_id if work.prepared else None,
            "attempt": attempt,
            "status": letter.http_status,
        },
    )


def put_state(
    context: LaneContext,
    work: Work,
    status: DeliveryStatus,
    attempts: Attempts,
    *,
    downstream_id: str | None = None,
    digest: str | None = None,
    reason: str | None = None,
) -> None:
    """Put the record's state in the dedup store's write buffer; the next group flush makes it durable."""
    last = attempts.last
    context.store.put(
        DeliveryState(
            key=work.idempotency_key,
            event_id=work.prepared.event_id if work.prepared else "",
            order_ref=work.order_ref,
            status=status,
            attempts=attempts.count,
            last_status=last.status if isinstance(last, Reply) else None,
            first_attempt_at=attempts.first_wall,
            last_attempt_at=attempts.last_wall,
            downstream_id=downstream_id,
            reply_digest=digest,
            reason=reason,
            updated_at=context.clock.wall(),
            event_type=work.prepared.event_type if work.prepared else None,
        )
    )
