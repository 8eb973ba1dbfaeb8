"""Publishing to Kafka for the ingest: acks=all, idempotent producer, and an honest answer about the outcome.

The idempotent producer retries a record until the broker has it; it never gives up on a record it has sent.
So a publish that outlives the request's timeout is not a failure but an *unknown yet*: `PublishPending` carries
the future, and the caller keeps its idempotency key in flight until that future resolves, so a client's retry
can never publish the order a second time.

While the broker is known to be unreachable (a publish timed out or failed, the producer never connected, or
the periodic health check found no broker), `publish` refuses at once with `BrokerUnavailable`, before anything
is handed to the producer: nothing is half-published. A background probe (a metadata request with growing
intervals) reopens the gate. The health check (a metadata request every `health_interval` while the gate is
open) is what lets an idle ingest, and /readyz, notice an outage before a client's publish times out: a broker
that refuses connections is noticed within `health_interval`. One that stops answering on open connections (frozen,
or cut off by a network partition) is noticed when the check's own request times out (`request_timeout`, 10 s), as
the publishes under way do: until then /readyz says ready and webhooks wait up to ``publish_timeout``.

It refuses so, too, until `topic_check` has passed once (the daemon could not check its topic at start): the
producer's first metadata request would have the broker create a missing topic with its own defaults (one
partition), so no producer is built before the topic is known to exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from consumers.clock import Clock, SystemClock
from consumers.deadlines import Deadlines
from consumers.kafka_close import sender_task, stop_producer
from consumers.kafka_io import guard_connection_writes, keep_metadata_synchronizer
from daemon.kafka_watch import Diagnosis
from topics.acls import Refusals
from topics.broker_diagnosis import cause
from topics.codec import EncodedRecord
from topics.errors import BrokerError, ConfigError, NotYetError, PublishError

log = logging.getLogger(__name__)

PROBE_MIN = 0.5  # seconds: the reconnect probe's first interval, doubled after each failure ...
PROBE_MAX = 5.0  # ... up to this


def _wake(woken: asyncio.Future[None], _: asyncio.Future[Any]) -> None:
    if not woken.done():  # cancelled when the publish timed out
        woken.set_result(None)


# How long a stop waits for the ingest's unacknowledged records to be flushed (`KafkaPublisher.close`).
CLOSE_GRACE: Final = 10.0
_RECORDS: Final = "records"  # the step `Refusals` keeps the ingest's refusal under


class BrokerUnavailable(BrokerError):
    """The broker is known to be unreachable; nothing was handed to the producer."""


class PublishRefused(PublishError):
    """The brokers refused the record for an authorization (an ACL missing: Write on the orders topic); nothing was
    stored. Its text is for the webhook's sender; `KafkaPublisher.refused` says which grant, for the operator."""

    def __init__(self) -> None:
        super().__init__("kafka does not let this server publish orders (its operators are told why)")


class PublishPending(PublishError):
    """The broker did not acknowledge within the timeout; the outcome will be known when `future` resolves."""

    def __init__(self, future: asyncio.Future[Published]) -> None:
        super().__init__("the broker did not acknowledge in time; the outcome is pending")
        self.future = future


@dataclass(frozen=True, slots=True)
class Published:
    """Where the broker stored a record, after acks=all."""

    topic: str
    partition: int
    offset: int


class Publisher(Protocol):
    """What the ingest needs from Kafka. `KafkaPublisher` in production, fakes in unit tests."""

    @property
    def available(self) -> bool: ...

    async def publish(self, record: EncodedRecord, *, timeout: float) -> Published: ...


class KafkaPublisher:
    """An idempotent acks=all producer for one topic, with an availability gate."""

    def __init__(
        self,
        topic: str,
        client_options: Mapping[str, Any],
        *,
        request_timeout: float = 10.0,
        health_interval: float = 2.0,
        producer_factory: Callable[..., AIOKafkaProducer] = AIOKafkaProducer,
        clock: Clock | None = None,
        topic_check: Callable[[], Awaitable[None]] | None = None,
        diagnosis: Diagnosis | None = None,
    ) -> None:
        """`producer_factory` takes `AIOKafkaProducer`'s arguments; unit tests pass a fake with its methods.
        `clock` keeps the publish timeouts (`consumers.deadlines`: one sweeper, not a timer per request) and paces
        the health check and the reconnect probe. `topic_check`, if given, must pass (raise nothing) before the
        producer is built: it raises `BrokerError` while the cluster cannot be reached, `ConfigError` while the
        topic is missing, `NotYetError` while this principal may not see it (an ACL), and is tried again with the
        reconnect probe. `diagnosis` (`daemon.kafka_watch`), if given,
        says why the broker cannot be reached once the producer's start failed (aiokafka's error says "Unable to
        bootstrap" for every cause)."""
        self._topic = topic
        self._producer_factory = producer_factory
        self._options = dict(client_options)
        self._request_timeout = request_timeout
        self._health_interval = health_interval
        self._producer: AIOKafkaProducer | None = None
        self._available = False
        self._probe: asyncio.Task[None] | None = None
        self._health: asyncio.Task[None] | None = None
        self._clock = clock if clock is not None else SystemClock()
        self._deadlines = Deadlines(self._clock)
        self._topic_check = topic_check
        self._topic_missing: str | None = None
        self._topic_hidden = False  # the brokers do not let the principal see it (an ACL), rather than no topic
        self._diagnosis = diagnosis
        self._unreachable: str | None = None
        # What the brokers refuse the ingest's principal (an ACL), from the producer's start or a record.
        self._refusals = Refusals(log, "kafka refuses the ingest's %s: %s", "kafka stores the ingest's %s again")

    @property
    def available(self) -> bool:
        return self._available

    @property
    def unreachable(self) -> str | None:
        """Why Kafka cannot be reached, while it cannot and the cause is known: the credentials, a certificate, the
        protocol, a refused connection (`diagnosis`); None while it can, or nobody could say."""
        return None if self._available else self._unreachable

    @property
    def refused(self) -> str | None:
        """What the brokers refuse the ingest's principal (`topics.acls.refusal`), from the last publish or start;
        None once a record is stored again."""
        return self._refusals.first

    @property
    def topic_missing(self) -> str | None:
        """Why the ingest does not publish although the broker answers: its topic is missing (`topic_check`)."""
        return self._topic_missing

    async def start(self) -> None:
        """Start the producer now if the broker answers, else keep trying in the background."""
        self._health = asyncio.create_task(self._check_health(), name="publisher-health")
        try:
            await self._connect()
            self._available = True
        except (KafkaError, BrokerError) as exc:
            why = await self._note_unreachable(exc)
            if self.refused is not None:
                log.warning("kafka refuses the ingest at start, it answers 503 until it is let: %s", why)
            else:
                log.warning("kafka unreachable at start, ingest answers 503 until it is back: %s", why)
            self._probe = asyncio.create_task(self._reconnect(), name="publisher-connect")
        except (ConfigError, NotYetError):  # said by `_check_topic`
            self._probe = asyncio.create_task(self._reconnect(), name="publisher-connect")

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Flush what is pending for at most `grace` seconds, then close.

        With the broker down an idempotent producer would wait forever; after `grace` its sender is cancelled.
        Records still unacknowledged then keep their idempotency keys in flight, and a client's retry after a
        restart re-claims and republishes them under the same event id, which consumers deduplicate.
        """
        for task in (self._health, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._producer is None:
            return
        await stop_producer(self._producer, grace, "ingest")

    async def publish(self, record: EncodedRecord, *, timeout: float) -> Published:
        """Send `record` and wait for acks=all, both steps together at most `timeout` seconds.

        Raises `BrokerUnavailable` (nothing sent), `PublishPending` (sent, outcome later) or `PublishError`
        (the broker refused it, e.g. the record is too large).
        """
        if not self._available or self._producer is None:
            raise BrokerUnavailable(self._unavailable())
        # One deadline over both steps, kept by the sweeper of `consumers.deadlines` (up to its resolution late):
        # no wait_for per step (on Python 3.11 it wraps its awaitable in a task: ~5 % of the ingest's CPU, py-spy),
        # and no asyncio.timeout with its timer per request (~4 us). The wait is on a future of our own that the
        # producer's outcome wakes, so a timeout cancels only that one and the outcome stays for `PublishPending`;
        # the outcome is read in place (no second future, no shield).
        sent: asyncio.Future[Any] | None = None
        try:
            with self._deadlines.within(timeout):
                try:
                    sent = await self._producer.send(
                        self._topic, value=record.value, key=record.key, headers=record.headers
                    )
                except KafkaError as exc:  # the topic's metadata refused included (TopicAuthorizationFailed)
                    if self._refusals.note(_RECORDS, exc):
                        raise PublishRefused from exc
                    raise PublishError(f"kafka refused the record: {exc!r}") from exc
                if not sent.done():
                    woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    sent.add_done_callback(functools.partial(_wake, woken))
                    await woken
        except TimeoutError:
            if sent is None:
                # send() itself waits only for metadata or buffer space; nothing was appended.
                self._mark_unavailable("metadata or buffer wait timed out")
                raise BrokerUnavailable("kafka did not answer in time") from None
            self._mark_unavailable("publish not acknowledged in time")
            outcome: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
            sent.add_done_callback(functools.partial(self._resolve, outcome))
            raise PublishPending(outcome) from None
        return self._published(sent)

    def _published(self, sent: asyncio.Future[Any]) -> Published:
        """The producer's outcome of a record as ours: where it landed, or `PublishError`."""
        exc = sent.exception()  # CancelledError if the producer was closed: the outcome stays unknown
        if exc is not None:
            # Not only KafkaError: a producer whose sender task died fails every pending record with that task's
            # error. Either way the record may not be on the topic, and the caller must be free to publish it again.
            if self._refusals.note(_RECORDS, exc):
                raise PublishRefused from exc
            raise PublishError(f"kafka did not store the record: {exc!r}") from exc
        self._refusals.allowed(_RECORDS)
        if not self._available:
            # A late publish was acknowledged: the broker is back, before the probe's next (backed-off) try.
            self._reopen()
        metadata = sent.result()
        return Published(metadata.topic, metadata.partition, metadata.offset)

    def _resolve(self, outcome: asyncio.Future[Published], sent: asyncio.Future[Any]) -> None:
        """Settle a pending publish's `outcome` once the producer knows it."""
        if outcome.done():  # pragma: no cover - nothing else resolves it
            return
        if sent.cancelled():  # the producer was closed: the outcome stays unknown
            outcome.cancel()
            return
        try:
            outcome.set_result(self._published(sent))
        except Exception as exc:  # handed on to whoever awaits the outcome
            outcome.set_exception(exc)

    async def _connect(self) -> None:
        await self._check_topic()
        guard_connection_writes()
        producer = self._producer_factory(
            **self._options,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=int(self._request_timeout * 1000),
            linger_ms=2,
        )
        try:
            await producer.start()
            # Learn the topic's partitions now, so the first request does not wait for metadata.
            await producer.partitions_for(self._topic)
        except BaseException:
            await producer.stop()
            raise
        keep_metadata_synchronizer(producer.client, "ingest")  # its death would hold every send after a reset
        self._producer = producer

    async def _check_topic(self) -> None:
        """Run `topic_check` until it passes once; a missing topic is said at ERROR once, not at every probe."""
        if self._topic_check is None:
            return
        try:
            await self._topic_check()
        except BrokerError:
            self._topic_missing = None  # not known while the broker does not answer: /readyz says unreachable
            raise
        except (ConfigError, NotYetError) as exc:  # missing, or one this principal may not see
            hidden = isinstance(exc, NotYetError)
            if self._topic_missing != str(exc):
                until = "it is granted its topic" if hidden else "its topic exists"
                log.error("the ingest answers 503 until %s: %s", until, exc)
            self._topic_missing, self._topic_hidden = str(exc), hidden
            raise
        if self._topic_missing is not None:
            log.info("the ingest's topic exists now")
        self._topic_check = self._topic_missing = None

    def _unavailable(self) -> str:
        """Why a publish is refused while Kafka is not available: the 503's detail."""
        if self._topic_missing is None:
            return "kafka is unreachable"
        return (
            "kafka does not let this daemon see the orders topic"
            if self._topic_hidden
            else ("the orders topic does not exist yet")
        )

    def _mark_unavailable(self, why: str) -> None:
        if self._available:
            log.warning("kafka marked unavailable: %s", why)
            self._unreachable = None  # an earlier outage's cause is not this one's
            if self._diagnosis is not None:
                self._diagnosis.forget()
        self._available = False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._reconnect(), name="publisher-probe")

    def _reopen(self) -> None:
        if not self._available:
            log.info("kafka reachable again, ingest accepts orders")
        self._available = True
        self._refusals.forget(_RECORDS)  # a producer refused at start: let now (a record refused says so again)
        if self._probe is not None and self._probe is not asyncio.current_task():
            self._probe.cancel()

    async def _check_health(self) -> None:
        while True:
            await self._clock.sleep(self._health_interval)
            if not self._available or self._producer is None:
                continue  # the reconnect probe owns the gate until the broker answers again
            if await self._dropped_if_dead():
                continue  # the probe it started builds a new producer
            try:
                await asyncio.wait_for(_ask_for_metadata(self._producer), self._request_timeout)
            except (KafkaError, TimeoutError) as exc:
                self._mark_unavailable(f"health check: {exc!r}")

    async def _reconnect(self) -> None:
        delay = PROBE_MIN
        while True:
            await self._clock.sleep(delay)
            try:
                await self._dropped_if_dead()
                if self._producer is None:
                    await self._connect()
                else:
                    await _ask_for_metadata(self._producer)
                self._reopen()
                return
            except (ConfigError, NotYetError):  # a topic missing or hidden: said by `_check_topic`
                delay = min(delay * 2, PROBE_MAX)
            except (KafkaError, BrokerError) as exc:
                said = self._unreachable
                if (why := await self._note_unreachable(exc)) != said:  # a new cause: a password fixed, a new one
                    log.warning("kafka still unreachable: %s", why)
                else:
                    log.debug("kafka still unreachable: %s", why)
                delay = min(delay * 2, PROBE_MAX)

    async def _note_unreachable(self, exc: KafkaError | BrokerError) -> str:
        """Keep, for `unreachable`, and return why the broker could not be reached: `exc`, or for a failed bootstrap
        what `diagnosis` says. A `BrokerError` of the topic check carries it already (`topics.admin`). A refusal
        (an ACL missing) is kept as `refused` too."""
        if self._refusals.note(_RECORDS, exc) and (refused := self.refused) is not None:
            why = refused
        else:
            why = str(exc) if isinstance(exc, BrokerError) else await cause(exc, self._diagnosis)
        self._unreachable = why
        return why

    async def _dropped_if_dead(self) -> bool:
        """Close and forget a producer whose sender task has died; True if it had.

        aiokafka's sender ends only on an error it does not expect (uvloop's RuntimeError on a write to a reset
        connection was one, aio-libs/aiokafka#1038, now made a connection error by `guard_connection_writes`). The
        producer then fails every later record with that error, for good, while its metadata requests still
        succeed: without this, the ingest would answer 503 to every order, and /readyz say ready, until a restart.
        The reconnect probe builds a new producer.
        """
        producer = self._producer
        if producer is None or (error := _sender_failure(producer)) is None:
            return False
        log.error("kafka producer's sender died, replacing the producer: %r", error)
        self._producer = None
        self._mark_unavailable("the producer's sender died")
        try:
            await asyncio.wait_for(producer.stop(), self._request_timeout)  # its records were failed already
        except Exception as exc:  # the producer is gone either way
            log.warning("kafka producer with a dead sender did not close cleanly: %r", exc)
        return True


def _sender_failure(producer: AIOKafkaProducer) -> BaseException | None:
    """Why `producer`'s sender task ended, or None while it runs (or was cancelled by `stop`)."""
    task = sender_task(producer)
    if task is None or not task.done() or task.cancelled():
        return None
    return task.exception() or RuntimeError("the sender task returned")


async def _ask_for_metadata(producer: AIOKafkaProducer) -> None:
    """A metadata request for the producer's topic: a broker answers, or `KafkaConnectionError`.

    The producer's own metadata update (its client's topics only), not a fetch of the whole cluster's: on a cluster
    of thousands of topics that one, every `health_interval`, cost the broker and the ingest's event loop more the
    more topics there were (1.4 % of the ingest's CPU under load against a test broker of a few hundred). It also
    refreshes the producer's view of the partition leaders. The update is made by the client's metadata task; should
    that task die (uvloop's RuntimeError on a reset connection did, aio-libs/aiokafka#1038, before
    `guard_connection_writes`), `keep_metadata_synchronizer` restarts it and the new task makes the update.
    """
    if not await producer.client.force_metadata_update():
        raise KafkaConnectionError("no broker answered a metadata request")
