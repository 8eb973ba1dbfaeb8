"""Orders blocked by dead letters (brief, invariant 8): per order, its records in the dead-letter topic, in order.

Once one of an order's records is dead-lettered, the order is *blocked*: its later records follow it to the
dead-letter topic, so that a replay re-applies them in their original order. An order's *chain* is the idempotency
keys of its records that are in the dead-letter topic and not yet delivered, oldest first. While the order is
blocked, only its chain's head may be delivered, and only from a replay; anything else of the order follows the
dead letters (`may_deliver`). Delivering the head takes it off the chain; the order is unblocked once the chain is
empty and that is durable. So a replay of only the record that blocked the order (``--reason rejected``) leaves it
blocked until the records that followed are replayed too, and an event arriving while a replay is under way
(retried, or queued behind the head) follows it to the dead-letter topic instead of passing it.

One exception: a create that `orderbus reconcile --resend` sent through the replay topic for an order the system
lost (`consumers.work.Work.resend`) goes ahead of the chain. The chain's records failed against the object the
system lost (their 404s); the resend makes a new one, and the chain, replayed after it, addresses that. It stays
on the chain only if it is dead-lettered itself (after the records before it).

An ``invalid`` dead letter (a record that cannot be read: not JSON, not the contract) blocks nothing and goes on no
chain: replayed unchanged, it fails as invalid again, so as a chain's head it would send every later event of the
order to the dead-letter topic for good; and its order number is only the record key, which nothing vouches for.
The order's later events are delivered; the unreadable one waits in the dead-letter topic for the operator. One
that a version before this rule put on a chain leaves it when it is replayed (`consumers.terminal`).

`Blocks` is the sink's view, shared by its lanes; every change is written to the dedup store (`block_order` with
the chain, or `unblock_order`) in the same write buffer as the record's state, so both are durable in one
flush. A chain is stored as a JSON list of keys; a row of the earlier layout holds one bare key (the record that
blocked the order), read as a chain of that key alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from consumers.dedup import DedupStore
from consumers.work import Work

__all__ = ["Blocks", "decode_chain", "encode_chain"]


def encode_chain(keys: list[str]) -> str:
    return json.dumps(keys, separators=(",", ":"))


def decode_chain(value: str) -> list[str]:
    if value.startswith("["):
        keys = json.loads(value)
        if isinstance(keys, list) and all(isinstance(key, str) for key in keys):
            return keys
    return [value]  # the earlier layout: the key of the record that blocked the order


class Blocks:
    """The blocked orders of one sink, their chains, and the writes that keep the dedup store in step.

    An entry with an empty chain is an order whose last dead letter was delivered, with the unblock not yet
    durable: it still counts as blocked (a new record follows rather than overtake a delivery that a crash could
    undo), and `settled` removes it once the flush is done.
    """

    def __init__(self, store: DedupStore) -> None:
        self._store = store
        self._chains: dict[str, list[str]] = {}
        # Orders unblocked during a store lookup, with the value of `epoch` when they were: what that lookup read
        # of them is older than this process's view (see `learn`).
        self.epoch = 0
        self._released: dict[str, int] = {}
        # Orders whose unblock was in a flush that failed while their lane stopped (a drain): the store writes it
        # with its next flush, which `confirm` is told of; no lane is left to call `settled`.
        self._unconfirmed: set[str] = set()

    def chain(self, order_ref: str) -> list[str] | None:
        """The order's chain (a copy), or None if it is not blocked."""
        chain = self._chains.get(order_ref)
        return None if chain is None else list(chain)

    def learn(self, found: Mapping[str, str], since: int) -> None:
        """Take the blocks the store returned (`DedupStore.blocking`) for a lookup begun when `epoch` was `since`.

        What this process has changed is newer than what the store said: an order known here keeps its chain,
        and an order unblocked since the lookup began stays unblocked.
        """
        for order_ref, value in found.items():
            if order_ref not in self._chains and self._released.get(order_ref, -1) <= since:
                self._chains[order_ref] = decode_chain(value)
        self._released = {ref: at for ref, at in self._released.items() if at > since}

    def restore(self, chains: Mapping[str, str | None]) -> None:
        """Take the chains the sink's state topic holds for partitions just assigned (`consumers.order_state`; None
        for an order it unblocked): its word over this view's, which may date from before another instance held
        those partitions and replayed their dead letters. No lane of theirs runs then (a rebalance drained them)."""
        for order_ref, value in chains.items():
            if value is not None:
                self._chains[order_ref] = decode_chain(value)
            elif self._chains.pop(order_ref, None) is not None:
                self.epoch += 1  # a lookup begun before must not bring it back (`learn`)
                self._released[order_ref] = self.epoch

    def may_deliver(self, work: Work) -> bool:
        """False if `work` must follow its order's dead letters to the dead-letter topic. A resent create
        (`consumers.work.RESEND_OF`) goes ahead of them: they failed against the object it replaces (a 404 from a
        system that lost the order), and replayed after it they address the new one."""
        chain = self._chains.get(work.order_ref)
        return chain is None or work.resend or (work.replay and bool(chain) and chain[0] == work.idempotency_key)

    def dead_lettered(self, work: Work) -> None:
        """`work` went to the dead-letter topic: its order is blocked, with `work` on its chain (once)."""
        chain = self._chains.setdefault(work.order_ref, [])
        if work.idempotency_key not in chain:
            chain.append(work.idempotency_key)
            self._store.block_order(work.order_ref, encode_chain(chain), origin=work.origin)

    def delivered(self, work: Work) -> bool:
        """`work` was delivered: take it off its order's chain. True if that emptied the chain: call `settled`
        once the record's state (and with it the unblock) is durable."""
        chain = self._chains.get(work.order_ref)
        if chain is None or work.idempotency_key not in chain:
            return False
        chain.remove(work.idempotency_key)
        if chain:
            self._store.block_order(work.order_ref, encode_chain(chain), origin=work.origin)
            return False
        self._store.unblock_order(work.order_ref, origin=work.origin)
        return True

    def unblock_unconfirmed(self, order_ref: str) -> None:
        """The flush carrying `order_ref`'s unblock failed, and its lane stopped: `confirm` settles it later."""
        self._unconfirmed.add(order_ref)

    def unconfirmed(self) -> set[str]:
        """Orders whose unblock waits for a flush (a copy: take it before the flush begins)."""
        return set(self._unconfirmed)

    def confirm(self, orders: set[str]) -> None:
        """A flush begun after `orders` were taken from `unconfirmed` succeeded: their unblocks are durable."""
        for order_ref in orders:
            self._unconfirmed.discard(order_ref)
            self.settled(order_ref)

    def settled(self, order_ref: str) -> None:
        """The unblock written by `delivered` is durable: the order is no longer blocked, unless a record
        followed meanwhile."""
        if self._chains.get(order_ref) == []:
            del self._chains[order_ref]
            self.epoch += 1
            self._released[order_ref] = self.epoch
