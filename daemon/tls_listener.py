"""HTTPS on the webhook's listener: ``ingest.tls_certfile`` and ``ingest.tls_keyfile``, renewed by a reload.

A shop posts orders -- names, e-mail and postal addresses -- across the internet, and the shops' platforms send
webhooks to HTTPS endpoints only. Without these settings the listener speaks plain HTTP, for a TLS proxy or a
Kubernetes ingress in front of it; with them, it speaks HTTPS itself (TLS 1.2 and later, the Python defaults for
a server: no client certificates asked).

Certificates are renewed in place (certbot, cert-manager, an ACME client every 60-90 days), so `ServerTls.reload`
reads both files again on SIGHUP (``systemctl reload orderbus``). The listener's context is built once, with the
listening socket; each handshake is moved to the newest pair by the context's SNI callback, which OpenSSL calls
for every ClientHello, with a server name or without one. A pair that does not load is refused with the running
one kept: the files are checked as a whole before any handshake sees them.

When the certificate expires (`ServerTls.not_after`, read from the certificate itself: the ssl module says it of
a peer's only) is a metric for an alert weeks ahead, and said at start and at each reload: a warning within
`EXPIRY_WARNING`, an error once it has passed (every shop's webhook then fails its handshake).
"""

from __future__ import annotations

import logging
import re
import ssl
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from topics.errors import ConfigError

__all__ = ["EXPIRY_WARNING", "ServerTls", "certificate_expiry", "server_tls"]

log = logging.getLogger(__name__)

_CERT_KEY, _KEY_KEY = "ingest.tls_certfile", "ingest.tls_keyfile"
EXPIRY_WARNING: Final = 14 * 86400.0  # seconds before its end from which a certificate is said at WARNING
_PEM_CERTIFICATE: Final = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class ServerTls:
    """The listener's TLS context (`context`) and the certificate pair its handshakes use, which `reload` renews."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        """Load the pair; `ConfigError` naming the setting and the problem if it cannot be used."""
        self.cert_file, self.key_file = cert_file, key_file
        self._current, self.not_after = _load(cert_file, key_file)
        self.context = self._current  # the listener's, for good; its callback moves each handshake to `_current`
        self.context.sni_callback = self._use_current

    def reload(self) -> None:
        """Read both files again; the next handshakes use them. `ConfigError` (and the pair in use kept) if they do
        not load."""
        self._current, self.not_after = _load(self.cert_file, self.key_file)

    def say_expiry(self, now: float) -> None:
        """Log when the certificate in use expires: INFO, WARNING within `EXPIRY_WARNING`, ERROR once past."""
        expires = datetime.fromtimestamp(self.not_after, UTC).isoformat(timespec="seconds")
        fields = {"certfile": str(self.cert_file), "expires": expires}
        if self.not_after <= now:
            log.error("the webhook's certificate has expired: clients refuse it; renew it, then reload", extra=fields)
        elif self.not_after - now <= EXPIRY_WARNING:
            days = (self.not_after - now) / 86400
            log.warning("the webhook's certificate expires in %.1f days; renew it, then reload", days, extra=fields)
        else:
            log.info("the webhook's certificate in use", extra=fields)

    def _use_current(self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _: ssl.SSLContext) -> None:
        connection.context = self._current


def server_tls(cert_file: Path | None, key_file: Path | None) -> ServerTls | None:
    """The listener's TLS for the two settings (both or neither: the settings check that), None for plain HTTP."""
    if cert_file is None or key_file is None:
        return None
    tls = ServerTls(cert_file, key_file)
    mode = stat.S_IMODE(key_file.stat().st_mode)
    if mode & 0o004:  # group-readable is the ssl-cert group's way (0640); readable by all is not a key any more
        log.warning(
            "insecure setting: %s %s can be read by every user of this host (mode %04o); chmod o-r it",
            _KEY_KEY,
            key_file,
            mode,
        )
    return tls


def certificate_expiry(pem: str) -> float:
    """The end of the validity (unix seconds) of the first certificate in `pem`; `ValueError` if it has none that
    can be read. The ssl module decodes a peer's certificate only, so the DER is walked to its ``notAfter``:
    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
    validity SEQUENCE { notBefore, notAfter }, ... }, ... } (RFC 5280, 4.1)."""
    found = _PEM_CERTIFICATE.search(pem)
    if found is None:
        raise ValueError("no PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(found.group(0))
    _, certificate, _ = _element(der, 0)
    _, field, _ = _element(der, certificate)  # tbsCertificate: its first element
    at = field
    if der[at] == 0xA0:  # the explicit version
        _, _, at = _element(der, at)
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, at = _element(der, at)
    _, validity, _ = _element(der, at)
    _, _, after = _element(der, validity)  # past notBefore
    kind, start, end = _element(der, after)
    text = der[start:end].decode("ascii")
    if kind == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049
        year = int(text[:2])
        text = f"{19 if year >= 50 else 20}{text}"
    elif kind != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        raise ValueError(f"notAfter of an unknown type 0x{kind:02x}")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC).timestamp()


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


def _load(cert_file: Path, key_file: Path) -> tuple[ssl.SSLContext, float]:
    """The pair as a server's context, and when its certificate expires."""
    cert_text = _read(cert_file, _CERT_KEY)
    key_text = _read(key_file, _KEY_KEY)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(f"{_CERT_KEY}: {cert_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if "PRIVATE KEY-----" not in key_text:
        raise ConfigError(f"{_KEY_KEY}: {key_file} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
    if "ENCRYPTED" in key_text:
        raise ConfigError(
            f"{_KEY_KEY}: {key_file} is encrypted; give the key unencrypted, in a file only the service's user can read"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{_KEY_KEY}: {key_file} is not the private key of {cert_file}") from None
        reason = exc.reason or exc
        raise ConfigError(f"{_CERT_KEY}/{_KEY_KEY}: {cert_file} and {key_file} do not load ({reason})") from None
    try:
        not_after = certificate_expiry(cert_text)
    except (ValueError, IndexError) as exc:  # loaded by OpenSSL, so not expected: said, not a traceback
        raise ConfigError(f"{_CERT_KEY}: {cert_file}: its validity cannot be read ({exc})") from None
    return context, not_after


def _read(path: Path, key: str) -> str:
    try:
        return path.read_text("ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def _no_password() -> str:
    # Never a prompt on the terminal: a key that asks for one is refused (`_load` says so first when it can).
    raise ConfigError(f"{_KEY_KEY}: the key asks for a password; give it unencrypted")
