"""`consumers.blocks.Blocks`: the chains of blocked orders, kept in step with the in-memory dedup store."""

from __future__ import annotations

from consumers.blocks import Blocks, decode_chain, encode_chain
from consumers.deadletter import Header
from consumers.dedup import MemoryDedupStore
from consumers.sink import Prepared
from consumers.work import RESEND_OF, Work


def work(
    key: str,
    *,
    replay: bool = False,
    order_ref: str = "SO-1",
    headers: tuple[Header, ...] = (),
    event_type: str | None = None,
) -> Work:
    topic = "orders.replay.crm" if replay else "orders"
    prepared = None if event_type is None else Prepared(key, event_type, order_ref, "POST", b"{}", {})
    return Work((topic, 0), 0, 0, order_ref.encode(), None, headers, prepared, None, order_ref, key, replay=replay)


async def test_only_the_oldest_dead_letter_of_a_blocked_order_may_be_delivered_and_only_from_a_replay() -> None:
    store = MemoryDedupStore()
    blocks = Blocks(store)
    assert blocks.may_deliver(work("k1"))
    blocks.dead_lettered(work("k1"))
    blocks.dead_lettered(work("k2"))
    blocks.dead_lettered(work("k2", replay=True))  # a replayed follower that followed again: on the chain once
    assert blocks.chain("SO-1") == ["k1", "k2"]
    assert not blocks.may_deliver(work("k1")), "not from the orders topic"
    assert not blocks.may_deliver(work("k2", replay=True)), "not before k1"
    assert blocks.may_deliver(work("k1", replay=True))
    assert blocks.may_deliver(work("k9", order_ref="SO-2"))
    assert await store.blocking(["SO-1"]) == {"SO-1": encode_chain(["k1", "k2"])}


async def test_a_resent_create_goes_ahead_of_the_dead_letters_and_leaves_them_on_the_chain() -> None:
    # They met the 404 of the object the system lost; replayed after the resend, they address the new one.
    blocks = Blocks(MemoryDedupStore())
    blocks.dead_lettered(work("k1"))
    resent = ((RESEND_OF, b"event-id"),)
    create = "order.created"
    assert blocks.may_deliver(work("kR", replay=True, headers=resent, event_type=create))
    assert not blocks.may_deliver(work("kR", headers=resent, event_type=create)), "only from the replay topic"
    assert not blocks.may_deliver(work("kU", replay=True, headers=resent, event_type="order.updated")), "creates only"
    assert not blocks.may_deliver(work("kR", replay=True, headers=(("orderbus.dlq.reason", b"x"),), event_type=create))
    assert not blocks.delivered(work("kR", replay=True, headers=resent, event_type=create)), "the order stays blocked"
    assert blocks.chain("SO-1") == ["k1"]


async def test_a_resent_create_dead_lettered_itself_waits_on_the_chain_and_leaves_it_when_replayed() -> None:
    blocks = Blocks(MemoryDedupStore())
    blocks.dead_lettered(work("k1"))
    resend = work("kR", replay=True, headers=((RESEND_OF, b"event-id"),), event_type="order.created")
    blocks.dead_lettered(resend)  # its POST refused, say
    assert blocks.chain("SO-1") == ["k1", "kR"]
    assert blocks.may_deliver(resend), "replayed, it goes ahead again"
    assert not blocks.delivered(resend)
    assert blocks.chain("SO-1") == ["k1"]


async def test_the_order_is_unblocked_only_once_its_last_delivery_is_durable_and_nothing_followed() -> None:
    store = MemoryDedupStore()
    blocks = Blocks(store)
    blocks.dead_lettered(work("k1"))
    await store.flush()
    assert blocks.delivered(work("k1", replay=True)), "the chain is empty: the unblock waits for its flush"
    assert not blocks.may_deliver(work("k2")), "a new record does not pass a delivery that is not durable yet"
    blocks.dead_lettered(work("k2"))  # so it follows, while the unblock is being flushed
    await store.flush()
    blocks.settled("SO-1")
    assert blocks.chain("SO-1") == ["k2"]
    assert await store.blocking(["SO-1"]) == {"SO-1": encode_chain(["k2"])}
    assert blocks.delivered(work("k2", replay=True))
    await store.flush()
    blocks.settled("SO-1")
    assert blocks.may_deliver(work("k3"))
    assert await store.blocking(["SO-1"]) == {}


async def test_a_chain_changes_durably_only_with_the_flush_of_the_deliveries_that_changed_it() -> None:
    store = MemoryDedupStore()
    blocks = Blocks(store)
    blocks.dead_lettered(work("k1"))
    blocks.dead_lettered(work("k2"))
    await store.flush()
    blocks.delivered(work("k1", replay=True))
    blocks.delivered(work("k2", replay=True))
    store.crash()  # killed before the flush of those deliveries
    restarted = Blocks(MemoryDedupStore(store.tables))
    restarted.learn(await store.blocking(["SO-1"]), restarted.epoch)
    assert restarted.chain("SO-1") == ["k1", "k2"], "both are replayed again, in order"


async def test_a_lookup_begun_before_an_unblock_does_not_block_the_order_again() -> None:
    store = MemoryDedupStore()
    blocks = Blocks(store)
    blocks.dead_lettered(work("k1"))
    await store.flush()
    since = blocks.epoch
    found = await store.blocking(["SO-1", "SO-2"])  # the engine's lookup of a fetched batch, under way
    assert blocks.delivered(work("k1", replay=True))
    await store.flush()
    blocks.settled("SO-1")
    blocks.learn({**found, "SO-2": encode_chain(["k7"])}, since)
    assert blocks.may_deliver(work("k2")), "what the lookup read of SO-1 is older than its unblock"
    assert blocks.chain("SO-2") == ["k7"]
    blocks.learn(await store.blocking(["SO-1"]), blocks.epoch)
    assert blocks.chain("SO-1") is None


def test_a_block_of_the_earlier_layout_is_a_chain_of_the_record_that_blocked_the_order() -> None:
    assert decode_chain("orderbus:crm:8c1f") == ["orderbus:crm:8c1f"]
    assert decode_chain(encode_chain(["a", "b"])) == ["a", "b"]
    blocks = Blocks(MemoryDedupStore())
    blocks.learn({"SO-1": "orderbus:crm:8c1f"}, blocks.epoch)
    assert blocks.may_deliver(work("orderbus:crm:8c1f", replay=True))
