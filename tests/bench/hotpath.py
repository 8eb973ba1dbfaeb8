"""The delivery hot path in one process, for profiling: CPU per delivery of the three real engines.

Real parts: a local Kafka broker, three sandbox processes at 0 ms latency, SQLite dedup files, aiohttp. The
engines run in this process (not the daemon as a child) so that cProfile or py-spy see only them::

    .venv/bin/python tests/bench/hotpath.py --orders 20000 [--profile out.pstats] [--in-flight 256]

It prints deliveries per second and the CPU time of this process per delivery; the figure is for comparing
two versions of the code on one machine, side by side, not a target (`make bench` measures those).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import random
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from consumers.deadletter import DeadLetter
from consumers.engine import EngineConfig, SinkEngine
from consumers.kafka_io import dead_letter_producer
from consumers.metrics import EngineMetrics
from consumers.runner import HttpConfig, open_sink
from consumers.state_topic import KafkaStateTopic
from daemon import kafka_local
from daemon.lifecycle import tune_runtime
from daemon.sandbox import start_sandbox_process
from daemon.settings import SinkSettings
from daemon.sinks import build_sink
from topics.admin import apply_catalogue
from topics.catalogue import SINKS, TopicLayout, catalogue, orders_topic, state_topic
from topics.codec import encode
from topics.samples import sample_event


class DeadLetters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def write(self, letter: DeadLetter) -> None:
        self.letters.append(letter)


async def produce(bootstrap: str, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=256 * 1024)
    await producer.start()
    try:
        rng = random.Random(7)
        sends = []
        for i in range(count):
            record = encode(sample_event(rng, order_number=f"HP-{i:07d}"))
            sends.append(await producer.send(topic, value=record.value, key=record.key, headers=record.headers))
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def deliver_all(
    bootstrap: str,
    prefix: str,
    urls: Mapping[str, str],
    state: Path,
    count: int,
    window: int,
    watching: bool,
    shared: bool,
) -> float:
    metrics = EngineMetrics(CollectorRegistry())
    stop = asyncio.Event()
    options = {"bootstrap_servers": bootstrap}
    async with contextlib.AsyncExitStack() as stack:
        producer = dead_letter_producer(options)  # as the daemon's sinks share theirs
        await producer.start()
        stack.push_async_callback(producer.stop)
        engines = []
        for name in SINKS:
            engine = await stack.enter_async_context(
                open_sink(
                    build_sink(name, SinkSettings(base_url=urls[name])),
                    client_options={"bootstrap_servers": bootstrap},
                    topic=orders_topic(prefix),
                    prefix=prefix,
                    dedup_path=state / f"{name}.sqlite",
                    dead_letters=DeadLetters(),
                    metrics=metrics,
                    config=EngineConfig(max_in_flight=window, max_buffered=max(1000, 4 * window)),
                    http=HttpConfig(timeout=10.0),
                    state=KafkaStateTopic(producer, options, state_topic(name, prefix)) if shared else None,
                )
            )
            engines.append(engine)
        started = time.perf_counter()
        watcher = asyncio.create_task(watch(engines)) if watching else None
        await asyncio.gather(*(engine.run(stop, max_records=count) for engine in engines))
        if watcher is not None:
            watcher.cancel()
        return time.perf_counter() - started


async def watch(engines: list[SinkEngine]) -> None:
    """Every half second: finished, buffered and in flight per sink (stalls show as in-flight 0)."""
    started = time.perf_counter()
    while True:
        await asyncio.sleep(0.5)
        cells = [f"{e.sink.name} {e.finished:>6} b{e.buffered:>5} f{e.status()['in_flight']:>4}" for e in engines]
        print(f"{time.perf_counter() - started:5.1f}s  " + "  ".join(cells), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--orders", type=int, default=20000)
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--profile", type=Path, help="write cProfile stats here")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--watch", action="store_true", help="print progress every half second")
    parser.add_argument("--no-shared-state", action="store_true", help="no state topic (consumers.order_state)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orderbus-hotpath-") as tmp:
        work = Path(tmp)
        broker = kafka_local.start(work / "kafka")
        sandboxes = [start_sandbox_process(keep_bodies=False) for _ in SINKS]
        try:
            prefix = "hp."
            urls: dict[str, str] = {name: box.system_url(name) for name, box in zip(SINKS, sandboxes, strict=True)}
            layout = TopicLayout(prefix=prefix, orders_partitions=12)
            asyncio.run(apply_catalogue(catalogue(layout), {"bootstrap_servers": broker.bootstrap}))
            asyncio.run(produce(broker.bootstrap, orders_topic(prefix), args.orders))
            (work / "state").mkdir()
            tune_runtime()  # as the daemon does once started
            profiler = cProfile.Profile() if args.profile else None
            cpu0 = time.process_time()
            if profiler:
                profiler.enable()
            coro = deliver_all(
                broker.bootstrap,
                prefix,
                urls,
                work / "state",
                args.orders,
                args.in_flight,
                args.watch,
                not args.no_shared_state,
            )
            if args.uvloop:
                import uvloop

                wall = uvloop.run(coro)
            else:
                wall = asyncio.run(coro)
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.profile)
            cpu = time.process_time() - cpu0
            deliveries = 3 * args.orders
            print(
                f"{deliveries} deliveries in {wall:.1f} s wall: {deliveries / wall:,.0f}/s; "
                f"CPU {cpu:.1f} s = {cpu / deliveries * 1e6:.0f} us per delivery ({cpu / wall:.2f} cores)"
            )
        finally:
            for box in sandboxes:
                box.stop()
            kafka_local.stop(work / "kafka")
    return 0


if __name__ == "__main__":
    sys.exit(main())
