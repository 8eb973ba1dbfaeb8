"""What a chaos run varies (`ChaosConfig`, whose defaults are `make chaos`) and the orders it plans (`Plan`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from topics.catalogue import SINKS


@dataclass(frozen=True)
class ChaosConfig:
    """Everything a run varies; the defaults are `make chaos`."""

    orders: int = 100_000  # valid orders, half through the webhook, half from a direct producer; 3 effects each
    kills: int = 20  # SIGKILLs of the daemon
    sigterms: int = 5
    broker_kills: int = 3  # SIGKILLs of the broker, restarted on the same data
    bad_webhooks: int = 10_000
    bad_records: int = 10_000
    seed: int = 1
    budget: float = 1800.0  # seconds; a run that is not done by then fails
    # The downstream systems: shares of their answers (see `chaos.observe` for how the 429s come).
    p503: float = 0.05
    p429: float = 0.02
    retry_after: tuple[int, int] = (1, 5)  # seconds, drawn per throttle episode
    independent_429: bool = False  # each request draws its own 429 (the sandbox's p429), Retry-After fixed
    p_reset_after_effect: float = 0.01
    p400: float = 0.001  # of the orders, per system: those order numbers are answered 400 on every attempt
    latency_ms: float = 2.0
    latency_jitter_ms: float = 8.0
    # The daemon and the traffic.
    max_in_flight: int = 64  # per sink; the duplicate window after a kill
    partitions: int = 6
    ahead: int = 3000  # senders wait while this many orders are sent but not yet applied by the slowest sink
    rate: float | None = None  # orders/s; None: spread the orders over about 25 s per chaos event
    webhook_workers: int = 12
    broker_heap: str = "512m"
    work_dir: Path | None = None  # None: a temporary dir, removed after a passing run
    keep: bool = False


@dataclass(frozen=True)
class Plan:
    """The orders of a run: numbers by route, and the orders each system refuses with a 400."""

    webhook: list[str]
    kafka: list[str]
    rejected: dict[str, set[str]]

    @classmethod
    def make(cls, config: ChaosConfig) -> Plan:
        rng = random.Random(f"plan:{config.seed}")
        half = config.orders // 2
        webhook = [f"WH-{i:06d}" for i in range(half)]
        kafka = [f"KF-{i:06d}" for i in range(config.orders - half)]
        everything = webhook + kafka
        count = max(1, round(config.orders * config.p400)) if config.p400 > 0 else 0
        rejected: dict[str, set[str]] = {name: set(rng.sample(everything, count)) for name in SINKS}
        return cls(webhook, kafka, rejected)
