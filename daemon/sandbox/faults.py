"""How one sandbox system behaves: its seeded probabilistic faults, a script of exact answers, its auth and options.

A request to a sandbox system (see `daemon.sandbox`) meets, after authentication:

1. its **script**: the first step whose ``match`` fits the request is consumed and alone decides the answer;
2. otherwise its **faults**, in this order: ``reject_order_numbers`` (a 400 every time, nothing drawn), then one
   uniform draw that picks at most one of p_timeout, p503, p500, p429, p400 (so their sum must stay ≤ 1), then
   the latency (+ a drawn jitter), then a second draw for p_reset_after_effect.

Both end as one `Outcome` that the server carries out. A fault answer never applies anything and is never stored
under an idempotency key, so a retry with the same key is evaluated afresh, as on a real API behind a proxy.
Draws come from the system's own `random.Random`, so the seed plus the order of arrival fix every answer.

Validation errors are `ConfigError`s naming the key (``faults.crm.p503``) and the problem: the HTTP control API
turns them into 400 answers, the command line into exit code 2.
"""

from __future__ import annotations

import base64
import hmac
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final

from topics.errors import ConfigError

PROBABILITIES: Final = ("p_timeout", "p503", "p500", "p429", "p400")
_STATUS_OF: Final = {"p_timeout": 504, "p503": 503, "p500": 500, "p429": 429, "p400": 400}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the server does with one request instead of (or around) answering it normally."""

    fault: str  # the request log's name for the cause: "script", "p503", "reject", "latency", ...
    delay_s: float = 0.0  # waited before anything else happens
    status: int | None = None  # answer this and apply nothing
    body: Any = None  # JSON body of that answer
    retry_after: str | None = None  # Retry-After header of that answer
    reset: bool = False  # abort the connection before applying anything
    reset_after_effect: bool = False  # apply the request, then abort the connection instead of answering


@dataclass(frozen=True, slots=True)
class Faults:
    """The probabilistic faults of one system; all zero (the default) means a well-behaved API.

    ``p_timeout`` holds the request for ``timeout_s`` without applying it, then answers 504 (what a proxy in
    front of a hung backend says); a client with a shorter timeout gives up first and sees a timeout.
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    p_timeout: float = 0.0
    p503: float = 0.0
    p500: float = 0.0
    p429: float = 0.0
    p400: float = 0.0
    p_reset_after_effect: float = 0.0
    timeout_s: float = 30.0
    retry_after: int = 1
    retry_after_http_date: bool = False
    retry_after_on_503: bool = False
    p400_field: str = "shipping_address.postal_code"
    reject_order_numbers: frozenset[str] = frozenset()

    @classmethod
    def from_json(cls, data: object, where: str) -> Faults:
        """Validate one system's fault object; `where` prefixes error messages (``faults.crm``)."""
        obj = _object(data, where)
        values: dict[str, Any] = {}
        known = {f.name for f in fields(cls)}
        for key, value in obj.items():
            name = f"{where}.{key}"
            if key not in known:
                raise ConfigError(f"{name}: unknown fault; known: {', '.join(sorted(known))}")
            if key == "reject_order_numbers":
                values[key] = frozenset(_strings(value, name))
            elif key in ("retry_after_http_date", "retry_after_on_503"):
                values[key] = _bool(value, name)
            elif key == "p400_field":
                values[key] = _string(value, name)
            elif key == "retry_after":
                values[key] = int(_number(value, name, integer=True))
            elif key.startswith("p"):
                values[key] = _number(value, name, upper=1.0)
            else:
                values[key] = _number(value, name)
        faults = cls(**values)
        if sum(getattr(faults, p) for p in PROBABILITIES) > 1.0 + 1e-9:
            raise ConfigError(f"{where}: {' + '.join(PROBABILITIES)} must not exceed 1 (one draw picks one)")
        return faults

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["reject_order_numbers"] = sorted(self.reject_order_numbers)
        return data

    @property
    def active(self) -> bool:
        """False for the all-zero default: the server then skips drawing altogether (the fast path)."""
        return self != _QUIET

    def draw(self, rng: random.Random, order_number: str | None, now: float) -> Outcome | None:
        """The fault for one request, or None to answer it normally."""
        if order_number is not None and order_number in self.reject_order_numbers:
            body = _validation_body("order_number", "rejected by this system (sandbox reject_order_numbers)")
            return Outcome("reject", status=400, body=body)
        picked = self._pick(rng.random()) if any(getattr(self, p) for p in PROBABILITIES) else None
        delay_s = self.latency_ms / 1000
        if self.latency_jitter_ms:
            delay_s += rng.random() * self.latency_jitter_ms / 1000
        reset = bool(self.p_reset_after_effect) and rng.random() < self.p_reset_after_effect
        if picked is None:
            if reset:
                return Outcome("p_reset_after_effect", delay_s=delay_s, reset_after_effect=True)
            return Outcome("latency", delay_s=delay_s) if delay_s else None
        status = _STATUS_OF[picked]
        retry_after = None
        if status == 429 or (status == 503 and self.retry_after_on_503):
            retry_after = retry_after_value(self.retry_after, http_date=self.retry_after_http_date, now=now)
        if picked == "p_timeout":
            delay_s = self.timeout_s
        body = _validation_body(self.p400_field, "is not valid") if status == 400 else error_body(status)
        return Outcome(picked, delay_s=delay_s, status=status, body=body, retry_after=retry_after)

    def _pick(self, r: float) -> str | None:
        for name in PROBABILITIES:
            r -= getattr(self, name)
            if r < 0:
                return name
        return None


_QUIET: Final = Faults()


@dataclass(frozen=True, slots=True)
class Step:
    """One scripted answer. ``times`` repeats it; ``match_*`` limit which requests consume it."""

    status: int | None = None
    body: Any = None
    retry_after: int | str | None = None  # a str is sent verbatim: an HTTP-date or a deliberately broken value
    retry_after_http_date: bool = False
    delay_ms: float = 0.0
    reset: bool = False
    reset_after_effect: bool = False
    times: int = 1
    match_method: str | None = None
    match_order_number: str | None = None

    @classmethod
    def from_json(cls, data: object, where: str) -> Step:
        obj = dict(_object(data, where))
        match = _object(obj.pop("match", {}), f"{where}.match")
        if unknown := set(match) - {"method", "order_number"}:
            raise ConfigError(f"{where}.match: unknown keys {sorted(unknown)}; known: method, order_number")
        values: dict[str, Any] = {}
        if "method" in match:
            values["match_method"] = _string(match["method"], f"{where}.match.method").upper()
        if "order_number" in match:
            values["match_order_number"] = _string(match["order_number"], f"{where}.match.order_number")
        for key, value in obj.items():
            name = f"{where}.{key}"
            if key in ("status", "times"):
                values[key] = int(_number(value, name, integer=True, upper=599 if key == "status" else None))
            elif key == "retry_after":
                values[key] = value if isinstance(value, str) else int(_number(value, name, integer=True))
            elif key in ("reset", "reset_after_effect", "retry_after_http_date"):
                values[key] = _bool(value, name)
            elif key == "delay_ms":
                values[key] = _number(value, name)
            elif key == "body":
                values[key] = value
            else:
                raise ConfigError(
                    f"{name}: unknown step key; known: status, body, retry_after, "
                    "retry_after_http_date, delay_ms, reset, reset_after_effect, times, match"
                )
        step = cls(**values)
        actions = (step.status is not None) + step.reset + step.reset_after_effect
        if actions > 1 or (actions == 0 and not step.delay_ms):
            raise ConfigError(f"{where}: a step needs exactly one of status, reset, reset_after_effect (or delay_ms)")
        if step.status is not None and step.status < 100:
            raise ConfigError(f"{where}.status: {step.status} is not an HTTP status")
        if step.times < 1:
            raise ConfigError(f"{where}.times: must be at least 1")
        return step

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("match_")}
        data["match"] = {
            k: v for k, v in (("method", self.match_method), ("order_number", self.match_order_number)) if v
        }
        return data

    def matches(self, method: str, order_number: str | None) -> bool:
        return (self.match_method is None or self.match_method == method) and (
            self.match_order_number is None or self.match_order_number == order_number
        )

    def outcome(self, now: float) -> Outcome:
        retry_after = self.retry_after
        if isinstance(retry_after, int):
            retry_after = retry_after_value(retry_after, http_date=self.retry_after_http_date, now=now)
        body = self.body if self.body is not None or self.status is None else error_body(self.status)
        return Outcome(
            "script",
            delay_s=self.delay_ms / 1000,
            status=self.status,
            body=body,
            retry_after=retry_after,
            reset=self.reset,
            reset_after_effect=self.reset_after_effect,
        )


@dataclass(slots=True)
class _Pending:
    step: Step
    left: int


class Script:
    """The steps still to come for one system, consumed first-match-first."""

    __slots__ = ("_steps",)

    def __init__(self, steps: list[Step] | None = None) -> None:
        self._steps = [_Pending(step, step.times) for step in steps or ()]

    @classmethod
    def from_json(cls, data: object, where: str) -> Script:
        if not isinstance(data, list):
            raise ConfigError(f"{where}: expected a list of steps, got {type(data).__name__}")
        return cls([Step.from_json(item, f"{where}.{i}") for i, item in enumerate(data)])

    def take(self, method: str, order_number: str | None) -> Step | None:
        """Consume one use of the first step matching this request."""
        for i, pending in enumerate(self._steps):
            if pending.step.matches(method, order_number):
                pending.left -= 1
                if pending.left == 0:
                    del self._steps[i]
                return pending.step
        return None

    def remaining(self) -> list[dict[str, Any]]:
        return [{**pending.step.as_json(), "times": pending.left} for pending in self._steps]

    def __bool__(self) -> bool:
        return bool(self._steps)


@dataclass(frozen=True, slots=True)
class Auth:
    """A system's credentials: ``bearer:TOKEN``, ``basic:USER:PASSWORD``, ``header:NAME:VALUE``, or
    ``oauth2:CLIENT_ID:SECRET:LIFETIME_S``: bearer tokens that the sandbox's token endpoint issued to that client,
    valid for LIFETIME_S seconds (the sandbox checks those itself; `accepts` is for the fixed schemes).
    """

    scheme: str
    header: str
    expected: str
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    lifetime_s: float = 0.0

    @classmethod
    def parse(cls, spec: str, where: str) -> Auth:
        scheme, _, rest = spec.partition(":")
        if scheme == "bearer" and rest:
            return cls("bearer", "Authorization", f"Bearer {rest}")
        user, _, password = rest.partition(":")
        if scheme == "basic" and user and password:
            return cls("basic", "Authorization", "Basic " + base64.b64encode(rest.encode()).decode())
        if scheme == "header" and user and password:
            return cls(f"header:{user}", user, password)
        secret, _, lifetime = password.rpartition(":")
        if scheme == "oauth2" and user and secret and _positive(lifetime):
            return cls("oauth2", "Authorization", "", client_id=user, client_secret=secret, lifetime_s=float(lifetime))
        raise ConfigError(
            f"{where}: expected bearer:TOKEN, basic:USER:PASSWORD, header:NAME:VALUE or "
            "oauth2:CLIENT_ID:SECRET:LIFETIME_S"
        )

    def accepts(self, headers: Mapping[str, str]) -> bool:
        if self.scheme == "oauth2":
            return False  # only the sandbox knows which tokens it issued (`daemon.sandbox.Sandbox`)
        return hmac.compare_digest(headers.get(self.header, "").encode(), self.expected.encode())


def _positive(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value > 0


@dataclass(frozen=True, slots=True)
class SystemConfig:
    """How a system treats well-formed requests; faults are separate (`daemon.sandbox.faults.Faults`)."""

    auth: Auth | None = None
    idempotency: bool = True  # off: a downstream without key support, so duplicates reach the ledger
    unique_order_numbers: bool = True  # off: a second POST for a number creates a second order

    def updated(self, data: object, where: str) -> SystemConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        config = self
        for key, value in data.items():
            if key == "auth" and (value is None or isinstance(value, str)):
                config = replace(config, auth=None if value is None else Auth.parse(value, f"{where}.auth"))
            elif key == "idempotency" and isinstance(value, bool):
                config = replace(config, idempotency=value)
            elif key == "unique_order_numbers" and isinstance(value, bool):
                config = replace(config, unique_order_numbers=value)
            else:
                raise ConfigError(f"{where}.{key}: unknown key or bad value {value!r}")
        return config

    def as_json(self) -> dict[str, Any]:
        auth = None if self.auth is None else f"{self.auth.scheme}:***"
        return {"auth": auth, "idempotency": self.idempotency, "unique_order_numbers": self.unique_order_numbers}


def parse_faults(data: object, where: str = "faults") -> dict[str, Faults]:
    """``{"crm": {...}, "*": {...}}`` → faults per system; ``"*"`` is the default for systems not named."""
    return {system: Faults.from_json(value, f"{where}.{system}") for system, value in _object(data, where).items()}


def parse_scripts(data: object, where: str = "script") -> dict[str, Script]:
    """``{"crm": [step, ...]}`` → a script per system."""
    return {system: Script.from_json(value, f"{where}.{system}") for system, value in _object(data, where).items()}


def retry_after_value(seconds: int, *, http_date: bool, now: float) -> str:
    """Retry-After as delta-seconds, or as an HTTP-date rounded up so that it never asks for less than `seconds`."""
    if http_date:
        return formatdate(math.ceil(now) + seconds, usegmt=True)
    return str(seconds)


def error_body(status: int) -> dict[str, str]:
    """The error body of a fault: a stable code such as ``service_unavailable``."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = f"status {status}"
    return {"error": phrase.lower().replace(" ", "_").replace("-", "_"), "message": f"sandbox fault: {phrase}"}


def _validation_body(field: str, message: str) -> dict[str, Any]:
    return {"error": "validation_failed", "errors": [{"field": field, "message": message}]}


def _object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _number(value: object, where: str, *, upper: float | None = None, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        raise ConfigError(f"{where}: expected a{'n integer' if integer else ' number'}, got {value!r}")
    if not math.isfinite(value) or not 0 <= value <= (math.inf if upper is None else upper):
        raise ConfigError(f"{where}: {value!r} is out of range 0..{'∞' if upper is None else upper}")
    return float(value)


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return [_string(item, f"{where}.{i}") for i, item in enumerate(value)]
