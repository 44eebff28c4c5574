"""Ingestion: interactions and feedback from Kafka, joined into training records in the replay buffers.

One consumer-group member reads both topics. Both are keyed by customer and have the same
partition count, so with the range assignor a customer's interactions and feedback reach the same
member. Per polled batch: every Redis write happens first, then the offsets are committed; a crash
in between means redelivery, which the replay buffer absorbs (a push is idempotent by event id).

- interaction -> kept in Redis with a TTL (feedback joins against it); releases feedback that was
  waiting for it.
- feedback -> joined with its interaction and pushed to the customer's buffer; if the interaction
  has not arrived yet, the feedback waits in Redis (bounded time), then goes to the dead letters.
- anything malformed or unjoinable -> the dead-letter topic with the reason; never a stop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ValidationError

from feedback.records import FeedbackMessage, TrainingRecord
from feedback.replay import ReplayBuffer
from runtime.kafka import ensure_topics, reliable_producer
from runtime.records import InteractionRecord

log = logging.getLogger("clora.ingest")
INGESTED = Counter("clora_ingest_messages_total", "Messages handled by the ingestion consumer", ["topic", "outcome"])
LAG = Gauge("clora_ingest_lag", "Messages behind the partition's high watermark", ["topic", "partition"])


@dataclass
class IngestConfig:
    bootstrap: str
    interactions_topic: str = "clora.interactions"
    feedback_topic: str = "clora.feedback"
    dead_letter_topic: str = "clora.feedback.dead"
    group_id: str = "clora-ingest"
    partitions: int = 4
    interaction_ttl_s: int = 7 * 24 * 3600
    max_wait_s: float = 300.0  # how long feedback may wait for its interaction


class DeadLetter(BaseModel):
    reason: str
    topic: str
    partition: int
    offset: int
    value_b64: str


def training_record(interaction: InteractionRecord, message: FeedbackMessage) -> TrainingRecord:
    event = message.event
    choice = interaction.choices[0]
    return TrainingRecord(
        event_id=event.event_id or "", customer=interaction.customer, trace_id=interaction.trace_id,
        kind=event.kind(), source=event.source, reward=event.scalar_reward(), correction=event.correction,
        comment=event.comment, adapter=interaction.adapter, adapter_version=interaction.adapter_version,
        messages=interaction.request.messages, tools=interaction.request.tools, response=choice.message,
        prompt_token_ids=interaction.prompt_token_ids, completion_token_ids=choice.token_ids,
        behaviour_logprobs=choice.logprobs, created_at=message.received_at)


class IngestConsumer:
    def __init__(self, config: IngestConfig, redis: aioredis.Redis, replay: ReplayBuffer):
        self.config = config
        self.redis = redis
        self.replay = replay
        self._stop = threading.Event()
        self._consumer: KafkaConsumer | None = None
        self._dead = None

    # Waiting feedback belongs to this consumer group (another group on the same Redis has its own).
    def _waiting(self, trace_id: str) -> str:
        return f"clora:ingest:{{{self.config.group_id}}}:waiting:{trace_id}"

    @property
    def _deadlines(self) -> str:
        return f"clora:ingest:{{{self.config.group_id}}}:deadlines"

    # -- lifecycle ----------------------------------------------------------------------------
    def connect(self) -> None:
        c = self.config
        ensure_topics(c.bootstrap, [c.interactions_topic, c.feedback_topic, c.dead_letter_topic], c.partitions)
        self._consumer = KafkaConsumer(
            c.interactions_topic, c.feedback_topic, bootstrap_servers=c.bootstrap, group_id=c.group_id,
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=500,
            client_id="clora-ingest")
        self._dead = reliable_producer(c.bootstrap, "clora-ingest-dead")

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Poll, handle, commit, until stop(). Kafka calls block, so they run in a thread."""
        if self._consumer is None:
            await asyncio.to_thread(self.connect)
        try:
            while not self._stop.is_set():
                batch = await asyncio.to_thread(self._consumer.poll, 500, 500)
                for tp, messages in batch.items():
                    for message in messages:
                        await self.handle(tp, message.offset, message.value)
                await self.expire_waiting()
                if batch:
                    await asyncio.to_thread(self._flush_dead_and_commit)
                self._report_lag()
        finally:
            await asyncio.to_thread(self._close)

    def _flush_dead_and_commit(self) -> None:
        self._dead.flush(timeout=30)  # dead letters acknowledged before their offsets are committed
        self._consumer.commit()

    def _close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
        if self._dead is not None:
            self._dead.close(timeout=5)

    def _report_lag(self) -> None:
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - self._consumer.position(tp)))

    # -- handling -----------------------------------------------------------------------------
    async def handle(self, tp: TopicPartition, offset: int, value: bytes) -> None:
        try:
            if tp.topic == self.config.interactions_topic:
                outcome = await self._on_interaction(InteractionRecord.model_validate_json(value))
            else:
                outcome = await self._on_feedback(FeedbackMessage.model_validate_json(value))
        except (ValidationError, ValueError) as exc:
            outcome = "dead"
            self._dead_letter(f"malformed: {str(exc).splitlines()[0][:300]}", tp.topic, tp.partition, offset, value)
        INGESTED.labels(tp.topic, outcome).inc()

    async def _on_interaction(self, interaction: InteractionRecord) -> str:
        if not interaction.choices:
            raise ValueError("interaction has no choices")
        await self.redis.set(f"clora:interaction:{interaction.trace_id}", interaction.model_dump_json(),
                             ex=self.config.interaction_ttl_s)
        waiting = await self.redis.lrange(self._waiting(interaction.trace_id), 0, -1)
        for raw in waiting:
            await self._join(interaction, FeedbackMessage.model_validate_json(raw))
        if waiting:
            await self.redis.delete(self._waiting(interaction.trace_id))
            await self.redis.zrem(self._deadlines, interaction.trace_id)
        return "stored"

    async def _on_feedback(self, message: FeedbackMessage) -> str:
        if not message.event.event_id:
            raise ValueError("feedback without event_id")
        raw = await self.redis.get(f"clora:interaction:{message.event.trace_id}")
        if raw is None:
            trace = message.event.trace_id
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(self._waiting(trace), message.model_dump_json())
                pipe.expire(self._waiting(trace), int(self.config.max_wait_s * 2) + 60)
                pipe.zadd(self._deadlines, {trace: time.time() + self.config.max_wait_s}, nx=True)
                await pipe.execute()
            return "waiting"
        return await self._join(InteractionRecord.model_validate_json(raw), message)

    async def _join(self, interaction: InteractionRecord, message: FeedbackMessage) -> str:
        if interaction.customer != message.customer:
            self._dead_letter("customer mismatch between feedback and interaction", self.config.feedback_topic,
                              -1, -1, message.model_dump_json().encode())
            return "dead"
        pushed = await self.replay.push(training_record(interaction, message))
        return "joined" if pushed else "duplicate"

    async def expire_waiting(self) -> None:
        """Feedback whose interaction never came within max_wait_s goes to the dead letters."""
        expired = await self.redis.zrangebyscore(self._deadlines, "-inf", time.time())
        for trace in (t.decode() for t in expired):
            for raw in await self.redis.lrange(self._waiting(trace), 0, -1):
                self._dead_letter(f"no interaction for trace {trace} within {self.config.max_wait_s:g}s",
                                  self.config.feedback_topic, -1, -1, raw)
                INGESTED.labels(self.config.feedback_topic, "expired").inc()
            await asyncio.to_thread(self._dead.flush, 30)  # acknowledged before the waiting copy goes
            await self.redis.delete(self._waiting(trace))
            await self.redis.zrem(self._deadlines, trace)

    def _dead_letter(self, reason: str, topic: str, partition: int, offset: int, value: bytes) -> None:
        letter = DeadLetter(reason=reason, topic=topic, partition=partition, offset=offset,
                            value_b64=base64.b64encode(value).decode())
        log.warning("dead letter (%s) from %s[%s]@%s", reason, topic, partition, offset)
        self._dead.send(self.config.dead_letter_topic, key=topic.encode(), value=json.dumps(letter.model_dump()).encode())
