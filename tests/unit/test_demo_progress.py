"""The demo's reading of the sinks' progress when the broker cannot tell a group's committed offsets yet.

aiokafka's own `list_consumer_group_offsets` runs here; only the broker's OffsetFetch answers are made up, as a
broker sends them (v3) while its group coordinator loads the groups after a start: the group-level error
COORDINATOR_LOAD_IN_PROGRESS and no partition at all.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from aiokafka import TopicPartition
from aiokafka.protocol.commit import OffsetFetchResponse_v3

from daemon import demo as demo_module
from daemon.demo import _OffsetsUnknown, _Progress
from daemon.demo_settings import DemoOptions, demo_layout
from topics.errors import BrokerError

COORDINATOR_LOAD_IN_PROGRESS = 14
TOPIC = "orders"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
ENDS = {P0: 10, P1: 4}
# Committed offsets per group as the broker stores them; -1: nothing committed on that partition.
COMMITTED = {"orderbus-crm": {0: 10, 1: 4}, "orderbus-accounting": {0: 7, 1: -1}}


class Broker:
    """OffsetFetch answers: `loading` more of them without the offsets, then each group's committed offsets."""

    def __init__(self, loading: int) -> None:
        self.loading = loading
        self.asked: list[str] = []

    async def find_coordinator(self, group: str) -> int:
        return 1

    async def send(self, request: object, node: int) -> OffsetFetchResponse_v3:
        group: str = request._consumer_group  # type: ignore[attr-defined]
        self.asked.append(group)
        if self.loading:
            self.loading -= 1
            return OffsetFetchResponse_v3(0, [], COORDINATOR_LOAD_IN_PROGRESS)
        partitions = [(p, offset, "", 0) for p, offset in COMMITTED[group].items()]
        return OffsetFetchResponse_v3(0, [(TOPIC, partitions)], 0)


class Ends:
    async def end_offsets(self, partitions: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        return {tp: ENDS[tp] for tp in partitions}


async def progress_on(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> _Progress:
    settings = demo_layout(DemoOptions(), env={}).settings
    progress = _Progress(settings, ["crm", "accounting"])
    await progress.__aexit__()  # its clients never connect: the broker's answers are made up below
    monkeypatch.setattr(progress, "_groups", {"crm": "orderbus-crm", "accounting": "orderbus-accounting"})
    monkeypatch.setattr(progress, "_partitions", [P0, P1])
    monkeypatch.setattr(progress, "_consumer", Ends())
    monkeypatch.setattr(progress._admin, "find_coordinator", broker.find_coordinator)
    monkeypatch.setattr(progress._admin, "_send_request", broker.send)
    return progress


async def test_offsets_the_broker_did_not_tell_are_unknown_not_nothing_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: right after the broker's start, the demo said it "skipped the records the last run left
    # undelivered: crm 4297, accounting 4297, ..." (the whole topic), the last run having left 0.
    progress = await progress_on(Broker(loading=1), monkeypatch)
    commits: list[str] = []

    async def commit(group: str, offsets: Mapping[TopicPartition, int]) -> None:
        commits.append(group)

    monkeypatch.setattr(progress, "_commit", commit)
    with pytest.raises(_OffsetsUnknown, match="orderbus-crm's committed offsets") as raised:
        await progress.skip_to_end()
    assert isinstance(raised.value, BrokerError), "`_skip_leftovers` asks again on a BrokerError"
    assert commits == []
    assert await progress.skip_to_end() == {"crm": 0, "accounting": 7}  # -1 on P1: nothing committed there
    assert commits == ["orderbus-accounting"]


async def test_waiting_for_the_sinks_asks_again_while_the_offsets_are_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_module, "_CATCH_UP_POLL", 0.0)
    broker = Broker(loading=2)
    progress = await progress_on(broker, monkeypatch)
    monkeypatch.setitem(COMMITTED, "orderbus-accounting", {0: 10, 1: 4})
    await progress.wait_done(timeout=60)
    assert broker.asked == ["orderbus-crm", "orderbus-crm", "orderbus-crm", "orderbus-accounting"]
    assert await progress.unfinished() == {"crm": 0, "accounting": 0}
