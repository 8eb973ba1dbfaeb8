"""Kafka client options from settings: the one place that turns `KafkaSettings` into aiokafka keyword arguments."""

from __future__ import annotations

import logging
import ssl
from typing import Any, Final

from daemon.key_pairs import certificate_validity, expiry_problem, load_pair, read_pem, say_expiry
from daemon.settings import KafkaSettings, TopicSettings
from topics.catalogue import TopicLayout
from topics.errors import ConfigError

_CLIENT_CERTIFICATE: Final = "the Kafka client certificate"
_REFUSED: Final = "the brokers refuse it: orderbus can neither publish nor deliver"


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments every aiokafka client (producer, consumer, admin) takes; `ConfigError` naming the setting
    if the CA file or the client certificate cannot be loaded."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        try:
            context = ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
        except OSError as exc:  # ssl.SSLError included; the settings checked the file, but it may have changed since
            raise ConfigError(f"kafka.ssl_cafile: cannot load {kafka.ssl_cafile}: {exc}") from None
        if kafka.ssl_certfile is not None and kafka.ssl_keyfile is not None:  # both or neither: the settings say
            load_pair(
                context,
                kafka.ssl_certfile,
                kafka.ssl_keyfile,
                cert_key="kafka.ssl_certfile",
                key_key="kafka.ssl_keyfile",
            )
        options["ssl_context"] = context
    if kafka.sasl_mechanism is not None:
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        if kafka.sasl_password is not None:
            options["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return options


def client_certificate_end(kafka: KafkaSettings) -> float | None:
    """When the Kafka client certificate (``kafka.ssl_certfile``) expires, unix seconds; None without one.
    `ConfigError` naming the setting if it cannot be read."""
    if kafka.ssl_certfile is None or kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    try:
        return certificate_validity(read_pem(kafka.ssl_certfile, "kafka.ssl_certfile"))[2]
    except ValueError as exc:
        raise ConfigError(f"kafka.ssl_certfile: {kafka.ssl_certfile}: its validity cannot be read ({exc})") from None


def client_certificate_problem(kafka: KafkaSettings, now: float) -> str | None:
    """What is wrong with the Kafka client certificate's end at `now` (expired, or within 14 days); None if nothing,
    or without one (`config check` says it)."""
    end = client_certificate_end(kafka)
    return None if end is None else client_certificate_expiry(end, now)


def client_certificate_expiry(end: float, now: float) -> str | None:
    """What is wrong at `now` with a Kafka client certificate that expires at `end`: expired, or within 14 days."""
    return expiry_problem(_CLIENT_CERTIFICATE, end, now, _REFUSED)


def say_client_certificate_expiry(logger: logging.Logger, kafka: KafkaSettings, end: float, now: float) -> None:
    """Log when the Kafka client certificate (it expires at `end`) does, at the level it deserves (`run`'s start)."""
    assert kafka.ssl_certfile is not None
    say_expiry(logger, _CLIENT_CERTIFICATE, kafka.ssl_certfile, end, now, _REFUSED, "renew it, then restart orderbus")


def topic_layout(topics: TopicSettings) -> TopicLayout:
    return TopicLayout(
        prefix=topics.prefix,
        orders_partitions=topics.orders_partitions,
        dlq_partitions=topics.dlq_partitions,
        replication_factor=topics.replication_factor,
        min_insync_replicas=topics.min_insync_replicas,
        orders_retention_hours=topics.orders_retention_hours,
        dlq_retention_hours=topics.dlq_retention_hours,
    )
