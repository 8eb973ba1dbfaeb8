"""PEM certificates and their keys: a pair loaded into a TLS context with an error that names the setting and why,
a certificate's validity read from the certificate itself, and its end said at the level it deserves.

Two settings take such a pair: the webhook's HTTPS listener (``ingest.tls_certfile``/``tls_keyfile``, a server's
certificate, `daemon.tls_listener`) and the Kafka client's certificate for brokers that ask for one
(``kafka.ssl_certfile``/``ssl_keyfile``, `daemon.kafka_options`). OpenSSL's own errors for a wrong file are
"PEM lib" or "KEY_VALUES_MISMATCH"; these say which file, which setting, and what to give instead. Either
certificate's end is a metric with alerts weeks ahead (`daemon.ingest_metrics`): once it has passed, the shops'
webhooks, or every broker, refuse orderbus.
"""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from topics.errors import ConfigError

__all__ = [
    "EXPIRY_WARNING",
    "CertificateEnd",
    "certificate_validity",
    "load_pair",
    "pem_certificates",
    "read_pem",
    "text_time",
]

log = logging.getLogger(__name__)


EXPIRY_WARNING: Final = 14 * 86400.0  # seconds before its end from which a certificate is said at WARNING
_PEM_CERTIFICATE: Final = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def load_pair(
    context: ssl.SSLContext,
    cert_file: Path,
    key_file: Path,
    *,
    cert_key: str,
    key_key: str,
    shown_as: tuple[Path, Path] | None = None,
) -> str:
    """Load `cert_file` (a PEM certificate, its chain after it) and `key_file` (its unencrypted PEM key) into
    `context`; the certificate file's text as read. `ConfigError` naming the setting (`cert_key`, `key_key`) if the
    pair cannot be used: a file that cannot be read, no PEM certificate or key, an encrypted key (never a password
    prompt), a key that is not the certificate's. `shown_as`: the files to name instead (of private copies)."""
    cert_text = read_pem(cert_file, cert_key)
    key_text = read_pem(key_file, key_key)
    cert_name, key_name = shown_as if shown_as is not None else (cert_file, key_file)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(f"{cert_key}: {cert_name} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if "PRIVATE KEY-----" not in key_text:
        raise ConfigError(f"{key_key}: {key_name} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
    if "ENCRYPTED" in key_text:
        raise ConfigError(
            f"{key_key}: {key_name} is encrypted; give the key unencrypted, in a file only the service's user can read"
        )

    def no_password() -> str:
        # Never a prompt on the terminal: a key that asks for one is refused (said above when it can be seen).
        raise ConfigError(f"{key_key}: the key asks for a password; give it unencrypted")

    try:
        context.load_cert_chain(cert_file, key_file, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{key_key}: {key_name} is not the private key of {cert_name}") from None
        reason = exc.reason or exc
        raise ConfigError(f"{cert_key}/{key_key}: {cert_name} and {key_name} do not load ({reason})") from None
    except OSError as exc:  # gone or closed to us since it was read: a renewal swapping its files
        raise ConfigError(f"{cert_key}/{key_key}: cannot read {cert_name} or {key_name}: {exc}") from None
    return cert_text


def read_pem(path: Path, key: str) -> str:
    """The text of `path`; `ConfigError` naming the setting `key` if it cannot be read."""
    try:
        return path.read_text("ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def pem_certificates(pem: str) -> list[str]:
    """The PEM certificate blocks of `pem` (`read_pem`'s text), in order; what stands between them is left out."""
    return _PEM_CERTIFICATE.findall(pem)


@dataclass(frozen=True, slots=True)
class CertificateEnd:
    """When a certificate in use (`subject`, from `cert_file`) expires, and how that is said: what follows once it has
    (`consequence`) and what to do (`renewal`). The webhook's (`daemon.tls_listener`), the Kafka client's
    (`daemon.kafka_certificate`)."""

    subject: str
    cert_file: Path
    not_after: float
    consequence: str
    renewal: str

    @property
    def expires(self) -> str:
        return text_time(self.not_after)

    def problem(self, now: float) -> str | None:
        """What is wrong with the end at `now`: expired, or within `EXPIRY_WARNING`; None if neither."""
        left = self.not_after - now
        if left <= 0:
            return f"{self.subject} expired at {self.expires}: {self.consequence}"
        if left <= EXPIRY_WARNING:
            return f"{self.subject} expires in {left / 86400:.1f} days, at {self.expires}"
        return None

    def say(self, now: float) -> None:
        """Log when it expires: INFO, WARNING within `EXPIRY_WARNING`, ERROR once past, with what to do."""
        fields = {"certfile": str(self.cert_file), "expires": self.expires}
        problem = self.problem(now)
        if problem is None:
            log.info("%s in use", self.subject, extra=fields)
        else:
            level = logging.ERROR if self.not_after <= now else logging.WARNING
            log.log(level, "%s; %s", problem, self.renewal, extra=fields)

    def document(self, now: float) -> dict[str, object]:
        """As the status document holds it (`orderbus status` shows it)."""
        return {
            "certfile": str(self.cert_file),
            "expires": self.expires,
            "seconds_left": round(self.not_after - now),
            "problem": self.problem(now),  # expired, or within 14 days; None otherwise
            "renewal": self.renewal,  # what to do, in the daemon's words: `orderbus status` says it with the problem
        }


def refuse_unless_valid(
    key: str, path: Path, fresh: tuple[float, float], in_use: tuple[float, float], now: float
) -> None:
    """A renewal's rule: `ConfigError` when the certificate read from `path` (setting `key`) is not valid at `now`
    (`fresh`: its start and end, unix seconds) while the one in use (`in_use`) is. A certificate no better than
    the one in use is taken: nothing is lost by it."""

    def valid(window: tuple[float, float]) -> bool:
        return window[0] <= now < window[1]

    if not valid(fresh) and valid(in_use):
        raise ConfigError(
            f"{key}: {path} is valid from {text_time(fresh[0])} to {text_time(fresh[1])}, not now; the one in use "
            f"is, until {text_time(in_use[1])}"
        )


def validity(pem: str, path: Path, key: str) -> tuple[bytes, float, float]:
    """`certificate_validity` of `path`'s text `pem`, a `ConfigError` naming the setting `key` if it cannot be read."""
    try:
        return certificate_validity(pem)
    except ValueError as exc:
        raise ConfigError(f"{key}: {path}: its validity cannot be read ({exc})") from None


def certificate_validity(pem: str) -> tuple[bytes, float, float]:
    """The first certificate in `pem`: its DER, and the start and end of its validity (unix seconds); `ValueError`
    if it has none that can be read. The ssl module decodes a peer's certificate only, so the DER is walked:
    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
    validity SEQUENCE { notBefore, notAfter }, ... }, ... } (RFC 5280, 4.1)."""
    found = _PEM_CERTIFICATE.search(pem)
    if found is None:
        raise ValueError("no PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(found.group(0))
    try:
        _, certificate, _ = _element(der, 0)
        _, at, _ = _element(der, certificate)  # tbsCertificate: its first element
        if der[at] == 0xA0:  # the explicit version
            _, _, at = _element(der, at)
        for _ in range(3):  # serialNumber, signature, issuer
            _, _, at = _element(der, at)
        _, validity, _ = _element(der, at)
        kind, start, end = _element(der, validity)
        not_before = _time(kind, der[start:end])
        kind, start, end = _element(der, end)
        return der, not_before, _time(kind, der[start:end])
    except IndexError:
        raise ValueError("the certificate ends inside an element") from None


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """The DER element at `at`: its tag, where its content starts and where it ends."""
    tag, length = der[at], der[at + 1]
    start = at + 2
    if length & 0x80:
        size = length & 0x7F
        length, start = int.from_bytes(der[start : start + size], "big"), start + size
    if start + length > len(der):
        raise ValueError("a DER element runs past the certificate's end")
    return tag, start, start + length


def _time(kind: int, value: bytes) -> float:
    """A UTCTime (YYMMDDHHMMSSZ, years 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ) as unix seconds."""
    text = value.decode("ascii")
    if kind == 0x17:
        text = f"{19 if int(text[:2]) >= 50 else 20}{text}"
    elif kind != 0x18:
        raise ValueError(f"a validity time of an unknown type 0x{kind:02x}")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC).timestamp()


def text_time(when: float) -> str:
    """`when` (unix seconds) as an ISO 8601 time in UTC."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")
