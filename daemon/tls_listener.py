"""HTTPS on the webhook's listener: ``ingest.tls_certfile`` and ``ingest.tls_keyfile``, renewed by a reload.

A shop posts orders -- names, e-mail and postal addresses -- across the internet, and the shops' platforms send
webhooks to HTTPS endpoints only. Without these settings the listener speaks plain HTTP, for a TLS proxy or a
Kubernetes ingress in front of it; with them, it speaks HTTPS itself (TLS 1.2 and later, the Python defaults for
a server: no client certificates asked).

Certificates are renewed in place (certbot, cert-manager, an ACME client every 60-90 days), so `ServerTls.reload`
reads both files again on SIGHUP (``systemctl reload orderbus``). The listener's context is built once, with the
listening socket; each handshake is moved to the newest pair by the context's SNI callback, which OpenSSL calls
for every ClientHello, with a server name or without one. A pair that does not load is refused with the running
one kept: the files are checked as a whole before any handshake sees them; so is, while the one in use is valid,
a certificate that is not (expired, or not valid yet: a clock or a renewal gone wrong would fail every handshake).

When the certificate expires (`ServerTls.not_after`, read from the certificate itself: the ssl module decodes a
peer's only) is a metric for an alert weeks ahead, and said at start, at each reload and by ``config check``: a
warning within `EXPIRY_WARNING`, an error once it has passed (every shop's webhook then fails its handshake).
"""

from __future__ import annotations

import logging
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from daemon.key_pairs import CertificateEnd, load_pair, read_pem, refuse_unless_valid, validity
from topics.errors import ConfigError

__all__ = ["ServerTls", "server_tls"]

log = logging.getLogger(__name__)

_CERT_KEY, _KEY_KEY = "ingest.tls_certfile", "ingest.tls_keyfile"


class ServerTls:
    """The listener's TLS context (`context`) and the certificate pair its handshakes use, which `reload` renews."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        """Load the pair; `ConfigError` naming the setting and the problem if it cannot be used."""
        self.cert_file, self.key_file = cert_file, key_file
        self._current = _load(cert_file, key_file)
        self.context = self._current.context  # the listener's, for good; its callback moves each handshake on
        self.context.sni_callback = self._use_current

    @property
    def not_after(self) -> float:
        """When the certificate in use expires (unix seconds)."""
        return self._current.not_after

    @property
    def end(self) -> CertificateEnd:
        """When the certificate in use expires, and how that is said."""
        return CertificateEnd(
            "the webhook's certificate", self.cert_file, self.not_after, "clients refuse it",
            "renew it, then reload (restart, under systemd credentials)",
        )  # fmt: skip

    def reload(self, now: float) -> bool:
        """Read both files again; the next handshakes use them. Whether the certificate changed. `ConfigError`, and
        the pair in use kept, if they do not load, or if their certificate is not valid at `now` while the one in
        use is."""
        fresh = _load(self.cert_file, self.key_file)
        in_use = (self._current.not_before, self._current.not_after)
        refuse_unless_valid(_CERT_KEY, self.cert_file, (fresh.not_before, fresh.not_after), in_use, now)
        changed = fresh.der != self._current.der
        self._current = fresh
        return changed

    def _use_current(self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _: ssl.SSLContext) -> None:
        connection.context = self._current.context


@dataclass(frozen=True, slots=True)
class _Pair:
    """A loaded pair: the context that serves it, and its certificate's DER and validity (unix seconds)."""

    context: ssl.SSLContext
    der: bytes
    not_before: float
    not_after: float


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


def _load(cert_file: Path, key_file: Path) -> _Pair:
    """The pair as a server's context, with its certificate's DER and validity."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert_text = load_pair(context, cert_file, key_file, cert_key=_CERT_KEY, key_key=_KEY_KEY)
    if read_pem(cert_file, _CERT_KEY) != cert_text:  # what OpenSSL loaded may not be what was read: said, not guessed
        raise ConfigError(f"{_CERT_KEY}: {cert_file} changed while it was read (a renewal under way?); reload again")
    der, not_before, not_after = validity(cert_text, cert_file, _CERT_KEY)  # loaded by OpenSSL: not expected to fail
    return _Pair(context, der, not_before, not_after)
