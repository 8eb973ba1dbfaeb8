"""`MemoryDedupStore`: the in-memory twin of `consumers.dedup.SqliteDedupStore` for unit tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from consumers.delivery_state import DeliveryState, Origin, OutboxEntry, WriteBuffer

__all__ = ["MemoryDedupStore", "MemoryTables"]


@dataclass(slots=True)
class MemoryTables:
    """The "file" of a `MemoryDedupStore`: what a flush made durable. Share one between two stores to
    model a restart (the second store sees only what the first flushed)."""

    deliveries: dict[str, DeliveryState] = field(default_factory=dict)
    downstream_ids: dict[str, str] = field(default_factory=dict)
    blocked_orders: dict[str, str] = field(default_factory=dict)
    read_to: dict[tuple[str, int], int] = field(default_factory=dict)
    outbox: dict[bytes, OutboxEntry] = field(default_factory=dict)


class MemoryDedupStore:
    """The in-memory twin of `SqliteDedupStore` for unit tests: the same answers, and a `crash()`.

    Every method runs without awaiting anything, so each is atomic on the event loop without a lock. It needs
    no `open` (it has no file), but supports the same lifecycle; `close` flushes.
    """

    def __init__(self, tables: MemoryTables | None = None) -> None:
        self.tables = MemoryTables() if tables is None else tables
        self._buffer = WriteBuffer()

    def crash(self) -> None:
        """Drop every unflushed write, as a killed process would; the flushed tables stay."""
        self._buffer = WriteBuffer()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        await self.flush()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def put(self, state: DeliveryState) -> None:
        self._buffer.states[state.key] = state

    def put_downstream_id(self, order_ref: str, downstream_id: str, *, origin: Origin | None = None) -> None:
        self._buffer.downstream_ids[order_ref] = downstream_id

    def block_order(self, order_ref: str, reason: str, *, origin: Origin | None = None) -> None:
        self._buffer.blocks[order_ref] = reason

    def unblock_order(self, order_ref: str, *, origin: Origin | None = None) -> None:
        self._buffer.blocks[order_ref] = None

    def put_read_to(self, topic: str, partition: int, offset: int) -> None:
        self._buffer.read_to[topic, partition] = offset

    def put_outbox(self, entry: OutboxEntry) -> None:
        self._buffer.outbox[entry[0]] = entry

    def drop_outbox(self, key: bytes) -> None:
        self._buffer.outbox.pop(key, None)
        self._buffer.sent.add(key)

    async def outbox(self) -> list[OutboxEntry]:
        return list(self.tables.outbox.values())

    @property
    def pending_writes(self) -> int:
        return len(self._buffer)

    async def flush(self) -> int:
        written = len(self._buffer)
        self.tables.deliveries.update(self._buffer.states)
        self.tables.downstream_ids.update(self._buffer.downstream_ids)
        self.tables.read_to.update(self._buffer.read_to)
        for key in self._buffer.sent:
            self.tables.outbox.pop(key, None)
        self.tables.outbox.update(self._buffer.outbox)
        for order_ref, reason in self._buffer.blocks.items():
            if reason is None:
                self.tables.blocked_orders.pop(order_ref, None)
            else:
                self.tables.blocked_orders[order_ref] = reason
        self._buffer = WriteBuffer()
        return written

    async def get_many(self, keys: Mapping[str, str]) -> dict[str, DeliveryState]:
        found: dict[str, DeliveryState] = {}
        for key, order_ref in keys.items():
            state = self._buffer.states.get(key) or self.tables.deliveries.get(key)
            if state is not None and state.order_ref == order_ref:
                found[key] = state
        return found

    async def downstream_id(self, order_ref: str) -> str | None:
        if order_ref in self._buffer.downstream_ids:
            return self._buffer.downstream_ids[order_ref]
        return self.tables.downstream_ids.get(order_ref)

    async def read_to(self, topic: str) -> dict[int, int]:
        merged = {**self.tables.read_to, **self._buffer.read_to}
        return {partition: offset for (name, partition), offset in merged.items() if name == topic}

    async def blocked_orders(self, order_refs: Sequence[str]) -> set[str]:
        blocked: set[str] = set()
        for order_ref in order_refs:
            decided = self._buffer.blocked(order_ref)
            if decided or (decided is None and order_ref in self.tables.blocked_orders):
                blocked.add(order_ref)
        return blocked

    async def blocking(self, order_refs: Sequence[str]) -> dict[str, str]:
        result: dict[str, str] = {}
        for order_ref in order_refs:
            if order_ref in self._buffer.blocks:
                reason = self._buffer.blocks[order_ref]
                if reason is not None:
                    result[order_ref] = reason
            elif order_ref in self.tables.blocked_orders:
                result[order_ref] = self.tables.blocked_orders[order_ref]
        return result

    async def prune(self, older_than: float) -> int:
        await self.flush()
        deliveries = self.tables.deliveries
        old = [k for k, s in deliveries.items() if s.status != "in_flight" and s.updated_at < older_than]
        for key in old:
            del deliveries[key]
        live_orders = {s.order_ref for s in deliveries.values()} | set(self.tables.blocked_orders)
        for order_ref in [ref for ref in self.tables.downstream_ids if ref not in live_orders]:
            del self.tables.downstream_ids[order_ref]
        return len(old)

    async def integrity_check(self) -> str:
        return "ok"
