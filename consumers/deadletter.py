"""Dead letters: a record a sink cannot deliver, kept whole on ``orders.dlq.<sink>`` with the reason.

The original key, value and headers are copied unchanged, so a replay sends exactly what was consumed; what
happened is added as ``orderbus.dlq.*`` headers: sink, reason, the policy rule that fired, the HTTP status and a
body excerpt, attempts, first and last attempt time, the idempotency key, and the original topic, partition and
offset. A dead letter is written with acks=all before its offset may be committed.

A dead letter too large for Kafka is written without its value (`without_value`), and if need be without the
original headers too (`without_original_headers`): what was left out is named in headers (its size and SHA-256),
and the original topic, partition and offset point to the record itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, cast, get_args

Reason = Literal[
    "invalid",  # not JSON, or breaks the contract: no attempt was made
    "rejected",  # the downstream said our data is wrong (400, 422, other 4xx)
    "retries-exhausted",  # temporary failures until max attempts or max elapsed
    "dead-lettered-predecessor",  # an earlier event of the same order is in the dead-letter topic
]
REASONS: Final[tuple[str, ...]] = get_args(Reason)  # for choices, metric labels and checks

HEADER_PREFIX = "orderbus.dlq."
Header = tuple[str, bytes | None]  # a Kafka record header: its value may be null, which is not b""


def copy_headers(headers: Sequence[tuple[Any, Any]] | None) -> tuple[Header, ...]:
    """A fetched record's headers as a dead letter and a replay keep them: unchanged, a null value still null."""
    return tuple((str(name), None if value is None else bytes(value)) for name, value in (headers or ()))


EXCERPT_LIMIT = 1024  # characters of the body excerpt, and of the detail


@dataclass(frozen=True, slots=True)
class DeadLetter:
    sink: str
    reason: Reason
    rule: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[Header] = ()
    idempotency_key: str = ""
    http_status: int | None = None
    body_excerpt: str = ""
    detail: str = ""
    attempts: int = 0
    first_attempt_at: float | None = None
    last_attempt_at: float | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def record_headers(self) -> list[Header]:
        """The original headers (minus any older dead-letter headers) plus this dead letter's."""
        meta = {
            "sink": self.sink,
            "reason": self.reason,
            "rule": self.rule,
            "topic": self.topic,
            "partition": str(self.partition),
            "offset": str(self.offset),
            "idempotency-key": self.idempotency_key,
            "attempts": str(self.attempts),
            "detail": self.detail if len(self.detail) <= EXCERPT_LIMIT else self.detail[: EXCERPT_LIMIT - 1] + "…",
            **self.extra,
        }
        if self.http_status is not None:
            meta["http-status"] = str(self.http_status)
        if self.body_excerpt:
            meta["body-excerpt"] = self.body_excerpt[:EXCERPT_LIMIT]
        if self.first_attempt_at is not None:
            meta["first-attempt-at"] = f"{self.first_attempt_at:.3f}"
        if self.last_attempt_at is not None:
            meta["last-attempt-at"] = f"{self.last_attempt_at:.3f}"
        kept = [(k, v) for k, v in self.headers if not k.startswith(HEADER_PREFIX)]
        history = _history(self.headers)
        if history:
            meta["history"] = json.dumps(history, separators=(",", ":"))
        ours: list[Header] = [(HEADER_PREFIX + k, v.encode()) for k, v in meta.items() if v]
        return kept + ours

    def without_value(self) -> DeadLetter:
        """This dead letter without the record's value, with the value's size and SHA-256 in its place."""
        if self.value is None:
            return self
        omitted = {"value-omitted": str(len(self.value)), "value-sha256": hashlib.sha256(self.value).hexdigest()}
        return dataclasses.replace(self, value=None, extra={**self.extra, **omitted})

    def without_original_headers(self) -> DeadLetter:
        """This dead letter without the record's own headers (its older dead-letter headers stay, for the history),
        with their count in their place."""
        own = [(k, v) for k, v in self.headers if not k.startswith(HEADER_PREFIX)]
        if not own:
            return self
        kept = tuple((k, v) for k, v in self.headers if k.startswith(HEADER_PREFIX))
        return dataclasses.replace(self, headers=kept, extra={**self.extra, "headers-omitted": str(len(own))})


_HISTORY_FIELDS = ("reason", "rule", "http-status", "attempts", "last-attempt-at", "detail")


def _history(headers: Sequence[Header]) -> list[dict[str, str]]:
    """Earlier dead letterings of a replayed record, oldest first: its old history plus its last verdict."""
    previous = read_headers(headers)
    if not previous:
        return []
    try:
        history = json.loads(previous.get("history", "[]"))
    except (ValueError, RecursionError):  # not ours: a header mangled on its way back through the replay topic
        history = None
    if not (isinstance(history, list) and all(isinstance(entry, dict) for entry in history)):
        history = [{"detail": "an earlier history header could not be read"}]
    history.append({key: previous[key] for key in _HISTORY_FIELDS if key in previous})
    return cast(list[dict[str, str]], history)


def read_headers(headers: Sequence[Header]) -> dict[str, str]:
    """The ``orderbus.dlq.*`` headers of a dead-letter record, without the prefix (a null one reads as empty)."""
    return {
        k[len(HEADER_PREFIX) :]: (v or b"").decode("utf-8", "replace")
        for k, v in headers
        if k.startswith(HEADER_PREFIX)
    }


class DeadLetterWriter(Protocol):
    """Writes a dead letter durably (acks=all) or raises `topics.errors.PublishError`."""

    async def write(self, letter: DeadLetter) -> None: ...
