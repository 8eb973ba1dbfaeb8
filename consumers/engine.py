"""The delivery engine of one sink: consume, keep order per key, deduplicate, deliver, retry, dead-letter, commit.

One `SinkEngine` per sink, each with its own consumer group, so a slow or broken system never holds back the
others. Its run loop is a few named steps (fetch → dispatch → backpressure → report), with commits and lag
measurements (`consumers.lag`) beside it on their own timers; the per-record work happens in *lanes*: one task per
order key with records buffered, delivering them strictly in order, retries included. Lanes of different keys run
concurrently, at most `max_in_flight` HTTP requests at a time, whatever the partition count. A failing key parks
its own lane (its next attempt time); other keys flow and the poll loop never waits.

Guarantees (see the brief's delivery invariants):
- a record is finished only in a terminal state: delivered (2xx), duplicate (already done, or a create's 409) or
  dead-lettered (written with acks=all first);
- an offset is committed only when every record before it is finished and durably recorded (`commit`);
- at most `max_buffered` records are held; beyond that, and while the circuit or an auth pause holds the sink,
  its partitions are paused — the consumer stays in its group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from aiokafka.errors import KafkaError

from consumers.backoff import Backoff
from consumers.blocks import Blocks
from consumers.circuit import Circuit
from consumers.clock import Clock
from consumers.consumer_port import ConsumerPort
from consumers.deadletter import DeadLetterWriter
from consumers.deadlines import Deadlines
from consumers.dedup import DedupStore
from consumers.delivery import Reply, TransportFailure
from consumers.expiry import Move, say_deleted
from consumers.group_flush import GroupFlush
from consumers.lag import LagMeter
from consumers.lane import Lane, LaneContext, failure_text, gates_closed
from consumers.membership import DYNAMIC, ChurnWatch
from consumers.metrics import CIRCUIT_STATES, EngineMetrics
from consumers.offsets import OffsetError, OffsetTracker
from consumers.order_state import SharedStateStore
from consumers.pacing import Pacer
from consumers.ramp import Ramp
from consumers.sink import HttpRequest, Sink
from consumers.unreadable import Skips, coordination_ended
from consumers.work import TopicPartitionKey, Work, make_work
from topics.acls import Refusals
from topics.catalogue import consumer_group
from topics.errors import BrokerError, SharedStateError, StoreError

log = logging.getLogger(__name__)

_DECODE_SLICE = 100  # records decoded between two turns of the event loop (see `_fetch`)
# Gauges are set at most this often (seconds): `_report` walks every lane, and the loop may turn per record.
_REPORT_INTERVAL = 0.1
_RESUME_AT = 0.8  # partitions paused for a full buffer resume once it is down to this share of `max_buffered`
_COMMIT_FLOOR = 0.5  # a commit's time at least, whatever its flush took of `commit_timeout`
_FETCH_SLACK = 1.0  # a fetch with no answer this long after its `fetch_wait` is cut off (see `_fetch`)
# Seconds between two fetches while the brokers refuse this sink's principal (`refused`): a grant comes in minutes.
_REFUSED_WAIT = 5.0
# At a stop, the records answered within the grace period get at least this long to be made durable.
SETTLE_FLOOR = 1.0

Deliver = Callable[[HttpRequest, str], Awaitable[Reply | TransportFailure]]
"""One HTTP attempt: (request, idempotency key) → the answer or the transport failure. Never raises."""


# A sink whose lag measurement (every `lag_interval`, 2 s) has had no answer for this many intervals has lost the
# broker; lenient enough that a loop slowed by a burst of work does not look like an outage.
SILENT_MEASUREMENTS = 5


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs (from `daemon.settings.SinkSettings`)."""

    max_in_flight: int = 256
    max_buffered: int = 1000
    commit_interval: float = 1.0
    shutdown_grace: float = 10.0
    commit_timeout: float = 10.0
    fetch_wait: float = 0.2
    lag_interval: float = 2.0
    rate: float | None = None
    burst: int | None = None
    backoff: Backoff = field(default_factory=Backoff)
    retry_after_cap: float = 300.0
    circuit_window: int = 20
    circuit_min_calls: int = 10
    circuit_failure_ratio: float = 0.5
    circuit_open_for: float = 30.0
    auth_pause: float = 30.0


class SinkEngine:
    """Delivers the orders topic to one sink. `run()` until stopped; `on_assigned`/`on_revoked` on rebalance."""

    def __init__(
        self,
        sink: Sink,
        consumer: ConsumerPort,
        deliver: Deliver,
        store: DedupStore,
        dead_letters: DeadLetterWriter,
        metrics: EngineMetrics,
        clock: Clock,
        config: EngineConfig | None = None,
        *,
        rng: random.Random | None = None,
        replay_topic: str | None = None,
        churn: ChurnWatch | None = None,
    ) -> None:
        self.sink = sink
        self.replay_topic = replay_topic
        # A dynamic member's watch (the tests' engines) never says anything: one code path for both kinds.
        self._churn = churn if churn is not None else ChurnWatch(DYNAMIC, consumer_group(sink.name), clock)
        self.config = config or EngineConfig()
        self._consumer = consumer
        self._store = store
        self._clock = clock
        self._deadlines = Deadlines(clock)  # bounds each offset commit and a drain's wait for settling records
        self._fetch_deadlines = Deadlines(clock, resolution=_FETCH_SLACK / 2)  # bounds each fetch, coarsely
        self._metrics = metrics
        self._offsets = OffsetTracker()
        self._lanes: dict[tuple[TopicPartitionKey, str], Lane] = {}
        self._buffered = 0
        self._finished = 0
        self._joined = False  # the group has given this instance an assignment, empty or not
        self._paused: set[TopicPartitionKey] = set()
        self._restoring: set[TopicPartitionKey] = set()  # paused until their order state is read (`restore`)
        self._progress = asyncio.Event()
        self._committing = asyncio.Lock()
        self._dispatching: asyncio.Task[None] | None = None
        self._in_dispatch = 0  # records of the batch being dispatched: counted against `max_buffered`
        self._moves: list[tuple[TopicPartitionKey, Move, int]] = []  # (partition, move, epoch): `_skip_moved`
        self._refusals = Refusals(  # what the brokers refuse this sink's principal: "fetch", "commit"
            log, "kafka refuses this sink's %s: %s", "kafka allows this sink's %s again", {"sink": sink.name}
        )
        self._stop = asyncio.Event()  # `run`'s
        self._epochs: dict[TopicPartitionKey, int] = {}  # per partition, how many times it was revoked
        self._next_report = 0.0
        self._throttled_reported = 0.0
        contact = (replay_topic, 0) if replay_topic is not None else None  # a partition every sink's topics have
        self._lag = LagMeter(
            consumer, self._offsets, clock, interval=self.config.lag_interval, sink=sink.name, contact=contact
        )
        self._lag_reported: set[int] = set()
        self._failure: Exception | None = None  # the first error of a lane's task (`_lane_failed`)
        # A record is finished once its state is in the file: a shared store's topic takes its entries with the
        # commit's flush, in one write per commit instead of one per group flush (`consumers.order_state`).
        self._group = GroupFlush(store.file if isinstance(store, SharedStateStore) else store)
        metrics.add_sink(sink.name)
        self._context = LaneContext(
            sink=sink,
            deliver=deliver,
            store=store,
            dead_letters=dead_letters,
            metrics=metrics,
            hot=metrics.hot(sink.name),
            clock=clock,
            backoff=self.config.backoff,
            retry_after_cap=self.config.retry_after_cap,
            pacer=Pacer(self.config.rate or 0, clock=clock, burst=self.config.burst),
            circuit=Circuit(
                clock,
                window=self.config.circuit_window,
                min_calls=self.config.circuit_min_calls,
                failure_ratio=self.config.circuit_failure_ratio,
                open_for=self.config.circuit_open_for,
                on_change=self._circuit_changed,
            ),
            auth=Circuit(
                clock,
                window=1,
                min_calls=1,
                failure_ratio=1.0,
                open_for=self.config.auth_pause,
                on_change=self._auth_changed,
            ),
            slots=asyncio.Semaphore(self.config.max_in_flight),
            unsettled=asyncio.Semaphore(2 * self.config.max_in_flight),
            rng=rng or random.Random(),
            batch=self._group.batch,
            failed=self._lane_failed,
            blocked=Blocks(store),
            ramp=Ramp(self.config.max_in_flight),
        )

    # ------------------------------------------------------------------ the run loop

    async def run(self, stop: asyncio.Event, *, max_records: int | None = None) -> None:
        """Deliver until `stop` is set (or `max_records` records are finished), then drain and commit.

        The fetch loop never waits for the broker's answers to commits and lag measurements, nor for the dedup
        table's lookups of the previous batch: those run beside it (`_every`, `_dispatching`), so a slow
        ListOffsets or a busy SQLite thread delays a commit or a gauge, never the next fetch.
        """
        self._stop = stop
        quiet = asyncio.Event()  # set at the end: the background steps finish the step under way and stop
        background = [
            asyncio.create_task(self._every(self.config.commit_interval, self.commit, quiet), name="engine-commit"),
            asyncio.create_task(self._every(self.config.lag_interval, self._lag.measure, quiet), name="engine-lag"),
        ]
        try:
            while not stop.is_set() and (max_records is None or self._finished < max_records):
                for task in background:
                    if task.done():
                        task.result()  # a commit or a measurement failed for good (a StoreError): so does the run
                self._raise_lane_failure()
                works, epochs = await self._fetch()
                await self._dispatched()  # the previous batch: records of one partition are queued in order
                self._skip_moved()  # after it: a move is past every record fetched before it
                if works:
                    dispatch = self._dispatch(works, epochs)
                    self._dispatching = asyncio.create_task(dispatch, name="engine-dispatch")
                    self._in_dispatch = len(works)
                self._backpressure()
                if self._clock.now() >= self._next_report:
                    self._next_report = self._clock.now() + _REPORT_INTERVAL
                    self._report()
            await self._dispatched()
        finally:
            # Not cancelled: a commit or a ListOffsets cut off inside aiokafka can leave its state waiting (a
            # SIGTERM once hung the stop for a minute). Each step is bounded; the sleep between steps ends at once.
            quiet.set()
            await asyncio.gather(*background, return_exceptions=True)
            if self._dispatching is not None and not self._dispatching.done():
                self._dispatching.cancel()
                await asyncio.gather(self._dispatching, return_exceptions=True)
            await self.drain(self._consumer.assignment())
        self._raise_lane_failure()  # one that failed in the final drain

    def _skip_moved(self) -> None:
        """Tell the offsets where the consumer was moved past records it will never fetch (`consumers.expiry`), so
        that the commits move past them too and a restart does not find them missing again; a partition revoked
        since is another member's. A move back before records this run has read (its log cut back under it, the
        topic made again) cannot be followed without a revoke's drain: the run fails, and the daemon's restart
        reads the partition from its start."""
        moves, self._moves = self._moves, []
        for tp, move, epoch in moves:
            if self._epochs.get(tp, 0) != epoch:
                continue  # drained since: its next owner finds (and says) what is missing
            if move.deleted:
                say_deleted(self.sink.name, tp, move)
                self._metrics.expired_records.labels(self.sink.name).inc(move.deleted)
            try:
                self._offsets.skip_to(tp, move.offset)
            except OffsetError as exc:
                raise BrokerError(
                    f"sink {self.sink.name}: {tp[0]}:{tp[1]} now begins again before what the sink has read ({exc}): "
                    "its log was cut back, or the topic deleted and made again; a restart reads it from its start"
                ) from exc

    def _raise_lane_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _lane_failed(self, error: Exception) -> None:
        """A lane's task raised (a store error, a bug): the run fails with the first such error at its next turn.

        Its record stays unfinished, so the partition's commits stop before it; the daemon stops on a failed sink,
        and the record comes again after the restart. Going on would only leave that partition frozen unseen.
        """
        if self._failure is None:
            self._failure = error
        self._progress.set()  # an idle run loop looks at once

    async def _dispatched(self) -> None:
        """Wait for the batch being dispatched, if any; its failure is the run loop's."""
        task, self._dispatching = self._dispatching, None
        if task is not None:
            await task  # it clears `_in_dispatch` itself, once its records are queued

    async def _every(self, seconds: float, step: Callable[[], Awaitable[None]], quiet: asyncio.Event) -> None:
        """Run `step` every `seconds` on the engine's clock, beside the fetch loop, until `quiet` is set."""
        while not quiet.is_set():
            await self._sleep_unless(quiet, seconds)
            if not quiet.is_set():
                await step()

    async def _sleep_unless(self, event: asyncio.Event, seconds: float) -> None:
        """Sleep `seconds` on the engine's clock, or until `event` is set."""
        pause = asyncio.ensure_future(self._clock.sleep(seconds))
        ended = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({pause, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pause.cancel()
            ended.cancel()

    async def _fetch(self) -> tuple[list[Work], dict[TopicPartitionKey, int]]:
        """The next records, and the assignment epoch of each of their partitions when they arrived."""
        room = self.config.max_buffered - self._buffered - self._in_dispatch
        if room <= 0 or self._halted() or (self._paused and room < self.config.max_buffered * (1 - _RESUME_AT)):
            # Nothing may be fetched now: wait for a lane to finish something (or a short while, to report).
            await self._idle(self.config.fetch_wait)
            return [], {}
        try:
            # aiokafka waits with no timeout while its group rebalances: if the group cannot rejoin (the
            # coordinator unreachable), an unbounded fetch never let the loop see `stop`, and a SIGTERM hung.
            epochs_before = self._epochs.copy()  # a move of a partition drained during the fetch is not ours
            with self._fetch_deadlines.within(self.config.fetch_wait + _FETCH_SLACK):
                batch = await self._consumer.getmany(timeout_ms=int(self.config.fetch_wait * 1000), max_records=room)
        except TimeoutError:
            return [], {}  # the loop looks at `stop`, then asks again
        except KafkaError as exc:
            if coordination_ended(exc):  # no fetch will ever work again: the run fails, the daemon stops
                raise BrokerError(
                    f"sink {self.sink.name}: the Kafka client's group coordination ended ({exc}); its consumer cannot "
                    "fetch any more, and a restart makes a new one (two instances under one "
                    "kafka.group_instance_id end each other's so)"
                ) from exc
            if self._refusals.note("fetch", exc):
                await self._sleep_unless(self._stop, _REFUSED_WAIT)  # a stop does not wait for the next ask
                return [], {}
            log.warning("fetch failed, retrying", extra={"sink": self.sink.name, "error": repr(exc)})
            await self._clock.sleep(self.config.fetch_wait)
            return [], {}
        self._refusals.allowed("fetch")
        self._moves.extend((tp, move, epochs_before.get(tp, 0)) for tp, move in self._consumer.moved().items())
        epochs = {tp: self._epochs.get(tp, 0) for tp in batch}
        works = []
        for tp, records in batch.items():
            for record in records:
                works.append(make_work(self.sink, tp[0], tp[1], record, replay=tp[0] == self.replay_topic))
                if len(works) % _DECODE_SLICE == 0:
                    await asyncio.sleep(0)  # a batch takes up to ~80 us a record: let the answers under way in
        self._metrics.records_consumed.labels(self.sink.name).inc(len(works))
        return works, epochs

    async def _idle(self, seconds: float) -> None:
        """Wait until a lane finishes something, or `seconds` on the engine's clock."""
        self._progress.clear()
        progress = asyncio.ensure_future(self._progress.wait())
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({progress, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            progress.cancel()
            timer.cancel()

    async def _dispatch(self, works: list[Work], epochs: Mapping[TopicPartitionKey, int]) -> None:
        """Track every record; skip those already terminal; queue the rest in their lanes.

        A partition revoked while its records were being decoded or looked up is no longer ours: its records are
        dropped here (their next owner reads them from the committed offset), never tracked or delivered.
        """
        try:
            await self._queue_batch(works, epochs)
        finally:
            self._in_dispatch = 0  # its records are in `_buffered` now (or finished, or dropped)

    async def _queue_batch(self, works: list[Work], epochs: Mapping[TopicPartitionKey, int]) -> None:
        if not works:
            return
        since = self._context.blocked.epoch
        states, blocked = await asyncio.gather(
            self._store.get_many({work.idempotency_key: work.order_ref for work in works}),
            self._store.blocking(sorted({work.order_ref for work in works})),
        )
        self._context.blocked.learn(blocked, since)
        for work in works:
            if self._epochs.get(work.tp, 0) != epochs[work.tp]:
                continue
            self._offsets.track(work.tp, work.offset)
            state = states.get(work.idempotency_key)
            # A replay asks for another try of a dead-lettered record; anything else terminal is skipped.
            retry_dead = work.replay and state is not None and state.status == "dead"
            if state is not None and state.status != "in_flight" and not retry_dead:
                # Redelivered after a crash or rebalance, or a duplicate event from upstream: already terminal.
                self._context.hot.skipped_duplicate()
                self._offsets.finish(work.tp, work.offset)
                self._finished += 1
                continue
            self._enqueue(work)

    def _enqueue(self, work: Work) -> None:
        self._buffered += 1
        lane = self._lanes.get(work.lane)
        if lane is None:
            lane = self._lanes[work.lane] = Lane(work.lane, self._context, self._on_finished)
        lane.push(work)

    def _on_finished(self, lane: Lane, work: Work) -> None:
        self._buffered -= 1
        self._finished += 1
        self._offsets.finish(work.tp, work.offset)
        if lane.empty and self._lanes.get(lane.id) is lane:
            del self._lanes[lane.id]
        self._progress.set()

    # ------------------------------------------------------------------ commits

    async def commit(self, only: Iterable[TopicPartitionKey] | None = None) -> None:
        """Commit every offset that is safe to commit.

        Step 1. Take the committable offsets: per partition, just past the contiguous prefix of finished records.
        Step 2. Flush the dedup store, so every terminal state behind those offsets is durable.
        Step 3. Commit the offsets to Kafka.
        Step 4. Remember them, so the next commit sends only what moved.
        A failure, or no answer within `commit_timeout`, leaves the offsets uncommitted; the next commit retries
        (records are redelivered at worst, and the dedup table skips them). Commits never overlap (the periodic
        one and a revoke's), so offsets reach the broker in the order they were taken.
        """
        async with self._committing:
            await self._commit(only)

    async def _commit(self, only: Iterable[TopicPartitionKey] | None) -> None:
        # Step 1.
        offsets = self._offsets.committable()
        if only is not None:
            wanted = set(only)
            offsets = {tp: offset for tp, offset in offsets.items() if tp in wanted}
        # Step 2. Unblocks that a drain's failed flush left for a later one are durable once this one is.
        unconfirmed = self._context.blocked.unconfirmed()
        flushing = self._clock.now()
        try:
            await self._store.flush()
        except SharedStateError as exc:  # the brokers did not take the flush's shared part: as a refused commit
            self._metrics.commit_failures.labels(self.sink.name).inc()
            log.warning("commit failed, will retry", extra={"sink": self.sink.name, "error": str(exc)})
            return
        self._context.blocked.confirm(unconfirmed)
        if not offsets:
            if only is None:  # nothing left anywhere: a refused commit's offsets are gone (the partitions revoked)
                self._refusals.forget("commit")
            return
        # Step 3. Bounded: aiokafka retries a commit until the group coordinator takes it, and after a broker
        # restart that once held a SIGTERM's drain past the test's limit, with nothing logged.
        # The flush and the commit share `commit_timeout`: a shared store's flush waits for the brokers too
        # (`consumers.order_state`), and a stop is sized by one commit timeout.
        left = max(self.config.commit_timeout - (self._clock.now() - flushing), _COMMIT_FLOOR)
        try:
            with self._deadlines.within(left):
                await self._consumer.commit(offsets)
        except (KafkaError, TimeoutError) as exc:
            self._metrics.commit_failures.labels(self.sink.name).inc()
            if self._refusals.note("commit", exc):
                return
            error = repr(exc) if isinstance(exc, KafkaError) else f"no answer within {left:.3g} s"
            log.warning("commit failed, will retry", extra={"sink": self.sink.name, "error": error})
            return
        self._refusals.allowed("commit")
        # Step 4.
        self._offsets.mark_committed(offsets)
        self._metrics.commits.labels(self.sink.name).inc()
        log.debug("committed", extra={"sink": self.sink.name, "offsets": {tp[1]: o for tp, o in offsets.items()}})

    # ------------------------------------------------------------------ backpressure, rebalance, drain

    def _halted(self) -> bool:
        context = self._context
        return not context.released.is_set() or context.circuit.state == "open" or context.auth.state == "open"

    def _backpressure(self) -> None:
        """Pause every assigned partition while the buffer is full or the sink is held; resume after."""
        assigned = self._consumer.assignment()
        full = self._buffered >= self.config.max_buffered
        low = self._buffered <= self.config.max_buffered * _RESUME_AT
        hold = full or self._halted() or (bool(self._paused) and not low)
        if hold:
            newly = assigned - self._paused
            if newly:
                self._consumer.pause(newly)
                self._paused |= newly
        elif self._paused:
            self._consumer.resume((self._paused & assigned) - self._restoring)
            self._paused.clear()

    async def restore(self, assigned: Iterable[TopicPartitionKey]) -> None:
        """Before the partitions just assigned are fetched: the order state the sink's state topic holds for them
        (`consumers.order_state`), when the store shares it. A read that fails is said, and the partitions are
        delivered with what this instance's file knows."""
        if not isinstance(self._store, SharedStateStore):
            return
        tps = set(assigned)
        partitions = self._partition_fields(tps)["partitions"]
        if not partitions:
            return
        # Paused before this coroutine first waits: aiokafka has assigned the partitions but fetched nothing of them
        # yet (it asks for their committed offsets only once this has begun), and fetches nothing of them until
        # they are resumed, whatever its listener's contract says of fetching after it.
        self._consumer.pause(tps)
        self._restoring = tps
        said: dict[str, object] = {"sink": self.sink.name, "partitions": partitions}
        started = self._clock.now()
        try:
            restored = await self._store.restore(partitions, self._committed)
        finally:
            self._restoring = set()
            if resumable := (tps & self._consumer.assignment()) - self._paused:  # those backpressure holds, it resumes
                self._consumer.resume(resumable)
        self._context.blocked.restore(restored.chains)  # also a failed read's: what it took is in the file
        said |= {"entries": restored.entries, "seconds": round(self._clock.now() - started, 3)}
        if restored.error is None:
            log.info("order state read", extra=said)
            return
        self._metrics.state_read_failures.labels(self.sink.name).inc()
        log.error(
            "order state not read from the state topic: updates of orders another instance created may go by "
            "number, and dead letters another instance left may not block their orders",
            extra={**said, "error": restored.error},
        )

    async def _committed(self, topic: str, partition: int) -> int | None:
        return await self._consumer.committed_offset((topic, partition))

    def on_assigned(self, assigned: Iterable[TopicPartitionKey]) -> None:
        self._joined = True
        if (contested := self._churn.assigned()) is not None:
            log.error("group membership contested", extra={"sink": self.sink.name, "error": contested})
        fields = self._partition_fields(assigned)
        log.info("partitions assigned", extra={"sink": self.sink.name, **fields})
        if self.replay_topic is not None and fields["partitions"] != fields["replay_partitions"]:
            # Partition p of both belongs together (`consumers.assignment`): a replay would reach another instance.
            log.warning(
                "replay partitions assigned apart from their orders partitions: a replayed dead letter may reach an "
                "instance that does not hold its order; run `orderbus topics apply` (a replay topic with another "
                "partition count), or let an upgrade finish (an earlier orderbus leads the group)",
                extra={"sink": self.sink.name, **fields},
            )

    async def on_revoked(self, revoked: Iterable[TopicPartitionKey]) -> None:
        """A rebalance takes partitions away: drain them the way a shutdown drains everything."""
        revoked = set(revoked)
        partitions = self._partition_fields(revoked)
        log.info("partitions revoked", extra={"sink": self.sink.name, **partitions})
        try:
            await self.drain(revoked)
        except StoreError as exc:
            # Their unfinished records come again to whoever gets the partitions; a store that stays broken fails
            # the next periodic commit, and with it the run.
            log.error(
                "revoked partitions could not be committed: the dedup table could not be flushed",
                extra={"sink": self.sink.name, **partitions, "error": str(exc)},
            )
        finally:
            self._churn.revoked()  # out of the group from here: the drain was this member's own time

    def _partition_fields(self, tps: Iterable[TopicPartitionKey]) -> dict[str, list[int]]:
        """Log fields for `tps`: the orders topic's partitions and the replay topic's apart. Both number from 0,
        so one list of numbers (``[0, 0, 1, 1, ...]``) could not say which was which."""
        tps = set(tps)
        return {
            "partitions": sorted(p for t, p in tps if t != self.replay_topic),
            "replay_partitions": sorted(p for t, p in tps if t == self.replay_topic),
        }

    async def drain(self, tps: Iterable[TopicPartitionKey]) -> None:
        """Stop `tps`' lanes, wait up to the grace period for their requests under way, commit, forget them.

        Step 1. Every lane of those partitions stops before its next attempt; parked lanes stop at once.
        Step 2. Wait at most `shutdown_grace` for the attempts under way; cancel what is left. Then wait for the
                records settling (terminal, their states being made durable) for what is left of the grace
                period, at least `SETTLE_FLOOR`: the whole stop stays within the grace period (plus `SETTLE_FLOOR` at
                most) and the commit's timeout, which systemd's TimeoutStopSec and a container's grace period are
                sized by.
        Step 3. Commit what finished (flushing the dedup store first).
        Step 4. Forget those partitions: their unfinished records are redelivered to whoever owns them next.
                Also when the commit failed (the dedup table could not be flushed): kept, their lanes and offsets
                would hold `buffered` up, and the partition assigned back would be tracked again from the start.
        """
        tps = set(tps)
        for tp in tps:
            self._epochs[tp] = self._epochs.get(tp, 0) + 1  # records fetched before now are no longer ours
        lanes = [lane for lane_id, lane in self._lanes.items() if lane_id[0] in tps]
        # Step 1.
        for lane in lanes:
            lane.stop()
        # Step 2.
        grace_ends = self._clock.now() + self.config.shutdown_grace
        tasks = [lane.task for lane in lanes if lane.task is not None and not lane.task.done()]
        if tasks:
            with contextlib.suppress(TimeoutError), self._deadlines.within(self.config.shutdown_grace):
                await asyncio.wait(tasks)  # on the engine's clock, as every other wait here
            late = [task for task in tasks if not task.done()]
            for task in late:
                task.cancel()
            if late:
                log.warning("cancelled requests still under way after the grace period", extra={"sink": self.sink.name})
                await asyncio.wait(late)
        if lanes:
            try:
                with self._deadlines.within(max(SETTLE_FLOOR, grace_ends - self._clock.now())):
                    await self._group.settled()
            except TimeoutError:
                log.warning("dedup writes still under way after the grace period", extra={"sink": self.sink.name})
        try:
            # Step 3.
            await self.commit(only=tps)
        finally:
            # Step 4.
            for lane in lanes:
                lane.forget()
                self._buffered -= lane.size
                self._lanes.pop(lane.id, None)
            self._offsets.revoke(tps)
            self._paused -= tps
            for tp in tps:
                self._lag.forget(tp)
            self._report()

    # ------------------------------------------------------------------ reporting

    def _circuit_changed(self, old: str, new: str) -> None:
        said: dict[str, object] = {"sink": self.sink.name}
        if new == "open":  # why: the attempt that tipped it (the others of its window are in the retries' metrics)
            said["last_failure"] = failure_text(self._context.last_failure)
        log.warning("circuit %s -> %s", old, new, extra=said)
        if new == "closed":
            self._context.ramp.begin()
        self._metrics.circuit.labels(self.sink.name).set(CIRCUIT_STATES.get(new, 0))

    def _auth_changed(self, old: str, new: str) -> None:
        if new == "closed":  # the credentials work again: the lanes parked behind the pause start slowly too
            # Said, so that whoever rotated the credentials sees it worked (the pause was an ERROR line).
            log.info("downstream accepts our credentials again; sink resumed", extra={"sink": self.sink.name})
            self._context.ramp.begin()

    def _report(self) -> None:
        name, metrics, context = self.sink.name, self._metrics, self._context
        metrics.buffered.labels(name).set(self._buffered)
        metrics.parked.labels(name).set(sum(1 for lane in self._lanes.values() if lane.parked))
        metrics.in_flight.labels(name).set(context.in_flight)
        metrics.rate.labels(name).set(_limit_or_zero(context.pacer.current_rate))
        metrics.auth_paused.labels(name).set(1 if context.auth.state != "closed" else 0)
        metrics.circuit.labels(name).set(CIRCUIT_STATES.get(context.circuit.state, 0))
        throttled = context.pacer.throttled_seconds
        if throttled > self._throttled_reported:
            metrics.throttled_seconds.labels(name).inc(throttled - self._throttled_reported)
            self._throttled_reported = throttled
        if context.pacer.last_retry_after is not None:
            metrics.retry_after.labels(name).set(context.pacer.last_retry_after)
        assigned = self._consumer.assignment()
        metrics.assigned_partitions.labels(name).set(len(assigned))
        metrics.unreadable.labels(name).set(len(self._consumer.unreadable()))
        # The orders topic's partitions; a replay topic's backlog shows in buffered and deliveries instead.
        orders_lag = {tp: lag for tp, lag in self._lag.lag.items() if tp[0] != self.replay_topic}
        for tp, lag in orders_lag.items():
            metrics.lag.labels(name, str(tp[1])).set(lag)
        measured = {tp[1] for tp in orders_lag}
        for partition in self._lag_reported - measured:
            metrics.forget_partition(name, partition)
        self._lag_reported = measured
        oldest = min((lane.oldest_timestamp for lane in self._lanes.values() if not lane.empty), default=None)
        age = 0.0 if oldest is None else max(0.0, self._clock.wall() - oldest / 1000)
        metrics.oldest_pending.labels(name).set(age)

    # ------------------------------------------------------------------ state, for /readyz and `orderbus status`

    @property
    def assigned(self) -> int:
        return len(self._consumer.assignment())

    @property
    def joined(self) -> bool:
        """The group has assigned this instance its partitions once, none included: with more instances than
        partitions, or during a rebalance, an instance without partitions is a member waiting for work."""
        return self._joined

    @property
    def refused(self) -> str | None:
        """What the brokers refuse this sink's principal (an ACL missing: its group, a topic), or None."""
        return self._refusals.first

    @property
    def membership_problem(self) -> str | None:
        """Why this instance's membership of the group is contested (`consumers.membership.ChurnWatch`), or None."""
        return self._churn.problem

    @property
    def buffered(self) -> int:
        return self._buffered

    @property
    def finished(self) -> int:
        return self._finished

    @property
    def circuit_state(self) -> str:
        return self._context.circuit.state

    @property
    def unreadable(self) -> Mapping[TopicPartitionKey, int]:
        """Partitions held at an offset whose records cannot be read."""
        return self._consumer.unreadable()

    @property
    def auth_paused(self) -> bool:
        return self._context.auth.state != "closed"

    def skip_unreadable(self, skips: Skips) -> None:
        """Records the client cannot read that the operator skips: dead-lettered in their place (settings, reload)."""
        self._consumer.skip_unreadable(skips)

    @property
    def held(self) -> bool:
        """Whether the operator holds the sink (`set_held`)."""
        return not self._context.released.is_set()

    def set_held(self, held: bool) -> None:
        """Hold the sink, or let it go (``sinks.<name>.paused``, at start and at a reload): while held nothing is
        fetched and no attempt starts, retries included; the requests under way finish, and the orders wait in Kafka
        (a downstream's maintenance window). Let go, the lanes start again slowly, as after an open circuit."""
        context = self._context
        if held == self.held:
            return
        self._metrics.held.labels(self.sink.name).set(1 if held else 0)
        if held:
            context.released.clear()
            log.info("sink paused by its settings: nothing is sent until it is let go", extra={"sink": self.sink.name})
        else:
            context.ramp.begin()  # before the lanes wake: the first of them already takes the ramp's turns
            context.released.set()
            log.info("sink let go by its settings", extra={"sink": self.sink.name})

    def set_rate(self, rate: float | None) -> None:
        """Live reload of the sink's rate limit (SIGHUP); the burst size is fixed until a restart."""
        self._context.pacer.set_rate(rate)

    def status(self) -> dict[str, object]:
        """What `orderbus status` shows of this sink: no personal data, no order numbers."""
        context = self._context
        return {
            "assigned_partitions": sorted(tp[1] for tp in self._consumer.assignment() if tp[0] != self.replay_topic),
            "buffered": self._buffered,
            "in_flight": context.in_flight,
            "parked": sum(1 for lane in self._lanes.values() if lane.parked),
            "circuit": context.circuit.state,
            # Requests in flight allowed while ramping up after an outage (`consumers.ramp`); the lanes of an open
            # circuit or of a credentials pause wait for the probe, whatever a ramp of the last close says.
            "ramp_limit": context.ramp.limit if gates_closed(context) else None,
            "auth_paused": self.auth_paused,
            "paused_by_settings": self.held,
            "membership": self._membership_status(),
            "rate_limit": _limit_or_zero(context.pacer.current_rate) or None,
            "held_for": max(0.0, context.pacer.held_until - self._clock.now()),
            "lag": {str(tp[1]): lag for tp, lag in sorted(self._lag.lag.items()) if tp[0] != self.replay_topic},
            "finished": self._finished,
            "unreadable": {f"{t}:{p}": offset for (t, p), offset in sorted(self._consumer.unreadable().items())},
        }

    def _membership_status(self) -> dict[str, object]:
        """How this instance is a member of the group: its name (None: dynamic) and its session, in seconds."""
        membership = self._churn.membership
        return {"group_instance_id": membership.instance_id, "session_timeout": membership.session_timeout_ms / 1000}

    @property
    def kafka_silence(self) -> float:
        """Seconds since the broker last answered this sink's lag measurement (taken every `lag_interval`)."""
        return self._lag.silence

    @property
    def kafka_silent(self) -> bool:
        """Whether the sink has lost its broker (`lost_broker`): its readiness says so, and `daemon.kafka_watch` asks
        why."""
        return lost_broker(self._lag.silence, self.config.lag_interval)


def lost_broker(silence: float, lag_interval: float) -> bool:
    """Whether a broker silent for `silence` seconds, asked every `lag_interval`, is lost: `SILENT_MEASUREMENTS`
    measurements without an answer."""
    return silence > SILENT_MEASUREMENTS * lag_interval


def _limit_or_zero(rate: float) -> float:
    """A pacer's current rate as the sink reports it: 0 for unlimited (`math.inf`), as the gauge's help says."""
    return 0.0 if math.isinf(rate) else rate
