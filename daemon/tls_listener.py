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
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

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
        self.context = _load(cert_file, key_file)
        self.context.sni_callback = self._use_current

    def reload(self) -> None:
        """Read both files again; the next handshakes use them. `ConfigError` (and the pair in use kept) if they do
        not load."""
        self._current = _load(self.cert_file, self.key_file)

    def _use_current(self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _: ssl.SSLContext) -> None:
        connection.context = self._current


def server_tls(cert_file: Path | None, key_file: Path | None) -> ServerTls | None:
    """The listener's TLS for the two settings (both or neither: the settings check that), None for plain HTTP."""
    if cert_file is None or key_file is None:
        return None
    return ServerTls(cert_file, key_file)


def _load(cert_file: Path, key_file: Path) -> ssl.SSLContext:
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
    return context


def _read(path: Path, key: str) -> str:
    try:
        return path.read_text("ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def _no_password() -> str:
    # Never a prompt on the terminal: a key that asks for one is refused (`_load` says so first when it can).
    raise ConfigError(f"{_KEY_KEY}: the key asks for a password; give it unencrypted")
