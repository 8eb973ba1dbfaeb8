"""The CAs the daemon's Kafka clients trust (``kafka.ssl_cafile``), read again at a reload.

Every client of a run shares one TLS context (`daemon.kafka_options.client_options`). A cluster's CA is rotated by
trusting the new CA beside the old one (the file holds both) before the brokers show certificates it signed. A
reload (SIGHUP) adds what the file holds now to that context: the next connections trust it, without a restart.
OpenSSL adds to a context's trust store and never takes from it, so a CA dropped from the file stays trusted until a
restart; the reload's line says how many CAs are trusted and how many came new. A file that cannot be read or holds
no certificate changes nothing (`ConfigError` naming the setting), checked on a context of its own first.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.key_pairs import pem_certificates, read_pem
from daemon.settings import KafkaSettings
from topics.errors import ConfigError

__all__ = ["KafkaTrust", "Trusted", "kafka_trust"]

_KEY = "kafka.ssl_cafile"


@dataclass(frozen=True, slots=True)
class Trusted:
    """After a reload: the certificates the clients trust, and how many of them the reload added."""

    total: int
    new: int


class KafkaTrust:
    """The clients' shared TLS `context` and the CA file it was built from."""

    def __init__(self, context: ssl.SSLContext, ca_file: Path) -> None:
        self._context, self.ca_file = context, ca_file

    def reload(self) -> Trusted:
        """Add the certificates the file holds now to the shared context; `ConfigError` (nothing changed) if it
        cannot. Only its PEM certificate blocks are taken, as OpenSSL reads a ``cafile`` at start: a bundle's
        comments between them (certifi's name issuers in UTF-8) are no error."""
        blocks = pem_certificates(read_pem(self.ca_file, _KEY))
        if not blocks:
            raise ConfigError(f"{_KEY}: {self.ca_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        pem = "\n".join(blocks)
        try:
            ssl.create_default_context(cadata=pem)  # one block that does not load stops the reload here, whole
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"{_KEY}: {self.ca_file} holds a certificate that does not load: {exc}") from None
        before = self._count()
        self._context.load_verify_locations(cadata=pem)
        total = self._count()
        return Trusted(total, total - before)

    def _count(self) -> int:
        # Every certificate trusted, not only those marked CA: a broker's self-signed certificate may be one.
        return int(self._context.cert_store_stats()["x509"])


def kafka_trust(kafka: KafkaSettings, options: dict[str, Any]) -> KafkaTrust | None:
    """The CA file's trust in `options` (built by `client_options` from `kafka`), None without a CA file."""
    context = options.get("ssl_context")
    if kafka.ssl_cafile is None or not isinstance(context, ssl.SSLContext):
        return None
    return KafkaTrust(context, kafka.ssl_cafile)
