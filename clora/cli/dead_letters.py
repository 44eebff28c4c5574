"""`clora dead-letters`: what the runtime could not deliver, and sending it again.

Two stores: capture records the broker refused for good (`$CLORA_HOME/spool/dead-letters.jsonl`:
over its size limit) and feedback ingestion could not use (the `clora.feedback.dead` topic:
malformed, no interaction within the wait, customer mismatch)."""

from __future__ import annotations

import base64
import time
from enum import Enum

import typer
from kafka import KafkaConsumer, TopicPartition
from rich.table import Table

from clora.cli.common import console, fail
from clora.core.settings import Settings
from clora.core.state import serve_state
from clora.runtime.spool import DeadLetters
from clora.wire.feedback import DeadLetter as FeedbackDeadLetter
from clora.wire.feedback import feedback_customer
from clora.wire.kafka import reliable_producer

dead_app = typer.Typer(help="Inspect and re-drive what could not be delivered.", no_args_is_help=True)


class Source(str, Enum):
    capture = "capture"
    feedback = "feedback"


def _capture_letters(settings: Settings) -> DeadLetters:
    return DeadLetters(settings.spool_dir / "dead-letters.jsonl")


def _bootstrap(settings: Settings) -> str:
    bootstrap = settings.stores.kafka_bootstrap or (serve_state(settings) or {}).get("kafka_bootstrap")
    if not bootstrap:
        raise fail("no broker: start `clora serve` or set CLORA_KAFKA_BOOTSTRAP")
    return bootstrap


def _feedback_consumer(settings: Settings, group: str | None) -> KafkaConsumer:
    """The dead-letter topic's partitions, assigned (no group join: it can take longer than the
    read), from `group`'s committed offsets, else from the start."""
    consumer = KafkaConsumer(bootstrap_servers=_bootstrap(settings), group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=3000, client_id="clora-dead-letters")
    topic = settings.stores.dead_letter_topic
    partitions = consumer.partitions_for_topic(topic) if topic in consumer.topics() else None
    assigned = [TopicPartition(topic, p) for p in sorted(partitions or [])]
    consumer.assign(assigned)
    for tp in assigned:
        committed = consumer.committed(tp) if group else None
        if committed is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)
    return consumer


@dead_app.command("list")
def list_letters(last: int = typer.Option(20, help="Newest letters shown per source.")) -> None:
    """The dead letters of both sources, newest last, with the reason."""
    settings = Settings()
    table = Table("source", "when / offset", "reason", "topic", "bytes")
    for letter in _capture_letters(settings).read()[-last:]:
        table.add_row("capture", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.at)), letter.reason,
                      letter.topic, str(letter.size))
    consumer = _feedback_consumer(settings, None)
    try:
        letters = [(m.offset, FeedbackDeadLetter.model_validate_json(m.value)) for m in consumer]
    finally:
        consumer.close()
    for offset, letter in letters[-last:]:
        table.add_row("feedback", f"@{offset}", letter.reason, letter.topic,
                      str(len(base64.b64decode(letter.value_b64))))
    console.print(table)


@dead_app.command("redrive")
def redrive(source: Source = typer.Argument(..., help="capture or feedback")) -> None:
    """Send the letters of `source` to their topic again (after fixing their cause: a raised
    size limit, an interaction that arrived late). Feedback letters are taken once (a consumer
    group remembers how far redrive got); capture letters that fail again stay."""
    settings = Settings()
    producer = reliable_producer(_bootstrap(settings), "clora-redrive")
    try:
        sent = _redrive_capture(settings, producer) if source is Source.capture else _redrive_feedback(settings, producer)
    finally:
        producer.close(timeout=5)
    console.print(f"{sent} {source.value} dead letters sent again")


def _redrive_capture(settings: Settings, producer) -> int:
    letters = _capture_letters(settings)
    if not letters.path.exists():
        return 0
    taken = letters.path.with_suffix(".redriving")  # new letters meanwhile go to a fresh file
    letters.path.rename(taken)
    sent = 0
    for letter in DeadLetters(taken).read():
        future = producer.send(letter.topic, key=base64.b64decode(letter.key_b64),
                               value=base64.b64decode(letter.value_b64))
        producer.flush(timeout=10)
        try:
            future.get(timeout=0)
            sent += 1
        except Exception as exc:  # noqa: BLE001 - refused again: it stays a dead letter, with the new reason
            letters.add_raw(letter, f"{type(exc).__name__}: {exc}")
    taken.unlink()
    return sent


def _redrive_feedback(settings: Settings, producer) -> int:
    consumer = _feedback_consumer(settings, f"{settings.feedback.ingest_group}-redrive")
    sent = 0
    try:
        for message in consumer:
            letter = FeedbackDeadLetter.model_validate_json(message.value)
            value = base64.b64decode(letter.value_b64)
            producer.send(letter.topic, key=_customer_of(value), value=value).get(timeout=10)
            sent += 1
        consumer.commit()
    finally:
        consumer.close()
    return sent


def _customer_of(value: bytes) -> bytes | None:
    """The partition key the webhook gave the message (its customer), if it parses."""
    try:
        return feedback_customer(value).encode()
    except ValueError:
        return None
