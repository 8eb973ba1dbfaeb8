"""The certificate the daemon's Kafka clients show the brokers (``kafka.ssl_certfile``), renewed at a reload.

Every client of a run (the ingest's producer, the sinks' consumers, the dead-letter producer, the admin client)
shares one TLS context (`daemon.kafka_options.client_options`, built once). A reload (SIGHUP) reads the pair
again and loads it into that context: the next connections show the new certificate, those open keep theirs (a
broker checks a client certificate at the handshake only). A pair that does not load, or a certificate not valid
now while the one in use is, keeps the one in use; the new pair is tried on a context of its own first, so that
half a pair never reaches the shared one. The CA file (``kafka.ssl_cafile``) is read again too, by
`daemon.kafka_trust`.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

from daemon.key_pairs import CertificateEnd, load_pair, read_pem, refuse_unless_valid, validity
from daemon.settings import KafkaSettings
from topics.errors import ConfigError

__all__ = ["KafkaCertificate", "kafka_certificate", "kafka_certificate_end"]

_CERT_KEY, _KEY_KEY = "kafka.ssl_certfile", "kafka.ssl_keyfile"


def kafka_certificate_end(kafka: KafkaSettings) -> CertificateEnd | None:
    """When the client certificate of `kafka` expires, read from its file alone (`config check`: nothing is loaded,
    and the key is neither read nor copied); None without one."""
    if kafka.ssl_certfile is None:
        return None
    _, _, not_after = validity(read_pem(kafka.ssl_certfile, _CERT_KEY), kafka.ssl_certfile, _CERT_KEY)
    return _end(kafka.ssl_certfile, not_after)


def _end(cert_file: Path, not_after: float) -> CertificateEnd:
    """When the Kafka client certificate from `cert_file` expires, and how that is said."""
    return CertificateEnd(
        "the Kafka client certificate", cert_file, not_after,
        "the brokers refuse it: orderbus can neither publish nor deliver",
        "renew it, then reload orderbus (restart, under systemd credentials)",
    )  # fmt: skip


class KafkaCertificate:
    """The client certificate in the clients' shared TLS `context`, and when it expires (`end`)."""

    def __init__(self, context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
        """`context` holds a pair already (`client_options` loaded it): it is loaded again here from the bytes read
        now, so that what a failed renewal goes back to is what the clients show (a renewal may have come between)."""
        self._context = context
        self.cert_file, self.key_file = cert_file, key_file
        self._pem = (read_pem(cert_file, _CERT_KEY), read_pem(key_file, _KEY_KEY))
        self._der, self._not_before, self._not_after = validity(self._pem[0], cert_file, _CERT_KEY)
        self._load(context, self._pem)

    @property
    def not_after(self) -> float:
        """When the certificate in use expires (unix seconds)."""
        return self._not_after

    @property
    def end(self) -> CertificateEnd:
        return _end(self.cert_file, self._not_after)

    def reload(self, now: float) -> bool:
        """Read both files again; the next connections show them. Whether the certificate changed. `ConfigError`,
        and the pair in use kept, if they do not load, or if their certificate is not valid at `now` while the one
        in use is.

        Each file is read once: the validity, the trial and the shared context all take those bytes (a renewal
        that writes the certificate, then the key, meanwhile could otherwise make them three different pairs; and
        OpenSSL, refusing a key, has already dropped the context's own, so a refused load there is undone)."""
        pem = (read_pem(self.cert_file, _CERT_KEY), read_pem(self.key_file, _KEY_KEY))
        der, not_before, not_after = validity(pem[0], self.cert_file, _CERT_KEY)
        refuse_unless_valid(
            _CERT_KEY, self.cert_file, (not_before, not_after), (self._not_before, self._not_after), now
        )
        self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), pem)  # a pair that does not load stops here
        try:
            self._load(self._context, pem)
        except ConfigError:  # not expected after the trial, but the clients must never keep half a pair
            self._load(self._context, self._pem)
            raise
        changed = der != self._der
        self._pem, self._der, self._not_before, self._not_after = pem, der, not_before, not_after
        return changed

    def _load(self, context: ssl.SSLContext, pem: tuple[str, str]) -> None:
        """Load `pem` (certificate, key) into `context`, from private copies (OpenSSL reads files); errors name the
        settings' files."""
        try:
            private = tempfile.TemporaryDirectory(prefix="orderbus-kafka-pair-")  # mode 0700: ours alone
        except OSError as exc:  # a read-only root without a tmpfs, for one
            raise ConfigError(
                f"{_CERT_KEY}/{_KEY_KEY}: no private copy of the pair can be made in {tempfile.gettempdir()}: {exc} "
                "(set TMPDIR to a writable directory)"
            ) from None
        with private:
            cert, key = Path(private.name, "certificate.pem"), Path(private.name, "key.pem")
            for path, text in ((cert, pem[0]), (key, pem[1])):
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w") as file:
                    file.write(text)
            load_pair(
                context, cert, key, cert_key=_CERT_KEY, key_key=_KEY_KEY, shown_as=(self.cert_file, self.key_file)
            )


def kafka_certificate(kafka: KafkaSettings, options: dict[str, Any]) -> KafkaCertificate | None:
    """The client certificate of `options` (built by `client_options` from `kafka`), None without one."""
    context = options.get("ssl_context")
    if kafka.ssl_certfile is None or kafka.ssl_keyfile is None or not isinstance(context, ssl.SSLContext):
        return None
    return KafkaCertificate(context, kafka.ssl_certfile, kafka.ssl_keyfile)
