"""The response policy as data: which downstream answer leads to which action, and how long Retry-After asks for.

A policy is an ordered tuple of `Rule`s; the first rule that covers a status decides. The defaults follow the
brief's table::

    2xx                       done         "2xx"
    409 to a create (POST)    duplicate    "409-already-exists"
    409 to an update, cancel  dead_letter  "409-conflict"
    409 with a Retry-After    retry        "409-in-progress"  (`IN_PROGRESS`, decided by the lane: a wait to keep)
    2xx or 409 as a web page  dead_letter  "html-answer"      (`HTML_ANSWER`, decided by the lane: text/html)
    401, 403                  pause_auth   "auth"
    408, 425, 429, 5xx        retry        "temporary"
    400, 422, other 4xx       dead_letter  "bad-request"
    anything else (1xx, 3xx)  dead_letter  "unmatched"
    timeout / connection      retry        "timeout" / "connection-error"   (`decide_failure`)
    request not sendable      dead_letter  "invalid-request"                (`decide_failure`)

A sink's settings change single codes or whole classes with `with_overrides({"404": "duplicate"})`, for every
request or for one method (``"PUT 409": "duplicate"``: a system whose 409 to an update means "no change").
Overrides come before every existing rule, whatever the order of the mapping: a single code before a class, and
the same key with a method before it without one.
The rule name of each `Decision` is meant for logs, metrics and dead-letter headers: it is bounded and never
contains data from the request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final, Literal, get_args

from topics.errors import ConfigError

__all__ = [
    "ACTIONS",
    "DEFAULT_POLICY",
    "EVENT_METHODS",
    "HTML_ANSWER",
    "IN_PROGRESS",
    "METHODS",
    "Action",
    "Decision",
    "FailureKind",
    "ResponsePolicy",
    "Rule",
    "parse_retry_after",
]

Action = Literal["done", "duplicate", "dead_letter", "pause_auth", "retry"]
ACTIONS: Final[frozenset[str]] = frozenset(get_args(Action))
FailureKind = Literal["timeout", "connection", "invalid_request"]

_LOWEST_STATUS = 100
_HIGHEST_STATUS = 599
_CODE_KEY = re.compile(r"[1-5][0-9][0-9]")
_CLASS_KEY = re.compile(r"([1-5])xx")
# The method a sink sends for each event type (`consumers.sink`), which an override may name before its status.
EVENT_METHODS: Final = {"order.created": "POST", "order.updated": "PUT", "order.cancelled": "DELETE"}
METHODS: Final = tuple(EVENT_METHODS.values())
# RFC 9110 delay-seconds is 1*DIGIT; a decimal fraction is accepted on purpose (see `parse_retry_after`).
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")

StatusSpec = int | tuple[int, int]


def _valid_status(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and _LOWEST_STATUS <= value <= _HIGHEST_STATUS


@dataclass(frozen=True, slots=True)
class Rule:
    """Statuses that lead to one action: single codes, or inclusive ranges such as ``(500, 599)``; for the
    answers to one HTTP method only when `method` names it."""

    name: str
    action: Action
    statuses: tuple[StatusSpec, ...]
    method: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a response policy rule needs a name")
        if self.action not in ACTIONS:
            raise ConfigError(
                f"response policy rule {self.name!r}: action {self.action!r} is not one of {sorted(ACTIONS)}"
            )
        if not self.statuses:
            raise ConfigError(f"response policy rule {self.name!r} covers no status")
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"response policy rule {self.name!r}: method {self.method!r} is not one of {METHODS}")
        for spec in self.statuses:
            if isinstance(spec, tuple):
                low, high = spec
                if _valid_status(low) and _valid_status(high) and low <= high:
                    continue
            elif _valid_status(spec):
                continue
            raise ConfigError(
                f"response policy rule {self.name!r}: {spec!r} is not a status code or an inclusive range "
                f"of them ({_LOWEST_STATUS}-{_HIGHEST_STATUS})"
            )

    def covers(self, status: int, method: str | None = None) -> bool:
        """True if this rule decides `status` (the answer to a `method` request, when known)."""
        if self.method is not None and method != self.method:
            return False
        for spec in self.statuses:
            if isinstance(spec, tuple):
                if spec[0] <= status <= spec[1]:
                    return True
            elif spec == status:
                return True
        return False


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one delivery attempt's outcome, and the name of the rule that said so."""

    action: Action
    rule: str


UNMATCHED: Final = Decision("dead_letter", "unmatched")
# A 409 with a Retry-After: "a request with this key is still in progress, come back" (the IETF Idempotency-Key
# draft's answer to a retry that overtook its first request, and orderbus's own ingest's), not "it exists".
IN_PROGRESS: Final = Decision("retry", "409-in-progress")
# A 2xx (or a create's 409) that is a web page: a site's, a login page's, a proxy's; no API's. Counted as delivered,
# every order sent to a `base_url` that points at the wrong place was lost without a trace (decided by the lane).
HTML_ANSWER: Final = Decision("dead_letter", "html-answer")
_FAILURES: Final[Mapping[str, Decision]] = {
    "timeout": Decision("retry", "timeout"),
    "connection": Decision("retry", "connection-error"),
    "invalid_request": Decision("dead_letter", "invalid-request"),
}


@dataclass(frozen=True, slots=True)
class ResponsePolicy:
    """An ordered list of rules; the first that covers a status decides, and no match means dead letter."""

    rules: tuple[Rule, ...]

    def decide(self, status: int, method: str | None = None) -> Decision:
        """The decision for an HTTP status, the answer to a `method` request; a status no rule covers is
        dead-lettered by the rule "unmatched". Rules for one method apply only when `method` is that one."""
        for rule in self.rules:
            if rule.covers(status, method):
                return Decision(rule.action, rule.name)
        return UNMATCHED

    def decide_failure(self, kind: FailureKind) -> Decision:
        """The decision when no answer came: a timeout or a connection error is always retried; a request that
        could not be sent at all (a URL or header the HTTP client refuses) is dead-lettered, as no retry can help."""
        try:
            return _FAILURES[kind]
        except KeyError:
            raise ValueError(f"unknown delivery failure {kind!r}; expected one of {sorted(_FAILURES)}") from None

    def with_overrides(self, overrides: Mapping[str, Action], *, setting: str = "response_policy") -> ResponsePolicy:
        """A copy in which `overrides` ("409" -> "dead_letter", "4xx" -> "retry", "DELETE 409" -> "dead_letter") win
        over every existing rule.

        Keys are a single status ("404") or a class ("4xx"), optionally after a method the sinks send (POST, PUT,
        DELETE) and a space. The most specific key decides: a code with a method, a code, a class with a method, a
        class. Each override becomes a rule named ``override-<key>`` (``override-delete-409``). A bad key or
        action raises `ConfigError` naming `setting` and the key.
        """
        ranked: tuple[list[Rule], list[Rule], list[Rule], list[Rule]] = ([], [], [], [])
        for key, action in overrides.items():
            if not isinstance(key, str):
                raise ConfigError(f"{setting}: key {key!r} must be a string such as '404', '4xx' or 'DELETE 409'")
            if action not in ACTIONS:
                raise ConfigError(f"{setting}.{key}: action {action!r} is not one of {sorted(ACTIONS)}")
            method, _, status = key.strip().upper().rpartition(" ")
            method = method.strip()
            if method and method not in METHODS:
                raise ConfigError(
                    f"{setting}: key {key!r} names the method {method!r}; the sinks send {', '.join(METHODS)} "
                    "(e.g. 'DELETE 409')"
                )
            status = status.lower()
            name = f"override-{method.lower()}-{status}" if method else f"override-{status}"
            statuses: tuple[StatusSpec, ...]
            if _CODE_KEY.fullmatch(status):
                rank, statuses = (0 if method else 1), (int(status),)
            elif match := _CLASS_KEY.fullmatch(status):
                low = int(match.group(1)) * 100
                rank, statuses = (2 if method else 3), ((low, low + 99),)
            else:
                raise ConfigError(
                    f"{setting}: key {key!r} is neither a status code (100-599, e.g. '404') nor a class (e.g. '4xx'), "
                    "with or without a method before it ('DELETE 409')"
                )
            ranked[rank].append(Rule(name, action, statuses, method or None))
        return ResponsePolicy((*(rule for rules in ranked for rule in rules), *self.rules))


DEFAULT_POLICY: Final = ResponsePolicy(
    (
        Rule("2xx", "done", ((200, 299),)),
        # "Already exists" answers a create; to an update or a cancel a 409 is a conflict (a version, "already
        # shipped"): counted as done, the change was lost without a trace, so it is a dead letter to look at.
        Rule("409-already-exists", "duplicate", (409,), "POST"),
        Rule("409-conflict", "dead_letter", (409,)),
        Rule("auth", "pause_auth", (401, 403)),
        Rule("temporary", "retry", (408, 425, 429, (500, 599))),
        Rule("bad-request", "dead_letter", ((400, 499),)),
    )
)


def parse_retry_after(value: str | None, *, wall_now: float, cap: float) -> float | None:
    """Seconds to wait according to a Retry-After header, clamped to ``[0, cap]``; None if absent or invalid.

    Accepted (RFC 9110 section 10.2.3):

    - delay-seconds, a non-negative integer ("120"). A decimal fraction ("1.5") is not valid HTTP, but is
      accepted: the server's intent is unambiguous, and waiting as asked is the safe side. Signs, exponents,
      "inf" and "nan" are rejected.
    - an HTTP-date in any of the three RFC 9110 forms (IMF-fixdate, RFC 850, asctime), taken as UTC when it
      names no zone.

    Anything else is ignored (None): the caller then falls back to its own backoff. So is a wait of zero ("0", a
    date now or in the past, as a server whose clock is behind ours sends): it sets no pace, and taken as one it
    would have every request sent again at once, for as long as the server answers so, with no backoff and no
    circuit breaker (they count only failures without a pace).
    """
    if not math.isfinite(cap) or cap < 0:
        raise ValueError(f"the Retry-After cap must be a finite number >= 0, got {cap}")
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        seconds = float(text)
        return min(seconds, cap) if seconds > 0 else None
    try:
        date = parsedate_to_datetime(text)
    except (ValueError, TypeError, OverflowError, IndexError):
        return None
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    seconds = date.timestamp() - wall_now
    return min(seconds, cap) if seconds > 0 else None
