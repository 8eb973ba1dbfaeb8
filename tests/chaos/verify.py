"""The end of a chaos run: what each downstream applied, what each dead-letter topic holds, where each group
stands, and `judge`: the pass criteria over the whole report.

Dead letters are counted as operators see them (`daemon.dlq.distinct`): a copy that a sink wrote again because it
was killed between the broker's ack and recording the record as dead counts once, and is reported as a copy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from support import committed_vs_end, read_topic

from chaos.config import ChaosConfig
from chaos.malformed import CHAOS_ID_HEADER
from consumers.deadletter import read_headers
from daemon.sandbox import SandboxClient
from topics.catalogue import SINKS, consumer_group, dlq_topic, orders_topic

_EXAMPLES = 10
RECOVERY_LIMIT = 20.0  # pass criterion: throughput back within this many seconds of a kill


async def offsets(bootstrap: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Per sink: committed and end offsets of the orders topic, and whether they are equal."""
    result: dict[str, dict[str, Any]] = {}
    for name in SINKS:
        committed, ends = await committed_vs_end(bootstrap, orders_topic(prefix), consumer_group(name, prefix))
        result[name] = {
            "committed": committed,
            "end": ends,
            "equal": committed == ends,
            "behind": sum(ends[p] - committed.get(p, 0) for p in ends),
        }
    return result


async def effects(sandbox: SandboxClient, expected: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
    """Per sink: orders applied, lost (expected, not applied), applied twice, applied though not expected."""
    result: dict[str, dict[str, Any]] = {}
    for name in SINKS:
        ledger = await sandbox.ledger(name)
        applied = Counter(entry["order_number"] for entry in ledger if entry["method"] == "POST")
        want = expected[name]
        lost = sorted(want - applied.keys())
        twice = sorted(number for number, count in applied.items() if count > 1)
        unexpected = sorted(applied.keys() - want)
        result[name] = {
            "expected": len(want),
            "applied": sum(applied.values()),
            "applied_orders": len(applied),
            "lost": len(lost),
            "applied_twice": len(twice),
            "unexpected": len(unexpected),
            "examples": {"lost": lost[:_EXAMPLES], "twice": twice[:_EXAMPLES], "unexpected": unexpected[:_EXAMPLES]},
        }
    return result


def _key(key: bytes | None) -> str | None:
    return None if key is None else key.decode("utf-8", "replace")


async def dead_letters(
    bootstrap: str, prefix: str, rejected: dict[str, set[str]], bad_ids: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """Per sink: dead letters expected (the scripted 400s, every malformed record) and found, by reason."""
    bad = set(bad_ids)
    result: dict[str, dict[str, Any]] = {}
    for name in SINKS:
        records = await read_topic(bootstrap, dlq_topic(name, prefix))
        sources: set[tuple[str, str, str]] = set()
        copies = 0
        reasons: Counter[str] = Counter()
        found_rejected: Counter[str] = Counter()
        found_bad: Counter[str] = Counter()
        other: list[dict[str, Any]] = []
        for key, _, headers in records:
            meta = read_headers(headers)
            source = (meta.get("topic", ""), meta.get("partition", ""), meta.get("offset", ""))
            if source in sources:
                copies += 1  # the same consumed record again: `orderbus dlq list` shows it once
                continue
            sources.add(source)
            reason = meta.get("reason", "?")
            reasons[reason] += 1
            ident = dict(headers).get(CHAOS_ID_HEADER)
            if reason == "invalid" and ident is not None:
                found_bad[ident.decode()] += 1
            elif reason == "rejected" and meta.get("http-status") == "400" and _key(key) in rejected[name]:
                found_rejected[str(_key(key))] += 1
            elif len(other) < _EXAMPLES:
                other.append({"key": _key(key), "reason": reason, "status": meta.get("http-status")})
        want_rejected = rejected[name]
        found = len(records) - copies
        result[name] = {
            "expected": len(want_rejected) + len(bad),
            "found": found,
            "copies_written_again": copies,
            "by_reason": dict(reasons),
            "rejected": {
                "expected": len(want_rejected),
                "found": len(found_rejected),
                "missing": sorted(want_rejected - found_rejected.keys())[:_EXAMPLES],
                "twice": sum(count - 1 for count in found_rejected.values()),
            },
            "invalid": {
                "expected": len(bad),
                "found": len(found_bad),
                "missing": sorted(bad - found_bad.keys())[:_EXAMPLES],
                "unknown": sorted(found_bad.keys() - bad)[:_EXAMPLES],
                "twice": sum(count - 1 for count in found_bad.values()),
            },
            "other": other,
            "other_count": found - sum(found_rejected.values()) - sum(found_bad.values()),
        }
    return result


def judge(report: dict[str, Any], config: ChaosConfig) -> list[str]:
    """The pass criteria, each failure as one line."""
    failures = []
    effects, dead = report["effects"], report["dead_letters"]["per_sink"]
    if report["orders"]["sent"] != config.orders:
        failures.append(f"orders sent {report['orders']['sent']} of {config.orders}")
    if report["orders"]["webhook_refused"]:
        failures.append(f"valid webhooks refused: {report['orders']['webhook_refused']}")
    for name, sink in effects["per_sink"].items():
        for what in ("lost", "applied_twice", "unexpected"):
            if sink[what]:
                failures.append(f"{name}: {sink[what]} orders {what.replace('_', ' ')}: {sink['examples']}")
    for name, letters in dead.items():
        for what in ("rejected", "invalid"):
            part = letters[what]
            # An order's record is dead-lettered once; a malformed record produced twice (a producer's retry)
            # is two records, each with its dead letter.
            twice = part["twice"] if what == "rejected" else 0
            if part["found"] != part["expected"] or part["missing"] or part.get("unknown") or twice:
                failures.append(f"{name}: dead letters {what}: {part}")
        if letters["other_count"]:
            failures.append(f"{name}: {letters['other_count']} unexpected dead letters: {letters['other']}")
    for name, position in report["offsets"].items():
        if not position["equal"]:
            failures.append(f"{name}: committed offsets are {position['behind']} behind the end offsets")
    duplicates = report["duplicate_requests"]
    for i, counts in enumerate(duplicates["after_each_sigterm"]):
        if any(counts.values()):
            failures.append(f"SIGTERM {i + 1}: duplicate requests {counts}")
    for i, counts in enumerate(duplicates["after_each_kill"]):
        # The window: requests under way plus answered records not yet durably recorded (consumers/lane.py).
        window = 2 * config.max_in_flight
        if any(count > window for count in counts.values()):
            failures.append(f"kill {i + 1}: duplicate requests {counts} exceed the window {window}")
    if duplicates["unexplained"]:
        failures.append(f"{duplicates['unexplained']} duplicate requests with no kill, SIGTERM or fault before them")
    if duplicates["request_log_gaps"]:
        failures.append(f"{duplicates['request_log_gaps']} requests missed in the sandbox log: counts incomplete")
    for event in report["events"]:
        if event["kind"] == "kill" and (event["recovered_s"] is None or event["recovered_s"] > RECOVERY_LIMIT):
            failures.append(f"event {event['index']} (kill): throughput back after {event['recovered_s']} s")
        if any(value != "ok" for value in event.get("integrity", {}).values()):
            failures.append(f"event {event['index']}: integrity_check {event['integrity']}")
        if event["kind"] == "sigterm" and event.get("exit_code") != 0:
            failures.append(f"event {event['index']}: SIGTERM exit code {event.get('exit_code')}")
    if report["final_stop"].get("exit_code") != 0:
        failures.append(f"final SIGTERM: {report['final_stop']}")
    if report["daemon_crashes"]:
        failures.append(f"the daemon crashed {len(report['daemon_crashes'])} times")
    bad = report["bad_input"]
    if bad["webhooks"]["sent"] != config.bad_webhooks or bad["webhooks"]["unexpected"]:
        failures.append(f"malformed webhooks: {bad['webhooks']}")
    if bad["records"]["sent"] != config.bad_records:
        failures.append(f"malformed records sent {bad['records']['sent']} of {config.bad_records}")
    return failures
