"""Each sink's order state shared by its instances: downstream ids and blocked orders, mirrored to a topic.

A sink's dedup file (`consumers.dedup`) is one instance's. Two things in it must follow an order's partition when
it moves to another instance (a rebalance, a scale-out, a pod on a new volume):

- the **downstream id** a create returned: without it, the order's updates and cancels go by number, to another
  URL than the id the instance before used; resent under the same idempotency key (records after the last commit
  come again), a system that checks that a key comes with the same request (the IETF Idempotency-Key draft, the
  sandbox, Stripe) answers 422, a dead letter that no replay could deliver;
- the **chain** of a blocked order (`consumers.blocks`): without it, the order's later events overtake its dead
  letters, and a block left in the earlier instance's file came back with the partition after another instance
  had replayed it.

So every such write is also a record of the sink's state topic (``orders.state.<sink>``, `topics.catalogue`):
key ``id:<order number>`` with the id, or ``block:<order number>`` with the chain as JSON (a tombstone when the
order is unblocked), in the partition of the orders topic the order's records are in. The topic is compacted: it
keeps each key's last value. A flush of the dedup store (`SharedStateStore.flush`) is done only once the file's
transaction *and* the broker's acknowledgement (acks=all) are: the engine commits an offset after the flush, so a
record whose state reached neither is delivered again, as before.

Records finish on the file's flush alone (`SharedStateStore.file`, the engine's group flush): waiting for the
brokers there held finished records in the buffer, and the fetch with them (in the benchmark's CPU-bound scenario
the median of requests in flight fell from ~250 of 256 to ~100, with moments at none), and made a write per group
flush where the commit makes one per commit interval. A record finished that way comes again after a crash as a
dedup hit, which writes nothing: so every entry is also kept in the file's outbox, in the transaction that writes
its id or block, until the topic has acknowledged it. `open` takes back what a crash (or a stop with the brokers
away) left there and holds it until its partition is assigned here; then it is sent, unless the group's committed
offset has passed the record that made it: another instance delivered that record again meanwhile and wrote its
own state, which an older entry must not overwrite (or this one had sent it and died before the outbox forgot it).

When a partition is assigned, before its records are fetched (the engine pauses it first), the instance reads
that partition of the state topic up to its end (`StateTopic.read`) and writes what it finds into its file: ids,
blocks, and unblocks, the topic's word over the file's. The file also keeps how far it read each partition (after
the flush of those entries), so the next read starts there: eager rebalances assign every partition anew, and a
restart, or an old backup of the file, would otherwise read every order of the retention again. A new file starts
at the topic's beginning, and so does a read whose position is beyond the partition's end (the topic deleted and
made again; one made again that has grown past the position is not told apart, and its first entries are missed).
What the instance before wrote was acknowledged before its commits, and a revoke commits before the partition
moves, so the reader sees it. A read that fails is logged and the partition is delivered with what the file knows,
what the read took before it failed included.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, Self

from consumers.dedup import DeliveryState, StateFile
from consumers.delivery_state import Origin
from topics.errors import SharedStateError, StoreError

__all__ = ["Entry", "Fetched", "Restored", "SharedStateStore", "StateTopic", "decode_entry", "encode_entry"]

ID_PREFIX: Final = "id:"
BLOCK_PREFIX: Final = "block:"
# Entries applied to the file at a time while a partition is read: a flush each, so that the file's write buffer
# holds a bounded number of them, whatever the topic holds.
RESTORE_FLUSH_EVERY: Final = 5_000
# The group's committed offset of a partition, asked when the outbox kept entries for it (`SharedStateStore.restore`).
COMMITTED_TIMEOUT: Final = 10.0

# The group's committed offset of (topic, partition), None if none: what `restore` asks of the engine's consumer.
Committed = Callable[[str, int], Awaitable[int | None]]


@dataclass(frozen=True, slots=True)
class Entry:
    """One record of the state topic: `key` (``id:…`` or ``block:…``) in orders partition `partition`; `value`
    None is a tombstone (an unblocked order)."""

    partition: int
    key: bytes
    value: bytes | None


def encode_entry(partition: int, kind: str, order_ref: str, value: str | None) -> Entry:
    return Entry(partition, f"{kind}{order_ref}".encode(), None if value is None else value.encode())


def decode_entry(key: bytes | None, value: bytes | None) -> tuple[str, str, str | None] | None:
    """``(kind, order number, value)`` of a state record, or None for one that is not (it is skipped)."""
    if key is None:
        return None
    try:
        text = key.decode()
        value_text = None if value is None else value.decode()
    except UnicodeDecodeError:
        return None
    for kind in (ID_PREFIX, BLOCK_PREFIX):
        if text.startswith(kind) and len(text) > len(kind):
            if kind == ID_PREFIX and value_text is None:
                return None  # an id is never deleted by a tombstone: nothing to apply
            return kind, text[len(kind) :], value_text
    return None


class StateTopic(Protocol):
    """The sink's state topic: `consumers.state_topic.KafkaStateTopic`, or a fake in unit tests."""

    topic: str  # its name: a file's read positions are kept per topic

    async def write(self, entries: Sequence[Entry]) -> None:
        """Write `entries` in their order, each to its partition; return once the broker acknowledged them all,
        or raise `SharedStateError`."""
        ...

    def read(self, partitions: Iterable[int], starts: Mapping[int, int]) -> AsyncIterator[Fetched]:
        """The records of `partitions` from their beginning (or from the offset `starts` gives, when the partition
        holds it: not deleted by retention, not beyond its end) to their end now, in order, a fetched batch at a
        time, each partition's first (maybe empty) saying where its read began; `SharedStateError` if they cannot
        be read."""
        ...


@dataclass(frozen=True, slots=True)
class Fetched:
    """What a read of the state topic yields: `entries` of `partition`, in order, after which the partition has been
    read up to `read_to` (the offset of its next record; an empty `entries` may move it too: records compacted
    away, or a read that starts over at the beginning of a topic made again)."""

    partition: int
    entries: list[Entry]
    read_to: int


@dataclass(frozen=True, slots=True)
class Restored:
    """What a read of the state topic found: how many entries, and the chains of the blocked orders among them
    (None for an order it unblocked), for the engine's view of its blocks (`consumers.blocks.Blocks.restore`),
    also of a read that failed part way (`error`): those entries are in the file, and the next read begins after."""

    entries: int
    chains: Mapping[str, str | None]
    error: str | None = None  # why the read ended before the end (what it read up to then is in the file all the same)


class SharedStateStore:
    """A `DedupStore` whose downstream ids and blocks also go to the sink's state topic; see the module docstring.

    Every call but those three writes and `flush` is the file's own."""

    def __init__(self, store: StateFile, topic: StateTopic) -> None:
        self._store = store
        self._topic = topic
        self._pending: dict[bytes, Entry] = {}  # by key: the last write of a key wins, as in the file's buffer
        # By key, the last entry not yet acknowledged (pending or being written): its acknowledgement deletes the key
        # from the file's outbox, an older entry's does not.
        self._unacked: dict[bytes, Entry] = {}
        # Per partition, what the outbox kept from the process before, with the record that made each: sent once the
        # partition is assigned here, if nobody has committed that record since (`restore`).
        self._held: dict[int, list[tuple[Entry, str, int]]] = {}  # (entry, record's topic, record's offset)
        self._sending = asyncio.Lock()  # flushes hand their entries to the producer in the order they began

    @property
    def file(self) -> StateFile:
        """The file's store alone: its `flush` makes the file durable without waiting for the topic (the engine's
        group flush, which finishes records; the commit's flush is this store's own, both)."""
        return self._store

    # --- the three writes that are shared --------------------------------------------------------------------

    def put_downstream_id(self, order_ref: str, downstream_id: str, *, origin: Origin | None = None) -> None:
        self._store.put_downstream_id(order_ref, downstream_id)
        self._share(origin, ID_PREFIX, order_ref, downstream_id)

    def block_order(self, order_ref: str, reason: str, *, origin: Origin | None = None) -> None:
        self._store.block_order(order_ref, reason)
        self._share(origin, BLOCK_PREFIX, order_ref, reason)

    def unblock_order(self, order_ref: str, *, origin: Origin | None = None) -> None:
        self._store.unblock_order(order_ref)
        self._share(origin, BLOCK_PREFIX, order_ref, None)

    def _share(self, origin: Origin | None, kind: str, order_ref: str, value: str | None) -> None:
        if origin is not None:
            topic, partition, offset = origin
            entry = encode_entry(partition, kind, order_ref, value)
            self._pending[entry.key] = self._unacked[entry.key] = entry
            self._store.put_outbox((entry.key, partition, entry.value, topic, offset))

    @property
    def pending_writes(self) -> int:
        return self._store.pending_writes + len(self._pending)

    async def flush(self) -> int:
        """The file's flush and the topic's write of the entries put so far, side by side; done when both are.
        Entries whose write failed are put back for the next flush (behind none that replaced them), and the flush
        raises `StoreError`, as the file's does."""
        entries, self._pending = list(self._pending.values()), {}
        written = asyncio.gather(self._store.flush(), self._write(entries), return_exceptions=True)
        try:
            file_result, topic_result = await written
        except asyncio.CancelledError:  # the write may still be under way: its entries are sent again, harmlessly
            self._put_back(entries)
            raise
        if isinstance(topic_result, BaseException):
            self._put_back(entries)
        else:
            for entry in entries:  # out of the outbox with a later flush of the file (none of them waits for it)
                if self._unacked.get(entry.key) is entry:
                    del self._unacked[entry.key]
                    self._store.drop_outbox(entry.key)
        for result in (file_result, topic_result):
            if isinstance(result, BaseException):
                raise result
        assert isinstance(file_result, int)
        return file_result + len(entries)

    def _put_back(self, entries: list[Entry]) -> None:
        """Entries not written go with the next flush, unless a newer entry of their key was put meanwhile."""
        for entry in entries:
            if self._unacked.get(entry.key) is entry:
                self._pending.setdefault(entry.key, entry)

    async def _write(self, entries: list[Entry]) -> None:
        async with self._sending:  # also with none: a flush returns after the writes begun before it
            if entries:
                await self._topic.write(entries)

    # --- a partition assigned ----------------------------------------------------------------------------------

    async def restore(self, partitions: Iterable[int], committed: Committed | None = None) -> Restored:
        """Read `partitions` of the state topic, from where the file's last read of each ended, and write what they
        hold into the file; then how far each partition was read, once a flush has made its entries durable (every
        `RESTORE_FLUSH_EVERY` entries and at the end, also of a read that failed part way: `Restored.error`)."""
        count = 0
        chains: dict[str, str | None] = {}
        reached: dict[int, int] = {}  # per partition, the position after the entries applied so far
        topic = self._topic.topic
        error: str | None = None
        partitions = set(partitions)
        try:
            await self._take_back(partitions, committed)
            read_to = await self._store.read_to(topic)
            starts = {partition: read_to[partition] for partition in partitions if partition in read_to}
            async for fetched in self._topic.read(partitions, starts):
                for entry in fetched.entries:
                    if entry.key in self._unacked:  # this instance's own, newer: not yet on the topic, in the file
                        continue
                    if (decoded := decode_entry(entry.key, entry.value)) is None:
                        continue
                    chains.update(self._apply(*decoded))
                    count += 1
                    if count % RESTORE_FLUSH_EVERY == 0:
                        await self._keep(topic, reached)
                if fetched.read_to != read_to.get(fetched.partition):
                    reached[fetched.partition] = fetched.read_to
        except StoreError as exc:  # the topic's read, or the file's flush
            error = str(exc)
        try:
            await self._keep(topic, reached)
        except StoreError as exc:
            error = error or str(exc)
        return Restored(count, chains, error)

    async def _take_back(self, partitions: set[int], committed: Committed | None) -> None:
        """The entries the outbox kept for `partitions` from the process before: sent with the next flush (and the
        topic's older values left alone by the read), unless their record's offset has been committed since: then
        another instance delivered it again and wrote its own state (or this one had sent them, and crashed before
        the outbox forgot them), and sending them now would put an older state over a newer one."""
        for partition in sorted(partitions & self._held.keys()):
            held = self._held[partition]
            positions: dict[str, int | None] = {}
            for topic in {topic for _, topic, _ in held}:
                if committed is None:
                    break
                try:  # kept for the next assignment if the group cannot say
                    async with asyncio.timeout(COMMITTED_TIMEOUT):
                        positions[topic] = await committed(topic, partition)
                except Exception as exc:
                    raise SharedStateError(f"committed offset of {topic} [{partition}] not known: {exc!r}") from exc
            del self._held[partition]
            for entry, topic, offset in held:
                if (position := positions.get(topic)) is not None and position > offset:
                    self._store.drop_outbox(entry.key)
                else:
                    self._pending.setdefault(entry.key, entry)
                    self._unacked.setdefault(entry.key, entry)

    async def _keep(self, topic: str, reached: Mapping[int, int]) -> None:
        """Flush the entries applied so far; then, in a flush of its own, how far they reach: a position is never in
        the file before its entries (flushes run in order, and one fails once an earlier one has)."""
        await self._store.flush()
        for partition, offset in reached.items():
            self._store.put_read_to(topic, partition, offset)
        await self._store.flush()

    def _apply(self, kind: str, order_ref: str, value: str | None) -> dict[str, str | None]:
        """Write a read entry into the file; the chain it sets, if it is a block's."""
        if kind == ID_PREFIX:
            assert value is not None
            self._store.put_downstream_id(order_ref, value)
            return {}
        if value is None:
            self._store.unblock_order(order_ref)
        else:
            self._store.block_order(order_ref, value)
        return {order_ref: value}

    # --- the file's own ----------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file, and take back the entries its outbox kept: the topic had not acknowledged them when the
        process before ended (a kill -9 after the file's flush, the brokers away at a stop). They wait for their
        partition's assignment (`restore`)."""
        await self._store.open()
        for key, partition, value, topic, offset in await self._store.outbox():
            self._held.setdefault(partition, []).append((Entry(partition, key, value), topic, offset))

    async def close(self) -> None:
        """The file's close (which flushes it); entries not written to the topic by now stay in its outbox, and are
        written after the next open."""
        await self._store.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def get_many(self, keys: Mapping[str, str]) -> dict[str, DeliveryState]:
        return await self._store.get_many(keys)

    def put(self, state: DeliveryState) -> None:
        self._store.put(state)

    async def downstream_id(self, order_ref: str) -> str | None:
        return await self._store.downstream_id(order_ref)

    async def blocked_orders(self, order_refs: Sequence[str]) -> set[str]:
        return await self._store.blocked_orders(order_refs)

    async def blocking(self, order_refs: Sequence[str]) -> dict[str, str]:
        return await self._store.blocking(order_refs)

    async def prune(self, older_than: float) -> int:
        return await self._store.prune(older_than)

    async def integrity_check(self) -> str:
        return await self._store.integrity_check()
