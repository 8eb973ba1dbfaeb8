"""``orderbus reconcile``: does a system still have the orders orderbus delivered to it?

orderbus knows what it delivered; it cannot know what a system did with it afterwards: a restore from last
night's backup, an order deleted by hand, a migration that dropped some. This asks. What was delivered is in the
sink's delivery-state file on this host (`consumers.dedup`): every order with an event the system accepted (or
already had) within the window. For each, one GET of the order as the system has it, by the id its create
returned, else by number (`consumers.sink.RestSink.read`), with the sink's credentials, TLS settings and timeout,
``User-Agent: orderbus/<version> reconcile``, at most `concurrency` at once and `rate` a second:

- a 2xx with a JSON object: present (a 2xx with anything else, a sign-in page of a proxy for one, is no verdict);
- 404 or 410: missing, lost by the system; or removed, when the last event delivered was the order's cancel (the
  sinks send a cancel as a DELETE). A cancelled order still there is present: some systems keep them, marked;
- 429 or 503 with Retry-After: every request waits as told (at most the sink's ``retry_after_cap``) and the pace
  halves, as the sink's own does; 408, 5xx, a timeout or a connection error: asked again after 1, 2, 4 s (`RETRY`'s
  ceilings, without jitter: a few requests at a time need none), 4 times in all, then no verdict (unknown);
- 401 or 403, or a TLS certificate the sink does not trust: it stops (`RunStopped`, a configuration matter:
  every other order would get the same);
- any other status: unknown. `STOP_AFTER` orders in a row without a verdict stop the run too: that is the
  system (down, or not at that URL), not the orders.

What was found before a stop is reported all the same (`Run.checked`). It changes nothing anywhere: GETs without
an idempotency key, and the state file opened read-only beside the running daemon. Each host keeps the states of
the partitions it handled: run it on each. States older than ``dedup_retention_hours`` are pruned, so the window
reaches back at most that far.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from consumers.auth import authorized_attempt
from consumers.backoff import Backoff
from consumers.clock import SystemClock
from consumers.deadlines import Deadlines
from consumers.dedup_sql import SELECT_DELIVERED_SINCE, check_layout
from consumers.delivery import Reply, TransportFailure
from consumers.http_client import HttpClient
from consumers.identity import USER_AGENT
from consumers.pacing import Pacer
from consumers.policy import parse_retry_after
from consumers.sqlite_files import read_only
from daemon.retention import dedup_path
from daemon.settings import RECONCILE_RATE, Settings, SinkSettings
from daemon.sinks import build_auth, build_sink, http_config
from topics.errors import ConfigError, OrderbusError, StoreError

RETRY: Final = Backoff(base=1.0, cap=4.0, max_attempts=4)
STOP_AFTER: Final = 10  # orders in a row without a verdict

Verdict = Literal["present", "removed", "missing", "unknown"]
VERDICTS: Final[tuple[Verdict, ...]] = ("present", "removed", "missing", "unknown")
CANCELLED: Final = "order.cancelled"
Read = Callable[["Delivered"], Awaitable[Reply | TransportFailure]]


class RunStopped(OrderbusError):
    """The run stopped before every order was asked: the credentials or the certificate refused (`configuration`),
    or no verdict for `STOP_AFTER` orders in a row."""

    def __init__(self, message: str, *, configuration: bool) -> None:
        super().__init__(message)
        self.configuration = configuration


@dataclass(frozen=True, slots=True)
class Delivered:
    """An order the system accepted an event of: its number, the id the system gave it, when (unix s), and whether
    that last event was its cancel (None: delivered before orderbus kept event types)."""

    order_number: str
    downstream_id: str | None
    at: float
    cancelled: bool | None = False


@dataclass(frozen=True, slots=True)
class Checked:
    order: Delivered
    verdict: Verdict
    detail: str  # "HTTP 404", "timeout: no answer within 10 s, 4 tries"


@dataclass
class Run:
    """One reconcile run: what it will ask, what it has found so far (in `orders`' order), and its window."""

    orders: Sequence[Delivered] = ()
    since: float = 0.0
    found: dict[int, Checked] = field(default_factory=dict)

    @property
    def checked(self) -> list[Checked]:
        return [self.found[index] for index in sorted(self.found)]


def delivered_orders(path: Path, since: float) -> list[Delivered]:
    """The orders with an event delivered (``done``) or found there (``duplicate``) at or after `since`, the
    oldest delivery first; `OrderbusError` if the file is missing or cannot be read."""
    if not path.is_file():
        raise OrderbusError(f"no delivery-state file {path}: this host has delivered nothing to this sink yet")
    try:
        with read_only(path) as db:
            check_layout(db)
            rows = db.execute(SELECT_DELIVERED_SINCE, (since,)).fetchall()
    except StoreError as exc:
        raise OrderbusError(f"cannot read {path}: {exc}") from None
    except (sqlite3.Error, OSError) as exc:
        raise OrderbusError(f"cannot read {path}: {exc} (run it as the daemon's user, or with sudo)") from None
    return [
        Delivered(str(ref), None if id_ is None else str(id_), float(at), None if kind is None else kind == CANCELLED)
        for ref, at, id_, kind in rows
    ]


async def check_all(
    run: Run,
    read: Read,
    *,
    concurrency: int,
    pacer: Pacer,
    retry_after_cap: float = 300.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    wall: Callable[[], float] = time.time,
    progress: Callable[[int], None] = lambda done: None,
) -> list[Checked]:
    """Ask for every order of `run` (`read`), `concurrency` at a time, each request paced by `pacer`; what is found
    goes into `run` as it comes (`progress` gets the count), so a stop (`RunStopped`) or an interrupt keeps it."""
    queue: Iterator[int] = iter(range(len(run.orders)))
    without_verdict = 0

    async def worker() -> None:
        nonlocal without_verdict
        for index in queue:  # shared: each index is taken by one worker
            checked = await _check(run.orders[index], read, pacer, retry_after_cap, sleep, wall)
            run.found[index] = checked
            progress(len(run.found))
            without_verdict = without_verdict + 1 if checked.verdict == "unknown" else 0
            if without_verdict >= STOP_AFTER:
                raise RunStopped(
                    f"no verdict for {STOP_AFTER} orders in a row, the last: {checked.detail}; the system is down, "
                    "or does not answer GETs at these URLs (urls.by_id, urls.by_number)",
                    configuration=False,
                )

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(run.orders))):
                group.create_task(worker())
    except* RunStopped as stopped:
        raise stopped.exceptions[0] from None
    return run.checked


async def _check(
    order: Delivered,
    read: Read,
    pacer: Pacer,
    retry_after_cap: float,
    sleep: Callable[[float], Awaitable[None]],
    wall: Callable[[], float],
) -> Checked:
    detail = ""
    tries = RETRY.max_attempts
    for attempt in range(1, tries + 1):
        await pacer.acquire()
        outcome = await read(order)
        wait: float | None = RETRY.ceiling(attempt)
        if isinstance(outcome, TransportFailure):
            if outcome.certificate_refused:
                raise RunStopped(
                    f"the system's TLS certificate is not trusted ({outcome.detail}): set the sink's ca_bundle to "
                    "the CA that signed it",
                    configuration=True,
                )
            detail = f"{outcome.kind}: {outcome.detail}"
        elif 200 <= outcome.status < 300:
            if outcome.body.lstrip()[:1] == b"{":
                return Checked(order, "present", f"HTTP {outcome.status}")
            return Checked(order, "unknown", f"HTTP {outcome.status} without a JSON object: not the order")
        elif outcome.status in (404, 410):
            return Checked(order, "removed" if order.cancelled else "missing", f"HTTP {outcome.status}")
        elif outcome.status in (401, 403):
            said = f": {outcome.excerpt}" if b"credentials_refused" in outcome.body else ""  # our own, see auth
            raise RunStopped(
                f"the credentials were refused (HTTP {outcome.status}{said}) when asking for order "
                f"{order.order_number}: check the sink's auth settings; nothing more was asked",
                configuration=True,
            )
        elif outcome.status in (408, 429) or outcome.status >= 500:
            detail = f"HTTP {outcome.status}"
            told = parse_retry_after(outcome.retry_after, wall_now=wall(), cap=retry_after_cap)
            if told is not None or outcome.status == 429:
                pacer.hold(told or 0.0)  # every request waits, and the pace halves: as the sink's own
                wait = None
        else:
            return Checked(order, "unknown", f"HTTP {outcome.status}")
        if attempt < tries and wait is not None:
            await sleep(wait)
    return Checked(order, "unknown", f"{detail}, {tries} tries")


async def reconcile(
    settings: Settings,
    name: str,
    run: Run,
    *,
    concurrency: int,
    rate: float | None,
    progress: Callable[[int], None] = lambda done: None,
) -> list[Checked]:
    """Ask sink `name`'s system for each order of `run` (see `prepare`), at most `rate` a second (None: the sink's
    `rate`, else `RECONCILE_RATE`)."""
    config = _sink(settings, name)
    sink = build_sink(name, config)
    http = http_config(config)
    tls = http.ssl_context(f"sinks.{name}.ca_bundle")
    client = HttpClient(limit=concurrency, ssl=tls, user_agent=f"{USER_AGENT} reconcile")
    auth = build_auth(name, config)
    deadlines = Deadlines(SystemClock())

    async def read(order: Delivered) -> Reply | TransportFailure:
        request = sink.read(order.order_number, order.downstream_id)
        return await authorized_attempt(
            client, request, auth, idempotency_key=None, timeout=http.timeout, deadlines=deadlines
        )

    try:
        pacer = Pacer(pace(rate, config.rate), clock=SystemClock(), burst=concurrency)
        return await check_all(
            run, read, concurrency=concurrency, pacer=pacer, retry_after_cap=config.retry_after_cap, progress=progress
        )
    except RunStopped as stopped:
        raise RunStopped(f"sinks.{name}: {stopped}", configuration=stopped.configuration) from None
    finally:
        await auth.aclose()
        await client.close()


def pace(asked: float | None, sink_rate: float | None) -> float:
    """Requests a second: as asked (``--rate``), else the sink's `rate`, else `RECONCILE_RATE`: never unlimited, as
    the sink without a rate may be, because these requests come on top of the running daemon's."""
    return asked if asked is not None else sink_rate or RECONCILE_RATE


def prepare(settings: Settings, name: str, since: float, *, now: float) -> Run:
    """The run over sink `name`'s orders delivered since `since` (unix s), which is moved up to the oldest state kept
    (``dedup_retention_hours`` before `now`): older ones are pruned."""
    config = _sink(settings, name)
    since = max(since, now - config.dedup_retention_hours * 3600)
    return Run(delivered_orders(dedup_path(settings.state_dir, name), since), since)


def _sink(settings: Settings, name: str) -> SinkSettings:
    config = settings.sinks.get(name)
    if config is None:
        raise ConfigError(f"sinks.{name}: no such sink in the settings; the sinks are {', '.join(settings.sinks)}")
    return config


def accounted_for(checked: Sequence[Checked]) -> bool:
    """Every order as orderbus left it: there, or gone on its cancel (the exit status's 0)."""
    return all(c.verdict in ("present", "removed") for c in checked)


def explain(sink: str, run: Run, config: str, *, resending: bool = False) -> list[str]:
    """The report: the counts, then every order that is not present (or removed on its cancel), with what the
    system answered, and how to send the missing ones again unless `resending` (`daemon.resend`)."""
    checked = run.checked
    counts = {verdict: sum(1 for c in checked if c.verdict == verdict) for verdict in VERDICTS}
    asked = "the system was asked for each" if len(checked) == len(run.orders) else f"{len(checked)} asked"
    lines = [
        f"{sink}: {len(run.orders)} order(s) delivered from this host since {_when(run.since)}; {asked}",
        *(f"  {verdict:<8} {count}" for verdict, count in counts.items() if verdict != "removed" or count),
    ]
    missing = [c for c in checked if c.verdict == "missing"]
    heading = "missing (the system answers that it has no such order, and orderbus did not cancel it there):"
    if any(c.order.cancelled is None for c in missing):
        heading = (
            "missing (the system answers that it has no such order; lost, or, for those delivered before "
            "orderbus kept event types, removed on a cancel):"
        )
    listed: tuple[tuple[Verdict, str], ...] = (
        ("missing", heading),
        ("unknown", "unknown (no answer that says; ask again later):"),
    )
    for verdict, title in listed:
        if counts[verdict]:
            lines.append(title)
            for c in checked:
                if c.verdict == verdict:
                    known = f", downstream id {c.order.downstream_id}" if c.order.downstream_id else ", by number"
                    lines.append(f"  {c.order.order_number}{known}, delivered {_when(c.order.at)}: {c.detail}")
    if counts["removed"]:
        lines.append("removed: cancelled orders the system deleted, as orderbus's cancel asked")
    if missing:
        lines.append(f"what orderbus has of an order: orderbus trace ORDER{config}")
        if not resending:
            lines.append(f"to send the missing ones again: orderbus reconcile --sink {sink} --resend{config}")
    return lines


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


__all__ = [
    "VERDICTS",
    "Checked",
    "Delivered",
    "Run",
    "RunStopped",
    "accounted_for",
    "check_all",
    "delivered_orders",
    "explain",
    "pace",
    "prepare",
    "reconcile",
]
