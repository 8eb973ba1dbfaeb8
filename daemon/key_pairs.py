"""A PEM certificate and its private key, loaded into a TLS context with an error that names the setting and why.

Two settings take such a pair: the webhook's HTTPS listener (``ingest.tls_certfile``/``tls_keyfile``, a server's
certificate, `daemon.tls_listener`) and the Kafka client's certificate for brokers that ask for one
(``kafka.ssl_certfile``/``ssl_keyfile``, `daemon.kafka_options`). OpenSSL's own errors for a wrong file are
"PEM lib" or "KEY_VALUES_MISMATCH"; these say which file, which setting, and what to give instead.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from topics.errors import ConfigError

__all__ = ["load_pair", "read_pem"]


def load_pair(context: ssl.SSLContext, cert_file: Path, key_file: Path, *, cert_key: str, key_key: str) -> str:
    """Load `cert_file` (a PEM certificate, its chain after it) and `key_file` (its unencrypted PEM key) into
    `context`; the certificate file's text as read. `ConfigError` naming the setting (`cert_key`, `key_key`) if the
    pair cannot be used: a file that cannot be read, no PEM certificate or key, an encrypted key (never a password
    prompt), a key that is not the certificate's."""
    cert_text = read_pem(cert_file, cert_key)
    key_text = read_pem(key_file, key_key)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(f"{cert_key}: {cert_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if "PRIVATE KEY-----" not in key_text:
        raise ConfigError(f"{key_key}: {key_file} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
    if "ENCRYPTED" in key_text:
        raise ConfigError(
            f"{key_key}: {key_file} is encrypted; give the key unencrypted, in a file only the service's user can read"
        )

    def no_password() -> str:
        # Never a prompt on the terminal: a key that asks for one is refused (said above when it can be seen).
        raise ConfigError(f"{key_key}: the key asks for a password; give it unencrypted")

    try:
        context.load_cert_chain(cert_file, key_file, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{key_key}: {key_file} is not the private key of {cert_file}") from None
        reason = exc.reason or exc
        raise ConfigError(f"{cert_key}/{key_key}: {cert_file} and {key_file} do not load ({reason})") from None
    except OSError as exc:  # gone or closed to us since it was read: a renewal swapping its files
        raise ConfigError(f"{cert_key}/{key_key}: cannot read {cert_file} or {key_file}: {exc}") from None
    return cert_text


def read_pem(path: Path, key: str) -> str:
    """The text of `path`; `ConfigError` naming the setting `key` if it cannot be read."""
    try:
        return path.read_text("ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
