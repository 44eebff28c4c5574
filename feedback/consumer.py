"""Ingestion: interactions and feedback from Kafka, joined into training records in the replay buffers.

One consumer-group member reads both topics. Both are keyed by customer and have the same
partition count, so with the range assignor a customer's interactions and feedback reach the same
member. Per polled batch: every Redis write happens first, then the offsets are committed; a crash
in between means redelivery, which the replay buffer absorbs (a push is idempotent by event id).

Redis side (what is stored, joined, kept waiting, dead-lettered): joins.py. Anything malformed or
unjoinable goes to the dead-letter topic with the reason; never a stop.

`supervise` runs the consumer and starts it again (with backoff) when it fails: Redis or the
broker gone, a bug. The new consumer resumes at the committed offsets, so what the failed one had
not committed is delivered again. Its state, restarts and lag are reported by `health()`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time

import redis.asyncio as aioredis
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from clora.core.health import ComponentHealth
from clora.feedback.joins import INGESTED, IngestConfig, Joins, Pending, parse_interaction
from clora.feedback.replay import ReplayBuffer
from clora.wire.feedback import DeadLetter, parse_feedback_value
from clora.wire.interactions import InteractionRecord
from clora.wire.kafka import ensure_topics, reliable_producer

log = logging.getLogger("clora.ingest")
LAG = Gauge("clora_ingest_lag", "Messages behind the partition's high watermark", ["topic", "partition"])
RESTARTS = Counter("clora_ingest_restarts_total", "Times the ingestion consumer failed and was started again")
# A fetch returns once this much is waiting (~230 events' worth of feedback): under load batches fill in
# tens of ms; 1 MiB held each fetch for the whole `fetch_wait_s` at a few thousand events/s.
FETCH_MIN_BYTES = 64 << 10
# The group session (kafka-python 3's default is 45 s): the embedded broker holds a fresh group's
# first join for about half of it (23.1 s measured at 45 s, 5.1 s at 10 s, 3.1 s at 6 s), and a
# restarted member waits out its dead predecessor's session. The heartbeat runs in its own thread.
SESSION_TIMEOUT_MS = 10_000
JOIN_CHUNK = 1000  # feedback events matched and pushed per Redis round trip
UP = Gauge("clora_ingest_up", "1 while the ingestion consumer runs, 0 while it is down or restarting")


class IngestConsumer:
    def __init__(self, config: IngestConfig, redis: aioredis.Redis, replay: ReplayBuffer):
        self.config = config
        self.redis = redis
        self.replay = replay
        self._stop = threading.Event()
        self._consumer: KafkaConsumer | None = None
        self._dead = None
        self.state = "starting"  # running | restarting | stopped
        self.restarts = 0
        self.last_error: str | None = None
        self.lag = 0
        self._pass: asyncio.Task | None = None
        self._cancel_armed = False
        self.joins = Joins(config, redis, replay, self._dead_letter)

    @property
    def handled_key(self) -> str:
        return self.joins.handled_key

    def cancel_mid_batch(self) -> None:
        """Fault hook (`CLORA_FAULT_HOOKS`, tests and the soak only): the pass handling the next
        non-empty batch is cancelled once its interactions are written and before anything is
        committed, a crash at the worst point; the supervisor must start it again."""
        self._cancel_armed = True

    # -- lifecycle ----------------------------------------------------------------------------
    def connect(self) -> None:
        c = self.config
        ensure_topics(c.bootstrap, [c.interactions_topic, c.feedback_topic, c.dead_letter_topic], c.partitions)
        self._consumer = KafkaConsumer(
            c.interactions_topic, c.feedback_topic, bootstrap_servers=c.bootstrap, group_id=c.group_id,
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=c.max_poll_records,
            fetch_min_bytes=FETCH_MIN_BYTES, fetch_max_wait_ms=int(c.fetch_wait_s * 1000), client_id="clora-ingest",
            session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=SESSION_TIMEOUT_MS // 3)
        self._dead = reliable_producer(c.bootstrap, "clora-ingest-dead")

    def stop(self) -> None:
        self._stop.set()

    def health(self) -> ComponentHealth:
        ok = self.state == "running" and self.lag <= self.config.max_lag
        consumer = self._consumer
        assigned = len(consumer.assignment()) if consumer is not None else 0  # 0: not (yet) in its group
        return ComponentHealth(state=self.state, ok=ok, detail={"restarts": self.restarts, "lag": self.lag,
                                                                "max_lag": self.config.max_lag,
                                                                "assigned_partitions": assigned,
                                                                "last_error": self.last_error})

    async def supervise(self, max_backoff_s: float = 30.0) -> None:
        """Consume until stop(), again after each failure: waits `restart_backoff_s`, doubling
        while it keeps failing within a minute of starting. The Kafka consumer is kept and rewound
        to the committed offsets (a new group member would wait for the old one's session to
        expire: minutes on the embedded broker); only a consumer that cannot rewind is replaced.
        Each pass is a task of its own: a pass cancelled while the supervisor is not (a bug, a
        library cancelling what it should not, the fault hook) is a failure like any other."""
        backoff = self.config.restart_backoff_s
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                self._pass = asyncio.create_task(self._consume(), name="ingest-pass")
                try:
                    await self._pass
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        raise  # the supervisor itself is being stopped
                    failure: BaseException = RuntimeError("the ingestion pass was cancelled")
                except Exception as exc:  # noqa: BLE001 - whatever failed, ingestion must come back
                    failure = exc
                else:
                    continue
                self.restarts += 1
                self.last_error = f"{type(failure).__name__}: {str(failure)[:300]}"
                self.state = "restarting"
                RESTARTS.inc()
                UP.set(0)
                log.error("ingestion failed (restart %d in %.1f s)", self.restarts, backoff, exc_info=failure)
                if time.monotonic() - started > 60:
                    backoff = self.config.restart_backoff_s  # it had stayed up: not a crash loop
                await asyncio.to_thread(self._stop.wait, backoff)
                backoff = min(backoff * 2, max_backoff_s)
                await asyncio.to_thread(self._rewind)
        finally:
            await asyncio.to_thread(self._close)
            self.state = "stopped"
            UP.set(0)

    async def run(self) -> None:
        """Consume until stop() or the first failure, then close."""
        try:
            await self._consume()
        finally:
            await asyncio.to_thread(self._close)

    async def _consume(self) -> None:
        """Poll, handle, commit, until stop(). Kafka calls block, so they run in a thread.

        Offsets are committed (and waiting feedback expired) at most every `housekeeping_s`, not
        after every poll: at a few records a second each poll holds one record, and a commit per
        record cost the serving machine a Kafka round trip each. A crash redelivers what was
        handled since the last commit; every write is idempotent, so nothing is applied twice."""
        if self._consumer is None:
            await asyncio.to_thread(self.connect)
        uncommitted, last_housekeeping = False, 0.0
        self.state = "running"
        UP.set(1)
        while not self._stop.is_set():
            batch = await asyncio.to_thread(self._consumer.poll, 500, self.config.max_poll_records)
            await self.handle_batch([(tp, m.offset, m.value) for tp, ms in batch.items() for m in ms])
            uncommitted = uncommitted or bool(batch)
            if time.monotonic() - last_housekeeping >= self.config.housekeeping_s:
                await self.expire_waiting()
                if uncommitted:
                    await asyncio.to_thread(self._flush_dead_and_commit)
                    uncommitted = False
                last_housekeeping = time.monotonic()
            self._report_lag()
        if uncommitted:  # stopped cleanly (never after a failed batch: its offsets must redeliver)
            await asyncio.to_thread(self._flush_dead_and_commit)

    def _rewind(self) -> None:
        """Back to the committed offsets: what the failed pass handled but had not committed comes
        again. A consumer that cannot (the broker gone) is closed; the next pass connects anew."""
        if self._consumer is None:
            return
        try:
            for tp in self._consumer.assignment():
                committed = self._consumer.committed(tp)
                if committed is None:
                    self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, committed)
        except Exception:  # noqa: BLE001
            log.exception("ingestion: cannot rewind to the committed offsets; reconnecting")
            self._close()

    def _flush_dead_and_commit(self) -> None:
        self._dead.flush(timeout=30)  # dead letters acknowledged before their offsets are committed
        self._consumer.commit()

    def _close(self) -> None:
        if self._consumer is not None:
            # Bounded and quiet: leaving the group only speeds up the next rebalance, and the
            # embedded broker does not answer it (close took ~20 s, the request timeout, and
            # logged an error on every stop).
            coordinator_log = logging.getLogger("kafka.coordinator")
            level = coordinator_log.level
            coordinator_log.setLevel(logging.CRITICAL)
            try:
                self._consumer.close(autocommit=False, timeout_ms=2000)
            finally:
                coordinator_log.setLevel(level)
        if self._dead is not None:
            self._dead.close(timeout=5)
        self._consumer = self._dead = None

    def _report_lag(self) -> None:
        total = 0
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                behind = max(0, high - self._consumer.position(tp))
                LAG.labels(tp.topic, str(tp.partition)).set(behind)
                total += behind
        self.lag = total

    # -- handling -----------------------------------------------------------------------------
    async def handle_batch(self, messages: list[tuple[TopicPartition, int, bytes]]) -> None:
        """All Redis writes of one polled batch in a few round trips: interactions first, so that
        feedback in the same batch finds them; then the joins; waiting copies go last.

        Feedback goes in chunks of ~JOIN_CHUNK events: parse, match (one MGET), then the chunk's
        join and push run as a task while the next chunk is parsed, so Redis executes one chunk's
        pushes while this process prepares the next (each side waited on the other before)."""
        interactions: list[tuple[InteractionRecord, bytes]] = []
        feedback: list[tuple[TopicPartition, int, bytes]] = []
        for tp, offset, value in messages:
            if tp.topic != self.config.interactions_topic:
                feedback.append((tp, offset, value))
                continue
            try:
                interactions.append((parse_interaction(value), value))
            except (ValidationError, ValueError) as exc:
                self._malformed(exc, tp, offset, value)
        released = await self.joins.store_interactions(interactions)
        if self._cancel_armed and messages:
            self._cancel_armed = False
            # What a cancel delivers at an await, here for certain (a cancel() could land in a poll,
            # whose thread would go on using the consumer beside the restarted pass).
            raise asyncio.CancelledError("fault hook: cancelled mid-batch")
        # Each released event leaves the customer's waiting index once its push is done (below).
        handled: list[str] = []  # the feedback messages' ids, for the webhook's outbox
        joins = [asyncio.create_task(self.joins.join(released))] if released else []
        try:
            chunk: list[Pending] = []
            for i, (tp, offset, value) in enumerate(feedback):
                try:
                    post = parse_feedback_value(value)
                except (ValidationError, ValueError) as exc:
                    self._malformed(exc, tp, offset, value)
                else:
                    chunk += [(event, post) for event in post.events]
                    handled.append(post.id)
                if chunk and (len(chunk) >= JOIN_CHUNK or i == len(feedback) - 1):
                    joins.append(asyncio.create_task(self.joins.join(await self.joins.match(chunk))))
                    chunk = []
        finally:  # every push finished (or failed) before anything is marked handled
            failures = [r for r in await asyncio.gather(*joins, return_exceptions=True) if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        if released or handled:  # only now: a crash before this point redelivers, and the pushes are idempotent
            await self.joins.mark_handled(released, handled)

    def _malformed(self, exc: Exception, tp: TopicPartition, offset: int, value: bytes) -> None:
        INGESTED.labels(tp.topic, "dead").inc()
        self._dead_letter(f"malformed: {str(exc).splitlines()[0][:300]}", tp.topic, tp.partition, offset, value)

    async def expire_waiting(self) -> None:
        """Waiting feedback past its deadline to the dead letters, once caught up (joins.py)."""
        await self.joins.expire_waiting(self._caught_up(), lambda: self._dead.flush(timeout=30))

    def _caught_up(self) -> bool:
        """Every assigned interactions partition read up to its high watermark (as last fetched)."""
        if self._consumer is None:
            return False
        parts = [tp for tp in self._consumer.assignment() if tp.topic == self.config.interactions_topic]
        for tp in parts:
            high = self._consumer.highwater(tp)
            if high is None or self._consumer.position(tp) < high:
                return False
        return bool(parts)

    def _dead_letter(self, reason: str, topic: str, partition: int, offset: int, value: bytes) -> None:
        letter = DeadLetter(reason=reason, topic=topic, partition=partition, offset=offset,
                            value_b64=base64.b64encode(value).decode())
        log.warning("dead letter (%s) from %s[%s]@%s", reason, topic, partition, offset)
        self._dead.send(self.config.dead_letter_topic, key=topic.encode(), value=json.dumps(letter.model_dump()).encode())
