"""Kafka plumbing shared by the stages: topic creation and producer settings."""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

log = logging.getLogger("clora.kafka")


def ensure_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    # A broker that is down is reported within seconds (the defaults wait 30 s), so the capture
    # thread spools instead of hanging.
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="clora-admin", request_timeout_ms=10_000,
                             bootstrap_timeout_ms=5_000, reconnect_backoff_max_ms=2_000)
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name=t, num_partitions=partitions, replication_factor=1)
                   for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:  # another process created it meanwhile
                pass
    finally:
        admin.close()


def reliable_producer(bootstrap: str, client_id: str) -> KafkaProducer:
    """acks=all, short timeouts: a dead broker is noticed in seconds and records go to the spool."""
    return KafkaProducer(
        bootstrap_servers=bootstrap, client_id=client_id, acks="all", linger_ms=5,
        retries=3, request_timeout_ms=5_000, max_block_ms=3_000, reconnect_backoff_max_ms=2_000,
    )
