"""Standard Webhooks signatures (https://www.standardwebhooks.com): verify what the shop sends, sign ours.

A request carries three headers::

    webhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek
    webhook-timestamp: 1614265330
    webhook-signature: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,<another>

and ``v1`` is ``base64(HMAC-SHA256(key, f"{id}.{timestamp}.".encode() + body))``. The timestamp is signed,
so an old request cannot be replayed outside the tolerance window; the id stays the same across the sender's
retries.

Secrets: ``whsec_<base64>`` is the standard form and the key is the decoded bytes (padding may be omitted, as
the reference libraries allow). A secret *without* the prefix is taken as raw text and the key is its UTF-8
bytes, so a secret pasted from a provider that hands out plain strings works without re-encoding. This differs
from the reference libraries, which base64-decode a prefix-less secret too; give base64 keys the prefix.

Rotation: several secrets may be active; a request is valid if any secret matches any ``v1`` entry, so the
sender can switch keys (or send both signatures) while we accept old and new.

Every `SignatureError` reason is safe to return to the client: it names what is wrong with the request and
never contains a secret or the signature we expected.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, NamedTuple

from topics.errors import ConfigError, OrderbusError

__all__ = [
    "ID_HEADER",
    "SECRET_PREFIX",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "SignatureError",
    "WebhookVerifier",
    "sign",
]

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"  # noqa: S105 -- the standard's marker for a base64 secret, not a secret

_VERSION = "v1"
# An optional sign and ASCII digits only: int() alone would also take "+1", " 1", "1_0" and non-ASCII digits.
_INTEGER = re.compile(r"-?[0-9]+")
# Far outside any window either way; checked before int(), which is slow on (and refuses) huge digit strings.
_MAX_TIMESTAMP_CHARS = 19


class SignatureError(OrderbusError):
    """The request's signature headers are missing, malformed, outside the time window or do not match.

    `reason` is meant for the client (HTTP 401 body): specific, and free of secret material.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value (one ``v1`` entry) for `body`, as a Standard Webhooks sender."""
    key = secret_key(secret, "webhook secret")
    return f"{_VERSION},{base64.b64encode(_digest(key, msg_id, str(timestamp), body)).decode('ascii')}"


class Signed(NamedTuple):
    """A request's signature headers, present and fresh (`WebhookVerifier.check_headers`)."""

    msg_id: str
    timestamp: str
    signatures: list[bytes]  # the ``v1`` entries, decoded


class WebhookVerifier:
    """Checks the Standard Webhooks headers of an incoming request against one or more active secrets.

    `clock` returns wall-clock unix seconds; tests inject a fixed one. Requests whose timestamp is more than
    `tolerance` seconds away from it (either way) are rejected; exactly `tolerance` is still accepted.
    """

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        tolerance: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(secrets, str):
            # A lone string is a Sequence[str] too; iterating it would make one secret per character.
            raise ConfigError("webhook_secrets must be a list of secrets, not a single string")
        if not secrets:
            raise ConfigError("webhook_secrets: at least one secret is required to verify webhooks")
        if tolerance < 0:
            raise ConfigError(f"signature tolerance must be >= 0 seconds (got {tolerance})")
        self._keys = tuple(secret_key(s, f"webhook_secrets[{i}]") for i, s in enumerate(secrets))
        self._tolerance = tolerance
        self._clock = clock

    def __repr__(self) -> str:
        return f"WebhookVerifier(<{len(self._keys)} secret(s)>, tolerance={self._tolerance})"

    def verify(self, headers: Mapping[str, str], body: bytes) -> str:
        """Return the webhook id if the request is authentic and fresh, else raise `SignatureError`.

        Checks run in this order, so the reason names the first problem: headers present, timestamp an
        integer, timestamp within the tolerance, then some ``v1`` entry matching some secret.
        """
        return self.matches(self.check_headers(headers), body)

    def check_headers(self, headers: Mapping[str, str]) -> Signed:
        """The headers' part of `verify`: present, the timestamp fresh, a ``v1`` entry offered; `SignatureError`
        otherwise. Cheap, and asked before the body is read: an unsigned or stale request, or one whose signature
        header holds nothing to compare, then holds no share of the body buffer."""
        msg_id = _header(headers, ID_HEADER)
        raw_timestamp = _header(headers, TIMESTAMP_HEADER)
        raw_signatures = " ".join(_every_line(headers, SIGNATURE_HEADER)) or _header(headers, SIGNATURE_HEADER)
        self._check_timestamp(raw_timestamp)
        return Signed(msg_id, raw_timestamp, _v1_signatures(raw_signatures))

    def matches(self, signed: Signed, body: bytes) -> str:
        """The body's part of `verify`, for headers `check_headers` passed: the webhook id, or `SignatureError`."""
        msg_id, raw_timestamp, offered = signed
        # The timestamp is signed as sent (not re-formatted), exactly the bytes the sender hashed.
        expected = [_digest(key, msg_id, raw_timestamp, body) for key in self._keys]
        for candidate in offered:
            for digest in expected:
                if hmac.compare_digest(candidate, digest):
                    return msg_id
        raise SignatureError(f"no {_VERSION} signature in {SIGNATURE_HEADER} matches")

    def _check_timestamp(self, raw: str) -> None:
        if not _INTEGER.fullmatch(raw):
            raise SignatureError(f"{TIMESTAMP_HEADER} is not an integer (unix seconds)")
        if len(raw) > _MAX_TIMESTAMP_CHARS:
            age = math.inf if raw.startswith("-") else -math.inf
        else:
            age = self._clock() - int(raw)
        if age > self._tolerance:
            raise SignatureError(
                f"{TIMESTAMP_HEADER} is too old (more than {self._tolerance:g} s ago): a retry keeps its webhook-id "
                "and is signed again with the current time"
            )
        if -age > self._tolerance:
            # Milliseconds (13 digits today) are the usual cause: a thousand times ahead.
            unit = "; it is in seconds, not milliseconds" if -age > 100 * self._clock() else ""
            raise SignatureError(f"{TIMESTAMP_HEADER} is too new (more than {self._tolerance:g} s ahead){unit}")


def _header(headers: Mapping[str, str], name: str) -> str:
    # aiohttp's headers are case-insensitive already; a plain dict (tests, other callers) may not be.
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    if not value:
        raise SignatureError(f"missing header {name}")
    return value


def _every_line(headers: Mapping[str, str], name: str) -> list[str]:
    """Every line of header `name` when `headers` keeps them all (aiohttp's do): a sender rotating its secret may
    put each signature on a line of its own, where ``get`` reads the first only."""
    getall = getattr(headers, "getall", None)
    return [] if getall is None else list(getall(name, []))


def _v1_signatures(raw: str) -> list[bytes]:
    """The decoded ``v1`` entries; other versions are skipped, as the spec asks, and so is bad base64. Entries are
    separated by spaces; a proxy that joins two lines of the header into one puts ``, `` between them, so a comma
    ending an entry is the separator's (base64 has none)."""
    decoded: list[bytes] = []
    seen_v1 = False
    for entry in raw.split():
        version, comma, value = entry.rstrip(",").partition(",")
        if not comma or version != _VERSION:
            continue
        seen_v1 = True
        try:
            decoded.append(base64.b64decode(value, validate=True))
        except ValueError:  # binascii.Error, or non-ASCII text
            continue
    if not seen_v1:
        raise SignatureError(f"{SIGNATURE_HEADER} has no {_VERSION} entry")
    return decoded


def _digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    try:
        prefix = f"{msg_id}.{timestamp}.".encode()
    except UnicodeEncodeError:
        # Only reachable with a header value that is not text (lone surrogates); it cannot have been signed.
        raise SignatureError(f"{ID_HEADER} is not valid UTF-8") from None
    return hmac.new(key, prefix + body, hashlib.sha256).digest()


# Shorter keys are guessed offline from one signed request; Standard Webhooks' own secrets are 24 to 64 bytes.
MIN_SECRET_BYTES: Final = 16


def secret_key(secret: str, label: str) -> bytes:
    """The HMAC key for `secret`; errors (`ConfigError`) name `label` and never echo the secret."""
    if secret.startswith(SECRET_PREFIX):
        encoded = secret.removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except ValueError:
            raise ConfigError(f"{label}: the part after {SECRET_PREFIX!r} is not valid base64") from None
    else:
        try:
            key = secret.encode()
        except UnicodeEncodeError:
            raise ConfigError(f"{label} is not valid text (UTF-8)") from None
    if not key:
        raise ConfigError(f"{label} is empty")
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{label} is too short: {len(key)} bytes, at least {MIN_SECRET_BYTES} (a Standard Webhooks secret is "
            f"{SECRET_PREFIX} and the base64 of 24 to 64 random bytes: `openssl rand -base64 32`)"
        )
    return key
