"""One sandbox system's state as plain data, and an answer as data (so an idempotency key can replay it)."""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from daemon.sandbox.faults import Script
from daemon.sandbox.records import Logged


@dataclass(frozen=True, slots=True)
class Answer:
    """A response as data, so that an idempotency key can replay it byte for byte."""

    status: int
    body: bytes = b""
    location: str = ""

    def response(self, *, replayed: bool = False, retry_after: str | None = None) -> web.Response:
        headers = {"Location": self.location} if self.location else {}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        content_type = "application/json" if self.body else None
        return web.Response(status=self.status, body=self.body or None, content_type=content_type, headers=headers)

    def pack(self) -> bytes:
        return f"{self.status} {self.location}\n".encode() + self.body

    @classmethod
    def of(cls, status: int, data: Any = None, location: str = "") -> Answer:
        """An answer with `data` (anything `json.dumps` takes; None: no body)."""
        return cls(status, b"" if data is None else json.dumps(data).encode(), location)

    @classmethod
    def unpack(cls, packed: bytes) -> Answer:
        head, _, body = packed.partition(b"\n")
        status, _, location = head.decode().partition(" ")
        return cls(int(status), body, location)


NOT_FOUND: Final = Answer.of(404, {"error": "not_found"})


@dataclass(slots=True)
class SystemState:
    """The state of one system.

    Orders, keys and the ledger live in dicts whose values are only str, int or bytes (bodies as received, not
    parsed). CPython never tracks such dicts, so its collector never walks them: with parsed bodies and an object
    per order, each full collection paused the server for 200-650 ms once a benchmark had stored 100k orders.
    """

    name: str
    rng: random.Random
    requests: deque[Logged]
    number: dict[str, str] = field(default_factory=dict)  # id -> order number
    status: dict[str, str] = field(default_factory=dict)  # id -> "open" | "cancelled"
    version: dict[str, int] = field(default_factory=dict)  # id -> 1, 2, ... (+1 per applied change)
    body: dict[str, bytes] = field(default_factory=dict)  # id -> the last body as received
    by_number: dict[str, str] = field(default_factory=dict)  # order number -> id (the newest)
    key_fingerprint: dict[str, bytes] = field(default_factory=dict)  # Idempotency-Key -> digest of method, path, body
    key_answer: dict[str, bytes] = field(default_factory=dict)  # Idempotency-Key -> `Answer.pack()`
    ledger: dict[int, bytes] = field(default_factory=dict)  # seq -> the entry as JSON
    script: Script = field(default_factory=Script)
    counts: dict[str, int] = field(default_factory=dict)
    by_status: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    max_concurrent: int = 0
    created: int = 0  # orders created so far: the last id's number

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def summary(self, order_id: str) -> dict[str, Any]:
        return {
            "id": order_id,
            "order_number": self.number[order_id],
            "status": self.status[order_id],
            "version": self.version[order_id],
        }

    def view(self, order_id: str) -> bytes:
        """The read-back JSON: the summary plus ``"body"``, the last body as received."""
        return json.dumps(self.summary(order_id)).encode()[:-1] + b', "body": ' + self.body[order_id] + b"}"

    def stats(self) -> dict[str, Any]:
        names = ("requests", "applied", "duplicate_requests", "key_conflicts", "resets", "client_gone")
        return {
            **{name: self.counts.get(name, 0) for name in names},
            "by_status": {str(code): n for code, n in sorted(self.by_status.items())},
            "in_flight": self.in_flight,
            "max_concurrent": self.max_concurrent,
        }


__all__ = ["NOT_FOUND", "Answer", "SystemState"]
