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


def discard_producer(producer: KafkaProducer) -> None:
    """Close a producer given up on after a failure, at once, whatever it still holds. kafka-python
    3.0 flushes before closing and raises (`KafkaTimeoutError`) while records are pending, which a
    failed producer has by definition, leaving its sender thread running: forced down here, so
    the pending records fail (their waiters answer at once) and no thread is left behind."""
    try:
        producer.close(timeout=0)
    except Exception:  # noqa: BLE001 - pending records (the flush timed out), a broken connection
        sender = getattr(producer, "_sender", None)
        if sender is not None and sender.is_alive():
            sender.force_close()
            sender.join(timeout=2)  # it stops at its next loop, within its poll interval
