"""``orderbus reconcile``: does a system still have the orders orderbus delivered to it?

orderbus knows what it delivered; it cannot know what a system did with it afterwards: a restore from last
night's backup, an order deleted by hand, a migration that dropped some. This asks. What was delivered is in the
sink's delivery-state file on this host (`consumers.dedup`): every order with an event the system accepted (or
already had) within the window. For each, one GET of the order as the system has it, by the id its create
returned, else by number (`consumers.sink.RestSink.read`), with the sink's credentials, TLS settings and timeout,
at most `concurrency` at once and at most the sink's ``rate`` per second:

- 2xx: present;
- 404 or 410: missing. The system lost it, or removed it on a cancel (some systems do; `orderbus trace ORDER`
  shows the order's events);
- 429, 408, 5xx, a timeout or a connection error: asked again, after the Retry-After (at most `RETRY_CAP`) or
  1, 2, 4 s, `TRIES` times in all; then unknown;
- 401 or 403: the credentials are refused: it stops (`CredentialsRefusedError`) rather than ask every order in vain;
- any other status: unknown, with that status.

It changes nothing anywhere: GETs without an idempotency key, and the state file opened read-only beside the
running daemon. Each host keeps the states of the partitions it handled: run it on each. States older than
``dedup_retention_hours`` are pruned, so the window reaches back at most that far.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from consumers.auth import authorized_attempt
from consumers.clock import SystemClock
from consumers.deadlines import Deadlines
from consumers.dedup_sql import SELECT_DELIVERED_SINCE
from consumers.delivery import Reply, TransportFailure
from consumers.http_client import HttpClient
from consumers.identity import USER_AGENT
from consumers.pacing import Pacer
from consumers.policy import parse_retry_after
from consumers.sqlite_files import read_only
from daemon.retention import dedup_path
from daemon.settings import Settings
from daemon.sinks import build_auth, build_sink, http_config
from topics.errors import ConfigError, OrderbusError

TRIES: Final = 4
RETRY_CAP: Final = 60.0  # seconds: the longest Retry-After it waits for one order

Verdict = Literal["present", "missing", "unknown"]
Read = Callable[["Delivered"], Awaitable[Reply | TransportFailure]]


class CredentialsRefusedError(ConfigError):
    """The system answered 401 or 403: every other order would get the same."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """An order the system accepted an event of: its number, the id the system gave it, and when (unix s)."""

    order_number: str
    downstream_id: str | None
    at: float


@dataclass(frozen=True, slots=True)
class Checked:
    order: Delivered
    verdict: Verdict
    detail: str  # "HTTP 404", "timeout: no answer within 10 s, 4 tries"


def delivered_orders(path: Path, since: float) -> list[Delivered]:
    """The orders with an event delivered (``done``) or found there (``duplicate``) at or after `since`, the
    oldest delivery first; `OrderbusError` if there is no such file."""
    if not path.is_file():
        raise OrderbusError(f"no delivery-state file {path}: this host has delivered nothing to this sink yet")
    with read_only(path) as db:
        rows = db.execute(SELECT_DELIVERED_SINCE, (since,)).fetchall()
    # An order_ref of "@P:O" is a record without a readable key: never delivered, but guarded all the same.
    return [
        Delivered(str(ref), None if id_ is None else str(id_), float(at)) for ref, at, id_ in rows if ref[:1] != "@"
    ]


async def check_all(
    orders: Sequence[Delivered],
    read: Read,
    *,
    concurrency: int,
    pacer: Pacer,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    wall: Callable[[], float] = time.time,
) -> list[Checked]:
    """Ask for every order (`read`), `concurrency` at a time, each request paced by `pacer`; in `orders`' order."""
    results: list[Checked | None] = [None] * len(orders)
    queue: Iterator[int] = iter(range(len(orders)))

    async def worker() -> None:
        for index in queue:  # shared: each index is taken by one worker
            results[index] = await _check(orders[index], read, pacer, sleep, wall)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(orders))):
                group.create_task(worker())
    except* CredentialsRefusedError as refused:
        raise refused.exceptions[0] from None
    return [result for result in results if result is not None]


async def _check(
    order: Delivered,
    read: Read,
    pacer: Pacer,
    sleep: Callable[[float], Awaitable[None]],
    wall: Callable[[], float],
) -> Checked:
    detail = ""
    for attempt in range(1, TRIES + 1):
        await pacer.acquire()
        outcome = await read(order)
        wait = float(2 ** (attempt - 1))
        if isinstance(outcome, TransportFailure):
            detail = f"{outcome.kind}: {outcome.detail}"
        elif 200 <= outcome.status < 300:
            return Checked(order, "present", f"HTTP {outcome.status}")
        elif outcome.status in (404, 410):
            return Checked(order, "missing", f"HTTP {outcome.status}")
        elif outcome.status in (401, 403):
            raise CredentialsRefusedError(
                f"the system refused the credentials (HTTP {outcome.status}) for order {order.order_number}; "
                "nothing more was asked"
            )
        elif outcome.status in (408, 429) or outcome.status >= 500:
            detail = f"HTTP {outcome.status}"
            told = parse_retry_after(outcome.retry_after, wall_now=wall(), cap=RETRY_CAP)
            wait = told if told is not None else wait
        else:
            return Checked(order, "unknown", f"HTTP {outcome.status}")
        if attempt < TRIES:
            await sleep(wait)
    return Checked(order, "unknown", f"{detail}, {TRIES} tries")


async def reconcile(settings: Settings, name: str, *, since: float, concurrency: int) -> list[Checked]:
    """Ask sink `name`'s system for each order delivered to it from this host since `since` (unix s)."""
    config = settings.sinks.get(name)
    if config is None:
        raise ConfigError(f"sinks.{name}: no such sink in the settings; the sinks are {', '.join(settings.sinks)}")
    orders = delivered_orders(dedup_path(settings.state_dir, name), since)
    sink = build_sink(name, config)
    http = http_config(config)
    client = HttpClient(limit=concurrency, ssl=http.ssl_context(f"sinks.{name}.ca_bundle"), user_agent=USER_AGENT)
    auth = build_auth(name, config)
    deadlines = Deadlines(SystemClock())

    async def read(order: Delivered) -> Reply | TransportFailure:
        request = sink.read(order.order_number, order.downstream_id)
        return await authorized_attempt(
            client, request, auth, idempotency_key=None, timeout=http.timeout, deadlines=deadlines
        )

    try:
        pacer = Pacer(config.rate, clock=SystemClock(), burst=config.burst)
        return await check_all(orders, read, concurrency=concurrency, pacer=pacer)
    finally:
        await auth.aclose()
        await client.close()


def explain(sink: str, since: float, checked: Sequence[Checked], config: str) -> list[str]:
    """The report: the counts, then every order that is not present, with what the system answered."""
    counts = {verdict: sum(1 for c in checked if c.verdict == verdict) for verdict in ("present", "missing", "unknown")}
    lines = [
        f"{sink}: {len(checked)} order(s) delivered from this host since {_when(since)}; the system was asked for each",
        *(f"  {verdict:<8} {count}" for verdict, count in counts.items()),
    ]
    for verdict, heading in (
        ("missing", "missing (the system answers that it has no such order; lost, or removed on a cancel):"),
        ("unknown", "unknown (no answer that says; ask again later):"),
    ):
        if counts[verdict]:
            lines.append(heading)
            for c in checked:
                if c.verdict == verdict:
                    known = f", downstream id {c.order.downstream_id}" if c.order.downstream_id else ", by number"
                    lines.append(f"  {c.order.order_number}{known}, delivered {_when(c.order.at)}: {c.detail}")
    if counts["missing"]:
        lines.append(f"what orderbus has of an order: orderbus trace ORDER{config}")
    return lines


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


__all__ = ["Checked", "CredentialsRefusedError", "Delivered", "check_all", "delivered_orders", "explain", "reconcile"]
