"""Watching a chaos run from the outside: what each downstream applied over time, every request it received (to
find and explain duplicate requests), and the downstream's throttle episodes.

**Duplicate requests.** For each idempotency key, the requests that reached the API (answered 2xx, replayed by
the key, or reset after the effect) are its *effect requests*; all but the first are duplicates. A duplicate
whose previous effect request was reset after the effect is the fault's own (the daemon had to ask again); any
other duplicate is charged to the first chaos event (kill, SIGTERM, broker kill) between the two requests, or
counted as unexplained. The sandbox keeps its request log in a ring, so the log is read every second.

**Throttle episodes.** A downstream that rate-limits answers 429 to every request that arrives while it is over
its limit, not to one request in fifty at random. An episode (a script step of the sandbox) answers the requests
of one system 429 with one Retry-After (1-5 s, drawn), after a gateway's delay of 50-250 ms, for at most half a
second and at most as many as that system's share of 429s is short of the target (2 %). Episodes start at random
moments, never while the daemon still holds that sink for the previous one, and not while a kill's recovery is
being measured (that figure is the daemon's, not the downstream's pace). The daemon honours Retry-After for the
whole sink, so independent 429s at that rate would hold every sink nearly all the time: about 20 effects/s per
sink on this machine, 90 minutes for the default run (`--independent-429` shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp

from daemon.sandbox import SandboxClient
from topics.catalogue import SINKS

_EVENT_SLACK = 1.0  # a request of a killed daemon can still arrive this long after the kill


@dataclass(frozen=True, slots=True)
class Event:
    index: int
    kind: str  # "kill", "sigterm", "broker"
    at: float


@dataclass(slots=True)
class _KeyState:
    last_at: float
    last_reset: bool
    system: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    system: str
    key: str
    previous_at: float
    at: float


class Monitor:
    """Samples applied effects per system and reads the request log; `events` is appended to by the run."""

    def __init__(self, sandbox: SandboxClient) -> None:
        self.sandbox = sandbox
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stats: dict[str, Any] = {}
        self.events: list[Event] = []
        self.keys: dict[str, _KeyState] = {}
        self.fault_duplicates: Counter[str] = Counter()
        self.other_duplicates: list[Duplicate] = []
        self.log_gaps = 0
        self._cursor = 0
        self._seen: set[int] = set()

    def applied(self, system: str) -> int:
        return self.samples[-1][1].get(system, 0) if self.samples else 0

    def min_applied(self) -> int:
        return min((self.applied(name) for name in SINKS), default=0)

    async def run(self, stop: asyncio.Event) -> None:
        next_log = 0.0
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self.sample()
                if time.monotonic() >= next_log:
                    next_log = time.monotonic() + 1.0
                    await self.read_log()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
        await self.read_log()

    async def sample(self) -> None:
        stats = await self.sandbox.stats()
        self.stats = stats
        applied: dict[str, int] = {name: stats["systems"].get(name, {}).get("applied", 0) for name in SINKS}
        self.samples.append((time.time(), applied))

    async def read_log(self) -> None:
        """Every request logged since the cursor; a request still pending is read again next time."""
        records = await self.sandbox.requests(since=self._cursor)
        if records and records[0]["seq"] > self._cursor + 1:
            self.log_gaps += records[0]["seq"] - self._cursor - 1
        cursor_blocked = False
        for record in records:
            seq = record["seq"]
            if record["outcome"] == "pending":
                cursor_blocked = True
                continue
            if seq in self._seen:
                continue
            self._seen.add(seq)
            self._request(record)
            if not cursor_blocked:
                self._cursor = seq
        self._seen = {seq for seq in self._seen if seq > self._cursor}

    def _request(self, record: Any) -> None:
        key, status, outcome = record["idempotency_key"], record["status"], record["outcome"]
        reset = outcome == "reset" and record["fault"] == "p_reset_after_effect"
        effect = reset or outcome == "replayed" or (outcome == "answered" and status is not None and status < 300)
        if key is None or not effect:
            return
        at = float(record["received_at"])
        state = self.keys.get(key)
        if state is None:
            self.keys[key] = _KeyState(at, reset, record["system"])
            return
        if state.last_reset:
            self.fault_duplicates[record["system"]] += 1
        else:
            self.other_duplicates.append(Duplicate(record["system"], key, state.last_at, at))
        state.last_at, state.last_reset = at, reset

    def duplicates_by_event(self) -> tuple[dict[int, Counter[str]], list[Duplicate]]:
        """Each non-fault duplicate charged to the first event between it and the previous request of its key."""
        charged: dict[int, Counter[str]] = {event.index: Counter() for event in self.events}
        unexplained = []
        for dup in self.other_duplicates:
            cause = next((e for e in self.events if dup.previous_at - _EVENT_SLACK < e.at <= dup.at), None)
            if cause is None:
                unexplained.append(dup)
            else:
                charged[cause.index][dup.system] += 1
        return charged, unexplained


def recovery(
    samples: list[tuple[float, dict[str, int]]], since: float, *, window: float = 2.0, share: float = 0.5
) -> float | None:
    """Seconds from `since` (a kill) until throughput is back: the end of the first `window` after `since` in
    which every sink applied something and at least `share` of its rate in the 10 s before; None until then.
    """
    before = [s for s in samples if since - 10 <= s[0] <= since]
    after = [s for s in samples if s[0] > since]
    if len(before) < 2 or len(after) < 2:
        return None
    span = before[-1][0] - before[0][0]
    rates: dict[str, float] = {
        name: (before[-1][1][name] - before[0][1][name]) / span if span > 0 else 0.0 for name in SINKS
    }
    for i, (start, counts) in enumerate(after):
        end = next((s for s in after[i:] if s[0] >= start + window), None)
        if end is None:
            return None
        elapsed = end[0] - start
        if all(
            end[1][name] > counts[name] and end[1][name] - counts[name] >= share * rates[name] * elapsed
            for name in SINKS
        ):
            return end[0] - since
    return None


def first_effect(samples: list[tuple[float, dict[str, int]]], since: float) -> float | None:
    """Seconds from `since` until every sink applied something new."""
    base = next((s[1] for s in reversed(samples) if s[0] <= since), None)
    if base is None:
        return None
    for at, counts in samples:
        if at > since and all(counts[name] > base[name] for name in SINKS):
            return at - since
    return None


class Throttle:
    """Throttle episodes on the sandbox's systems (see the module docstring); `paused` stops new episodes."""

    def __init__(
        self, sandbox: SandboxClient, monitor: Monitor, *, share: float, retry_after: tuple[int, int], seed: int
    ) -> None:
        self.sandbox = sandbox
        self.monitor = monitor
        self.share = share
        self.retry_after = retry_after
        self.rng = random.Random(f"throttle:{seed}")
        self.paused = False
        self.episodes: Counter[str] = Counter()
        self._quiet_until: dict[str, float] = dict.fromkeys(SINKS, 0.0)

    async def run(self, stop: asyncio.Event) -> None:
        if self.share <= 0:
            return
        tasks = [asyncio.create_task(self._system(name, stop)) for name in SINKS]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _system(self, name: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(max(self._quiet_until[name] - time.time(), 0.0) + self.rng.uniform(0.05, 0.3))
            stats = self.monitor.stats.get("systems", {}).get(name)
            if stats is None:
                continue
            requests, throttled = stats["requests"], stats["by_status"].get("429", 0)
            missing = int(self.share * requests - throttled)
            if self.paused or requests < 200 or missing < 1:
                continue
            seconds = self.rng.randint(*self.retry_after)
            # At most the missing 429s, to the requests that arrive before the window closes: those sent until
            # the first 429 reaches the daemon, which then holds the sink. The limiter answers after a delay (a
            # gateway's), so a burst is caught, not one request. The window closes well before the hold ends,
            # so that one episode makes one hold.
            delay_ms = self.rng.uniform(50.0, 250.0)
            step = {"status": 429, "retry_after": seconds, "times": min(missing, 200), "delay_ms": delay_ms}
            started = time.time()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self.sandbox.script(name, [step])
                await asyncio.sleep(min(0.5, 0.8 * seconds - delay_ms / 1000))
                await self.sandbox.script(name, [])
                self.episodes[name] += 1
            # The sink delivers for a while after each hold before the next episode may start.
            self._quiet_until[name] = started + seconds + self.rng.uniform(0.0, 0.5)
