"""Kafka client options from settings: the one place that turns `KafkaSettings` into aiokafka keyword arguments."""

from __future__ import annotations

import ssl
from typing import Any

from daemon.key_pairs import load_pair
from daemon.settings import KafkaSettings, TopicSettings
from topics.catalogue import TopicLayout
from topics.errors import ConfigError


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


def topic_layout(topics: TopicSettings) -> TopicLayout:
    return TopicLayout(
        prefix=topics.prefix,
        orders_partitions=topics.orders_partitions,
        dlq_partitions=topics.dlq_partitions,
        replication_factor=topics.replication_factor,
        min_insync_replicas=topics.min_insync_replicas,
        orders_retention_hours=topics.orders_retention_hours,
        dlq_retention_hours=topics.dlq_retention_hours,
        state_retention_hours=topics.state_retention_hours,
    )
