"""The Redis side of ingestion: interactions kept for their feedback, feedback joined into the
replay buffers or kept waiting for its interaction, and waiting feedback expired to the dead
letters once ingestion has caught up. Every write is idempotent (a redelivered batch applies
nothing twice); the consumer (consumer.py) decides when each runs.

- interaction -> kept in Redis with a TTL (feedback joins against it); releases feedback that was
  waiting for it.
  (Each polled batch is handled in a few pipelined round trips, not one per message.)
- feedback -> joined with its interaction and pushed to the customer's buffer; if the interaction
  has not arrived yet, the feedback waits in Redis (no TTL: however long ingestion is down) and is
  counted per customer (`fates.waiting_key`); `max_wait_s` after it arrived, once ingestion has read
  every interaction the broker holds (one still in the backlog may release it), it goes to the dead
  letters with the reason and into the customer's dead index (`fates.dead_key`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import redis.asyncio as aioredis
from prometheus_client import Counter

from clora.feedback.fates import DEAD_TTL_S, dead_entry, dead_key, waiting_key
from clora.feedback.replay import ReplayBuffer
from clora.wire.feedback import FeedbackEvent, FeedbackMessage, FeedbackPost, joined_record
from clora.wire.interactions import InteractionRecord, interaction_key

INGESTED = Counter("clora_ingest_messages_total", "Messages handled by the ingestion consumer", ["topic", "outcome"])
Pending = tuple[FeedbackEvent, FeedbackPost]  # a feedback event and the post it came in
DeadLetterFn = Callable[[str, str, int, int, bytes], None]  # (reason, topic, partition, offset, value)


def handled_key(group_id: str) -> str:
    """Ids of the feedback messages the group has handled (every event stored, waiting or
    dead-lettered): a post's id, a lone event's event_id; scored by when. The webhook's outbox
    confirms against it."""
    return f"clora:ingest:{{{group_id}}}:handled"


# Stored interactions are `<customer>\n<record JSON as captured>`: the join checks the owner and
# embeds the JSON without parsing it.
def _pack(interaction: InteractionRecord, raw: bytes) -> bytes:
    return interaction.customer.encode() + b"\n" + raw


def _unpack(stored: bytes) -> tuple[str, bytes]:
    customer, _, raw = stored.partition(b"\n")
    return customer.decode(), raw


def parse_interaction(value: bytes) -> InteractionRecord:
    interaction = InteractionRecord.model_validate_json(value)
    if not interaction.choices:
        raise ValueError("interaction has no choices")
    return interaction


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
    housekeeping_s: float = 1.0  # offsets committed and waiting feedback expired at most this often
    fetch_wait_s: float = 0.25  # the broker holds a fetch until 64 KiB or this long: batches, not a fetch per record
    max_poll_records: int = 500  # records handled (and written to Redis) per batch
    handled_ttl_s: float = 24 * 3600  # how long a handled feedback id is remembered for the outbox
    max_lag: int = 10_000  # messages behind (all partitions) beyond which health says degraded
    restart_backoff_s: float = 1.0  # first wait before a failed consumer starts again; doubles, up to 30 s


class Joins:
    def __init__(self, config: IngestConfig, redis: aioredis.Redis, replay: ReplayBuffer, dead_letter: DeadLetterFn):
        self.config, self.redis, self.replay, self.dead_letter = config, redis, replay, dead_letter
        self.group_id, self.interactions_topic, self.feedback_topic = (config.group_id, config.interactions_topic,
                                                                       config.feedback_topic)
        self.interaction_ttl_s, self.max_wait_s = config.interaction_ttl_s, config.max_wait_s
        self.handled_ttl_s = config.handled_ttl_s

    # Waiting feedback belongs to this consumer group (another group on the same Redis has its own).
    def _waiting(self, trace_id: str) -> str:
        return f"clora:ingest:{{{self.group_id}}}:waiting:{trace_id}"

    @property
    def _deadlines(self) -> str:
        return f"clora:ingest:{{{self.group_id}}}:deadlines"

    @property
    def handled_key(self) -> str:
        return handled_key(self.group_id)

    async def store_interactions(self, interactions: list[tuple[InteractionRecord, bytes]]
                                  ) -> list[tuple[bytes, Pending]]:
        """Keep each interaction (TTL) and return the feedback that was waiting for it."""
        if not interactions:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for interaction, raw in interactions:
                pipe.set(interaction_key(interaction.trace_id), _pack(interaction, raw),
                         ex=self.interaction_ttl_s)
                pipe.lrange(self._waiting(interaction.trace_id), 0, -1)
            results = await pipe.execute()
        INGESTED.labels(self.interactions_topic, "stored").inc(len(interactions))
        released = []
        for (interaction, raw), waiting in zip(interactions, results[1::2]):
            for waiting_raw in waiting:
                message = FeedbackMessage.model_validate_json(waiting_raw)
                released.append((_pack(interaction, raw), (message.event, FeedbackPost.of(message))))
        return released

    async def match(self, feedback: list[Pending]) -> list[tuple[bytes, Pending]]:
        """Pair feedback with stored interactions; the rest waits (bounded) for its interaction."""
        if not feedback:
            return []
        traces = list(dict.fromkeys(event.trace_id for event, _ in feedback))
        # One MGET: a pipelined GET per trace cost a third of ingestion's CPU (each command packed
        # and its reply parsed on its own). The keys hash to different slots: a single Redis node
        # only, which is what clora runs (a Redis Cluster client would need MGET per slot).
        stored = await self.redis.mget([interaction_key(trace) for trace in traces])
        found = {trace: value for trace, value in zip(traces, stored) if value is not None}
        pairs, missing = [], []
        for pending in feedback:
            stored = found.get(pending[0].trace_id)
            if stored is None:
                missing.append(pending)
            else:
                pairs.append((stored, pending))
        if missing:
            deadline = time.time() + self.max_wait_s
            async with self.redis.pipeline(transaction=False) as pipe:
                for event, post in missing:  # no TTL: it leaves by joining or as a dead letter
                    trace = event.trace_id
                    pipe.rpush(self._waiting(trace), post.message(event).model_dump_json())
                    pipe.zadd(self._deadlines, {trace: deadline}, nx=True)
                    if event.event_id:
                        pipe.hset(waiting_key(self.group_id, post.customer), event.event_id, trace)
                await pipe.execute()
            INGESTED.labels(self.feedback_topic, "waiting").inc(len(missing))
        return pairs

    async def join(self, pairs: list[tuple[bytes, Pending]]) -> None:
        records, now = [], time.time()
        for stored, (event, post) in pairs:
            owner, raw = _unpack(stored)
            if owner != post.customer:
                INGESTED.labels(self.feedback_topic, "dead").inc()
                reason = "customer mismatch between feedback and interaction"
                self.dead_letter(reason, self.feedback_topic, -1, -1,
                                  post.message(event).model_dump_json().encode())
                await self.index_dead(post.customer, event.event_id, reason)
            else:
                records.append(joined_record(event, post, raw, now))
        pushed = await self.replay.push_serialized(records)
        INGESTED.labels(self.feedback_topic, "joined").inc(sum(pushed))
        INGESTED.labels(self.feedback_topic, "duplicate").inc(len(pushed) - sum(pushed))

    async def mark_handled(self, released: list[tuple[bytes, Pending]], handled: list[str]) -> None:
        """After a batch's pushes: released feedback leaves the waiting set, and the batch's
        feedback messages are marked handled for the webhook's outbox."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for trace in {event.trace_id for _, (event, _) in released}:
                pipe.delete(self._waiting(trace))
                pipe.zrem(self._deadlines, trace)
            for _, (event, post) in released:
                pipe.hdel(waiting_key(self.group_id, post.customer), event.event_id or "")
            if handled:
                pipe.zadd(self.handled_key, dict.fromkeys(handled, time.time()))
            await pipe.execute()

    async def expire_waiting(self, caught_up: bool, flush_dead: Callable[[], None]) -> None:
        """Feedback whose interaction never came within max_wait_s goes to the dead letters (and the
        customer's dead index), but only once every interaction the broker holds has been read: one
        still in the backlog (ingestion was down) may release it. Handled ids older than
        `handled_ttl_s` are forgotten."""
        await self.redis.zremrangebyscore(self.handled_key, "-inf", time.time() - self.handled_ttl_s)
        if not caught_up:
            return
        expired = await self.redis.zrangebyscore(self._deadlines, "-inf", time.time())
        for trace in (t.decode() for t in expired):
            reason = f"no interaction for trace {trace} within {self.max_wait_s:g}s"
            waiting = [FeedbackMessage.model_validate_json(raw) for raw in await self.redis.lrange(self._waiting(trace),
                                                                                                  0, -1)]
            for message in waiting:
                self.dead_letter(reason, self.feedback_topic, -1, -1, message.model_dump_json().encode())
                INGESTED.labels(self.feedback_topic, "expired").inc()
            await asyncio.to_thread(flush_dead)  # acknowledged before the waiting copy goes
            async with self.redis.pipeline(transaction=True) as pipe:
                for message in waiting:
                    self.queue_dead_index(pipe, message.customer, message.event.event_id, reason)
                    pipe.hdel(waiting_key(self.group_id, message.customer), message.event.event_id or "")
                pipe.delete(self._waiting(trace))
                pipe.zrem(self._deadlines, trace)
                await pipe.execute()

    def queue_dead_index(self, pipe, customer: str, event_id: str | None, reason: str) -> None:
        if event_id:
            key = dead_key(self.group_id, customer)
            pipe.hset(key, event_id, dead_entry(reason))
            pipe.expire(key, DEAD_TTL_S)

    async def index_dead(self, customer: str, event_id: str | None, reason: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            self.queue_dead_index(pipe, customer, event_id, reason)
            await pipe.execute()
