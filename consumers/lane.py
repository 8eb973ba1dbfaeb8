"""A lane: the records of one order key in one partition, delivered strictly in order, retries included.

A lane is one task at a time. It takes its oldest record through attempts until the record is terminal, then the next.
A temporary failure *parks* the lane until its next attempt time; that wait is the lane's own and never blocks
the poll loop or other keys. HTTP requests across all lanes are bounded by the sink's `max_in_flight` slots,
and paced by the sink's shared `Pacer`.

A record is finished once its terminal state is durable (group commit, `consumers.group_flush`). The lane's task
does not wait for that: it ends with the record *settling*, a done-callback of the flush's batch, and that callback
finishes the record and starts the task again if more records wait. So the next record of the key is still sent
only once the one before it is durable, and a lane costs no task wake-up per record. What a terminal record
leaves behind (its state, its dead letter, and what is reported once that is durable) is `consumers.terminal`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from consumers.backoff import Backoff
from consumers.blocks import Blocks
from consumers.circuit import Circuit
from consumers.clock import Clock
from consumers.deadletter import DeadLetterWriter
from consumers.dedup import DedupStore
from consumers.delivery import Reply, TransportFailure
from consumers.metrics import EngineMetrics, HotSeries
from consumers.pacing import Pacer
from consumers.policy import DEFAULT_POLICY, HTML_ANSWER, IN_PROGRESS, Decision, parse_retry_after
from consumers.ramp import Ramp
from consumers.sink import HttpRequest, Sink
from consumers.terminal import Attempts, Settling, already_delivered, dead_letter, delivered, put_state
from consumers.work import TopicPartitionKey, Work

if TYPE_CHECKING:
    from collections.abc import Awaitable

log = logging.getLogger(__name__)

_PROBE_WAIT = 0.5  # how often a lane looks again while another lane holds the half-open probe
_TIMED_STATUSES = (409, 429, 503)  # the answers whose Retry-After orderbus follows (a 409's: `IN_PROGRESS`)
_FLUSH_RETRY = 1.0  # first wait after a failed flush of a settling record's state; doubles up to the backoff cap


def _released() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@dataclass
class LaneContext:
    """What every lane of one sink shares."""

    sink: Sink
    deliver: Callable[[HttpRequest, str], Awaitable[Reply | TransportFailure]]
    store: DedupStore
    dead_letters: DeadLetterWriter
    metrics: EngineMetrics
    hot: HotSeries  # `metrics`' series of this sink that every record touches
    clock: Clock
    backoff: Backoff
    retry_after_cap: float
    pacer: Pacer
    circuit: Circuit
    auth: Circuit
    slots: asyncio.Semaphore  # HTTP requests under way: `max_in_flight`
    unsettled: asyncio.Semaphore  # records sent and not yet durably recorded: 2 x `max_in_flight`
    rng: random.Random
    batch: Callable[[], asyncio.Future[None]]  # the group flush's next batch (`consumers.group_flush.GroupFlush`)
    failed: Callable[[Exception], None]  # a lane's task raised: the engine's run fails with that error
    blocked: Blocks  # orders with records in the dead-letter topic (`consumers.blocks`)
    ramp: Ramp  # the slow start after the circuit closes (`consumers.ramp`)
    # Set unless the operator holds the sink (`sinks.<name>.paused`, `SinkEngine.set_held`): while it is clear, no
    # attempt starts, retries included, and the time held counts against no record's `max_elapsed`.
    released: asyncio.Event = field(default_factory=_released)
    in_flight: int = 0
    certificate_said_at: float = -math.inf  # when a refused TLS certificate was last logged (`_say_certificate`)
    # The last attempt that counted against the circuit, said when it opens (`failure_text`).
    last_failure: Reply | TransportFailure | None = None


class Lane:
    """One key's records in order. `push` adds a record; `stop` ends the lane before its next attempt."""

    def __init__(
        self,
        lane_id: tuple[TopicPartitionKey, str],
        context: LaneContext,
        on_finished: Callable[[Lane, Work], None],
    ) -> None:
        self.id = lane_id
        self.task: asyncio.Task[None] | None = None
        self.parked = False
        self._context = context
        self._on_finished = on_finished
        self._queue: deque[Work] = deque()
        self._stopping = False
        self._waiting = False  # queued in the ramp or for the pace in `_attempt`: nothing sent yet
        self._ticket: int | None = None  # the ramp's ticket of the last attempt (`consumers.ramp`)
        self._settling: Settling | None = None  # the oldest record, terminal, waiting to be durable
        self._forgotten = False
        # Idempotency keys this lane finished while more records waited behind: a second copy of an event (in the
        # same fetch as the first, or queued behind it) was not yet terminal when the engine looked it up, and
        # must not be sent again. Made only when needed: most lanes hold one record, and a full buffer holds many.
        self._finished: set[str] | None = None

    @property
    def empty(self) -> bool:
        return not self._queue

    @property
    def size(self) -> int:
        return len(self._queue)

    @property
    def oldest_timestamp(self) -> int:
        return self._queue[0].timestamp_ms if self._queue else 0

    def push(self, work: Work) -> None:
        self._queue.append(work)
        if self._settling is None and (self.task is None or self.task.done()):
            self._start()

    def stop(self) -> None:
        """Finish nothing new; a lane that is only waiting (parked, held by a gate, queued in the ramp or for the
        pace, nothing sent) stops at once.

        A record already settling still finishes once durable (the drain waits for that: `GroupFlush.settled`).
        """
        self._stopping = True
        if (self.parked or self._waiting) and self.task is not None:
            self.task.cancel()

    def forget(self) -> None:
        """The lane's partition is no longer ours: a record settling after this finishes nothing."""
        self._stopping = self._forgotten = True

    def _start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"lane-{self._context.sink.name}")

    async def _run(self) -> None:
        try:
            while self._queue and not self._stopping:
                work = self._queue[0]
                if self._finished is not None and work.idempotency_key in self._finished and not work.replay:
                    self._context.hot.skipped_duplicate()
                    self._queue.popleft()
                    self._on_finished(self, work)
                    continue
                self._settling = await self._deliver(work)
                self._context.batch().add_done_callback(self._settled)
                return  # `_settled` goes on once the record is durable
        except Exception as exc:
            # Nobody awaits a lane's task: unseen, its error would freeze the partition's commits with nothing
            # said. The record stays unfinished (its offset is not committed) and the engine's run fails with it.
            log.error(
                "delivery failed unexpectedly; the record stays unfinished and the sink stops",
                exc_info=exc,
                extra={"sink": self._context.sink.name, "order": self._queue[0].order_ref if self._queue else None},
            )
            self._context.failed(exc)

    def _settled(self, batch: asyncio.Future[None]) -> None:
        """The flush of the settling record's state is over: finish the record, and go on with the next one.

        If the flush failed, the record stays unfinished at the head of the lane until a later flush makes its
        state durable (`_flush_again`). A lane being stopped does not try again: the record stays unfinished, its
        offset is not committed, and it comes again after a restart or rebalance (the dedup table skips it if
        its state made it to disk after all).
        """
        settling, self._settling = self._settling, None
        assert settling is not None
        error = batch.exception() if not batch.cancelled() else asyncio.CancelledError()
        if error is not None and not self._stopping:
            self._flush_again(settling, error)
            return
        if settling.holds_unsettled:
            self._context.unsettled.release()
        if settling.unblocks is not None:
            if error is None:
                self._context.blocked.settled(settling.unblocks)  # durable: also if the lane was forgotten meanwhile
            else:  # stopping: the failed flush's writes go with the next one, which the engine's commit confirms
                self._context.blocked.unblock_unconfirmed(settling.unblocks)
        if self._forgotten:
            return
        work = settling.work
        if error is not None:
            log.error(
                "a finished record could not be recorded in the dedup table; it stays unfinished",
                extra={"sink": self._context.sink.name, "order": work.order_ref, "error": repr(error)},
            )
            return
        settling.after()
        if len(self._queue) > 1:
            self._finished = self._finished or set()
            self._finished.add(work.idempotency_key)
        self._queue.popleft()
        self._on_finished(self, work)
        if self._queue and not self._stopping:
            self._start()

    def _flush_again(self, settling: Settling, error: BaseException) -> None:
        """The settling record's state could not be flushed: wait, then settle it with a later flush.

        A failed flush's writes stay in the store for the next one (`SqliteDedupStore.flush` buffers them again).
        Left unfinished instead, the record froze its partition's commits, and the key's next record restarted
        the lane at it and sent it once more. It keeps its `unsettled` place meanwhile: it is sent and not yet
        durable. A lasting failure also fails the engine's next commit, which flushes too, and with it the run.
        """
        settling.failed_flushes += 1
        wait = min(_FLUSH_RETRY * 2 ** (settling.failed_flushes - 1), self._context.backoff.cap)
        log.error(
            "a finished record could not be recorded in the dedup table; trying again",
            extra={
                "sink": self._context.sink.name,
                "order": settling.work.order_ref,
                "error": repr(error),
                "retry_in": wait,
            },
        )
        self._settling = settling
        self.task = asyncio.create_task(self._settle_later(wait), name=f"lane-{self._context.sink.name}")

    async def _settle_later(self, seconds: float) -> None:
        try:
            await self._park(seconds)
        finally:  # stopped by a drain too: the drain waits for that batch (`GroupFlush.settled`)
            self._context.batch().add_done_callback(self._settled)

    # ------------------------------------------------------------------ one record to a terminal state

    async def _deliver(self, work: Work) -> Settling:
        """Take `work` to a terminal state and put it; what to do once that state is durable."""
        context = self._context
        if work.invalid is not None:
            return await dead_letter(context, work, "invalid", "contract", Attempts(), self._park, str(work.invalid))
        if work.replay and await self._delivered_before(work):
            return already_delivered(context, work)
        if not context.blocked.may_deliver(work):
            # The order has records in the dead-letter topic, and this is not the oldest of them being replayed.
            # Its block is lifted only once the last of them is delivered (`consumers.blocks`).
            detail = "an earlier event of this order is in the dead-letter topic; replay it first"
            rule = "order-survives-dead-letters"
            return await dead_letter(context, work, "dead-lettered-predecessor", rule, Attempts(), self._park, detail)
        assert work.prepared is not None
        attempts = Attempts()
        while True:
            probe = await self._wait_for_gates(attempts)
            # A request slot is held for the HTTP exchange only, so the next request leaves while this outcome
            # is being made durable; an `unsettled` place is held until the outcome is durable (the settling
            # record gives it back). After a crash, at most those records (2 x `max_in_flight`) can have been
            # applied downstream without being recorded here, and are sent once more under the same idempotency key.
            try:
                await context.unsettled.acquire()
            except BaseException:
                if probe is not None:
                    probe.release()  # stopped while waiting for a place (a drain): the probe was never sent
                raise
            settling: Settling | None = None
            try:
                try:
                    async with context.slots:
                        sent = await self._attempt(work, attempts, probe)
                except BaseException:
                    if probe is not None:
                        probe.release()  # a half-open probe slot taken but never answered must be given back
                    raise
                if sent is None:
                    continue  # a gate closed while this lane queued for a slot or the pace: wait for it again
                outcome = sent
                decision, retry_after = self._decide(outcome, work.prepared.method)
                if probe is not None and decision.action == "pause_auth" and probe is context.circuit:
                    probe.release()  # a 401 says nothing about the system's health
                if decision.action in ("done", "duplicate"):
                    context.ramp.succeeded(self._ticket)  # before the circuit: a probe's success begins a new ramp
                    _record(context.circuit, True, probe)
                    _record(context.auth, True, probe)
                    settling = delivered(context, work, attempts, outcome, decision)
                elif decision.action == "dead_letter":
                    context.ramp.succeeded(self._ticket)
                    _record(context.circuit, True, probe)  # the system works; our data is what it refused
                    _record(context.auth, True, probe)
                    settling = await dead_letter(context, work, "rejected", decision.rule, attempts, self._park)
            finally:
                if settling is None:
                    context.unsettled.release()
                else:
                    settling.holds_unsettled = True
            if settling is not None:
                return settling
            if decision.action == "pause_auth":
                _record(context.auth, False, probe)
                context.metrics.auth_failures.labels(context.sink.name).inc()
                log.error(
                    "downstream refused our credentials; sink paused",
                    extra={
                        "sink": context.sink.name,
                        "event_id": work.prepared.event_id,
                        "order": work.order_ref,
                        "attempt": attempts.count,
                        "status": _status(outcome),
                    },
                )
                _uncount(attempts)  # our configuration, not this order: no attempt of its budget, nor its time
                continue
            settling = await self._retry_or_give_up(work, attempts, outcome, decision, retry_after, probe)
            if settling is not None:
                return settling

    async def _delivered_before(self, work: Work) -> bool:
        """True if the dedup table has the record as delivered (``done`` or ``duplicate``) by now."""
        states = await self._context.store.get_many({work.idempotency_key: work.order_ref})
        state = states.get(work.idempotency_key)
        return state is not None and state.status in ("done", "duplicate")

    async def _attempt(self, work: Work, attempts: Attempts, probe: Circuit | None) -> Reply | TransportFailure | None:
        """One HTTP attempt; the caller holds a request slot. None, and nothing sent, if a gate has opened while
        this lane queued for the slot or the pace (a paused sink, an open circuit send nothing but their probe)."""
        context = self._context
        assert work.prepared is not None
        downstream_id = None
        if work.prepared.event_type != "order.created":
            downstream_id = await context.store.downstream_id(work.order_ref)
        request = context.sink.request(work.prepared, downstream_id)
        ticket = None
        try:
            # Nothing sent yet: a stop cancels the lane while it waits here (`stop`).
            self._waiting = True
            if self._stopping:
                raise asyncio.CancelledError  # stopped while waiting: the record stays unfinished
            if probe is None and context.ramp.limit is not None:  # the circuit has just closed: a few at a time
                ticket = await context.ramp.acquire()
            # Paced inside the slot and after the ramp: a Retry-After that arrived while this lane queued still
            # holds it, and the rate spaces what the ramp lets go.
            await context.pacer.acquire()
            self._waiting = False
            if self._stopping:
                raise asyncio.CancelledError
            if probe is not None and not context.released.is_set():
                probe.release()  # held while it queued: the probe waits for the let-go like every other attempt
                return None
            if probe is None and not gates_closed(context):
                return None
            context.in_flight += 1
            now_wall = context.clock.wall()
            if attempts.first_wall is None:
                attempts.first_wall, attempts.first_mono = now_wall, context.clock.now()
            attempts.last_wall = now_wall
            attempts.count += 1
            try:
                outcome = await context.deliver(request, work.idempotency_key)
            finally:
                context.in_flight -= 1
        finally:
            self._waiting = False
            context.ramp.release(ticket)
        self._ticket = ticket
        attempts.last = outcome
        context.hot.attempt_seconds.observe(outcome.elapsed)
        context.hot.http_responses[_status_class(outcome)].inc()
        return outcome

    def _decide(self, outcome: Reply | TransportFailure, method: str) -> tuple[Decision, float | None]:
        """What to do with `outcome`, and the wait its Retry-After asks for (read once, here: an HTTP-date's wait
        shrinks as time passes) when it is an answer whose Retry-After orderbus follows."""
        context = self._context
        policy = context.sink.policy
        if not isinstance(outcome, Reply):
            return policy.decide_failure(outcome.kind), None
        decision = policy.decide(outcome.status, method)
        if decision.action in _DELIVERED and outcome.html and _taken(outcome.status, method):
            return HTML_ANSWER, None
        if outcome.status not in _TIMED_STATUSES:
            return decision, None
        wait = parse_retry_after(outcome.retry_after, wall_now=context.clock.wall(), cap=context.retry_after_cap)
        # Whatever a policy makes of a 409 (an update's or a cancel's: refused, a dead letter), one with a Retry-After
        # says the first request with this key is still being processed: its outcome is not known.
        if outcome.status == 409 and decision.action != "retry" and wait is not None:
            return IN_PROGRESS, wait  # not there yet: counted done, the order would be lost if that request fails
        return decision, wait

    async def _retry_or_give_up(
        self,
        work: Work,
        attempts: Attempts,
        outcome: Reply | TransportFailure,
        decision: Decision,
        retry_after: float | None,
        probe: Circuit | None,
    ) -> Settling | None:
        """Park the lane until the next attempt; when retries are exhausted, dead-letter the record instead.

        `retry_after` is the wait the answer's Retry-After asks for (`_decide`); `probe` is the half-open gate whose
        probe slot this attempt held, if any (see `_wait_for_gates`).
        """
        context = self._context
        _record(context.auth, True, probe)
        status = outcome.status if isinstance(outcome, Reply) else None
        if status == 429 or (status == 503 and retry_after is not None):
            # The whole sink slows down, not just this key; a 429 without a Retry-After only lowers the rate.
            # A 503 without one says nothing of a pace: it is an outage, for the circuit and the key's backoff.
            # (A 409's Retry-After is about this key's first request only: it waits alone.)
            self._hold(retry_after or 0.0, outcome.retry_after if isinstance(outcome, Reply) else None)
        if retry_after is None:
            context.last_failure = outcome
            _record(context.circuit, False, probe)
        elif probe is context.circuit:
            # The server set the pace and the pacer holds the sink: not a sign that it is unwell (a rate limiter
            # answers a whole burst with 429s, which would open the circuit for far longer than it asked). Only
            # this attempt's own probe slot is given back: another lane's probe is still out.
            context.circuit.release()
        if isinstance(outcome, TransportFailure) and outcome.certificate_refused:
            _say_certificate(context, outcome)
        assert attempts.first_mono is not None
        if context.backoff.exhausted(attempts.count, attempts.first_mono, context.clock.now()):
            return await dead_letter(context, work, "retries-exhausted", decision.rule, attempts, self._park)
        context.metrics.retries.labels(context.sink.name, _retry_reason(outcome)).inc()
        put_state(context, work, "in_flight", attempts)
        delay = context.backoff.delay(attempts.count, context.rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        log.debug(
            "attempt failed, will retry",
            extra={
                "sink": context.sink.name,
                "event_id": work.prepared.event_id if work.prepared else None,
                "order": work.order_ref,
                "attempt": attempts.count,
                "status": _status(outcome),
                "rule": decision.rule,
                "retry_in": round(delay, 3),
                **({"error": outcome.detail} if isinstance(outcome, TransportFailure) else {}),
            },
        )
        await self._park(delay)
        return None

    def _hold(self, seconds: float, asked: str | None) -> None:
        """The server set the sink's pace (`seconds`, from its Retry-After `asked` as sent). A sink without a `rate`
        is not slowed by the pacer once the hold ends (see `consumers.pacing`), so a hold that begins begins a slow
        start too (`consumers.ramp`): else every lane parked meanwhile, up to `max_in_flight`, would send the moment
        it ends, at a system that just said "wait"."""
        context = self._context
        pacer, now = context.pacer, context.clock.now()
        was_held = pacer.held_until > now
        pacer.hold(seconds)
        if was_held or pacer.held_until <= now:
            return
        # Once a hold, not per answer that extends it: a throttled burst answers every request under way so.
        said: dict[str, object] = {"sink": context.sink.name, "seconds": seconds}
        if seconds >= context.retry_after_cap:  # what it asked for, which the cap cut: 27 hours, said as 300 s
            said |= {"asked": asked, "capped_by": "retry_after_cap"}
        log.info("sink held by the downstream's Retry-After", extra=said)
        if pacer.rate is None:
            self._context.ramp.begin()

    async def _wait_for_gates(self, attempts: Attempts) -> Circuit | None:
        """Wait while the operator holds the sink, the circuit is open or the sink is paused for its credentials.

        When one is half-open, take its probe slot and return that circuit: the caller must answer it with
        `record` or `release`. Returns None when both are closed.
        """
        context = self._context
        if gates_closed(context):
            return None  # the common case, first and cheap
        while True:
            if not context.released.is_set():
                await self._held(attempts)
                continue
            gates = (context.auth, context.circuit)
            opened = [gate for gate in gates if gate.state == "open"]
            if opened:
                until = max(gate.opened_until or 0.0 for gate in opened)
                await self._park(max(until - context.clock.now(), 0.01))
                continue
            half_open = next((gate for gate in gates if gate.state == "half_open"), None)
            if half_open is None:
                return None
            if half_open.allow():
                return half_open
            await self._park(_PROBE_WAIT)

    async def _held(self, attempts: Attempts) -> None:
        """Wait until the operator lets the sink go: a wait, not a retry (not `parked`), and the time it took is
        added to the record's start, so that its `max_elapsed` counts only the time it was allowed to try."""
        context = self._context
        if self._stopping:
            raise asyncio.CancelledError
        began = context.clock.now()
        self._waiting = True  # a stop cancels it at once: nothing is being sent
        try:
            await context.released.wait()
        finally:
            self._waiting = False
            if attempts.first_mono is not None:
                attempts.first_mono += context.clock.now() - began

    async def _park(self, seconds: float) -> None:
        if self._stopping:
            raise asyncio.CancelledError
        self.parked = True
        try:
            await self._context.clock.sleep(seconds)
        finally:
            self.parked = False


_CERTIFICATE_SAY_EVERY = 60.0  # seconds


def gates_closed(context: LaneContext) -> bool:
    """Neither the operator, the credentials pause nor the circuit holds the sink: any lane may send."""
    return context.auth.state == "closed" and context.circuit.state == "closed" and context.released.is_set()


def _say_certificate(context: LaneContext, failure: TransportFailure) -> None:
    """Say at ERROR, once a minute per sink, that the downstream's certificate is refused: it is configuration,
    every attempt fails the same until it is fixed, and the retries alone would say it at DEBUG only."""
    now = context.clock.now()
    if now - context.certificate_said_at < _CERTIFICATE_SAY_EVERY:
        return
    context.certificate_said_at = now
    log.error(
        "the downstream's TLS certificate is refused: trust its CA (the sink's ca_bundle) or fix the certificate",
        extra={"sink": context.sink.name, "error": failure.detail},
    )


def _uncount(attempts: Attempts) -> None:
    """Take back the last attempt: refused for our credentials, it is not one of the record's."""
    attempts.count -= 1
    if attempts.count == 0:
        attempts.first_wall = attempts.first_mono = None


def _record(gate: Circuit, success: bool, probe: Circuit | None) -> None:
    """An attempt's outcome for `gate`; it decides a half-open gate only if the attempt held that gate's probe."""
    gate.record(success, probe=probe is gate)


def failure_text(outcome: Reply | TransportFailure | None) -> str:
    """A failed attempt in a few words: its status, or the client's words for what the connection's failure was
    ("timeout: ...", "connection: ... answer head longer than 65536 bytes")."""
    if outcome is None:
        return ""
    return f"status {outcome.status}" if isinstance(outcome, Reply) else f"{outcome.kind}: {outcome.detail}"


def _status(outcome: Reply | TransportFailure) -> int | str:
    return outcome.status if isinstance(outcome, Reply) else outcome.kind


def _retry_reason(outcome: Reply | TransportFailure) -> str:
    """Bounded: "throttled" for 429, else the status class (see `consumers.metrics.RETRY_REASONS`)."""
    if isinstance(outcome, Reply) and outcome.status == 429:
        return "throttled"
    return _status_class(outcome)


_DELIVERED: Final = ("done", "duplicate")


def _taken(status: int, method: str) -> bool:
    """Whether `status` to `method` says the system took the request as the default policy reads it (a 2xx, a
    create's 409), not as an operator's override counts it ("DELETE 404" = "duplicate": a framework's error page)."""
    return DEFAULT_POLICY.decide(status, method).action in _DELIVERED


def _status_class(outcome: Reply | TransportFailure) -> str:
    if isinstance(outcome, TransportFailure):
        return "timeout" if outcome.kind == "timeout" else "connection_error"
    return f"{outcome.status // 100}xx"
