"""The certificate the daemon's Kafka clients show the brokers (``kafka.ssl_certfile``), renewed at a reload.

Every client of a run (the ingest's producer, the sinks' consumers, the dead-letter producer, the admin client)
shares one TLS context (`daemon.kafka_options.client_options`, built once). A reload (SIGHUP) reads the pair
again and loads it into that context: the next connections show the new certificate, those open keep theirs (a
broker checks a client certificate at the handshake only). A pair that does not load, or a certificate not valid
now while the one in use is, keeps the one in use; the new pair is tried on a context of its own first, so that
half a pair never reaches the shared one.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from daemon.key_pairs import CertificateEnd, load_pair, read_pem, text_time, validity
from daemon.settings import KafkaSettings
from topics.errors import ConfigError

__all__ = ["KafkaCertificate", "kafka_certificate", "kafka_certificate_end"]

_CERT_KEY, _KEY_KEY = "kafka.ssl_certfile", "kafka.ssl_keyfile"


def kafka_certificate_end(cert_file: Path, not_after: float) -> CertificateEnd:
    """When the Kafka client certificate from `cert_file` expires, and how that is said."""
    return CertificateEnd(
        "the Kafka client certificate", cert_file, not_after,
        "the brokers refuse it: orderbus can neither publish nor deliver",
        "renew it, then reload orderbus (restart, under systemd credentials)",
    )  # fmt: skip


class KafkaCertificate:
    """The client certificate in the clients' shared TLS `context`, and when it expires (`end`)."""

    def __init__(self, context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
        """`context` holds the pair already (`client_options` loaded it); its validity is read here."""
        self._context = context
        self.cert_file, self.key_file = cert_file, key_file
        self._der, self._not_before, self._not_after = _validity(cert_file)

    @property
    def not_after(self) -> float:
        """When the certificate in use expires (unix seconds)."""
        return self._not_after

    @property
    def end(self) -> CertificateEnd:
        return kafka_certificate_end(self.cert_file, self._not_after)

    def reload(self, now: float) -> bool:
        """Read both files again; the next connections show them. Whether the certificate changed. `ConfigError`,
        and the pair in use kept, if they do not load, or if their certificate is not valid at `now` while the one
        in use is."""
        trial = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        load_pair(trial, self.cert_file, self.key_file, cert_key=_CERT_KEY, key_key=_KEY_KEY)
        der, not_before, not_after = _validity(self.cert_file)
        in_use_valid = self._not_before <= now < self._not_after
        if not not_before <= now < not_after and in_use_valid:
            raise ConfigError(
                f"{_CERT_KEY}: {self.cert_file} is valid from {text_time(not_before)} to {text_time(not_after)}, not "
                f"now; the one in use is, until {text_time(self._not_after)}"
            )
        load_pair(self._context, self.cert_file, self.key_file, cert_key=_CERT_KEY, key_key=_KEY_KEY)
        changed = der != self._der
        self._der, self._not_before, self._not_after = der, not_before, not_after
        return changed


def kafka_certificate(kafka: KafkaSettings, options: dict[str, Any]) -> KafkaCertificate | None:
    """The client certificate of `options` (built by `client_options` from `kafka`), None without one."""
    context = options.get("ssl_context")
    if kafka.ssl_certfile is None or kafka.ssl_keyfile is None or not isinstance(context, ssl.SSLContext):
        return None
    return KafkaCertificate(context, kafka.ssl_certfile, kafka.ssl_keyfile)


def _validity(cert_file: Path) -> tuple[bytes, float, float]:
    return validity(read_pem(cert_file, _CERT_KEY), cert_file, _CERT_KEY)
