"""Traffic capture: interaction records to Kafka without ever making serving wait on the broker.

On the request path, before the answer's last byte goes out, `capture` journals the record: the
capture outbox's writer thread hands it to the operating system (write(2); fsync'd in batches,
`Outbox.sync_every_s`), so it survives a SIGKILL of the whole process group. It stays in that
outbox until ingestion has stored it (`InteractionOutboxKeeper` finds its Redis key); one still
missing `resend_after_s` later (a broker that restarted empty, a process killed with records in
memory) is sent again through the spool. A disk that stalls: the answer waits at most
`journal_wait_s` for the write, then is served and the record counted `journal_late` (the write
still lands); an outbox over its bound: the record goes on without its copy, counted `unjournaled`.

Then `queue.put_nowait`. A background thread owns the Kafka producer: it collects records for up
to `batch_s` after the first one arrives (so a broker round trip carries many records rather than
one: on a small machine each round trip's CPU, here and in the broker, is time taken from the
model) and sends each batch with acks=all; whatever the broker does not acknowledge (down,
unreachable, timing out) goes to the on-disk spool, which is drained once the broker answers again.
Delivery to the topic is at-least-once; each record carries its trace id so consumers apply
it exactly once. A record the broker refuses for good (over its size limit: `n=64` long answers)
is dead-lettered with the reason (`Spool.dead`) and never blocks the records behind it. When the
memory queue is full, records go to the spool through a writer thread (one fsync per batch):
serving never waits on the disk; if that writer falls `overflow_size` records behind too, the
record is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

import redis.asyncio as aioredis
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from prometheus_client import Counter, Gauge

from clora.core.outbox import Outbox, OutboxFull, OutboxMessage
from clora.core.outbox_keeper import OutboxKeeper
from clora.runtime.spool import Spool, SpooledMessage
from clora.wire.interactions import InteractionRecord, interaction_key
from clora.wire.kafka import discard_producer, ensure_topics, reliable_producer

log = logging.getLogger("clora.capture")

CAPTURED = Counter("clora_capture_records_total", "Interaction records by outcome", ["outcome"])
QUEUE_DEPTH = Gauge("clora_capture_queue_depth", "Records waiting in memory for the producer")
SPOOL_BYTES = Gauge("clora_capture_spool_bytes", "Bytes waiting in the on-disk spool")

BATCH = 256
# What the broker says about a record itself: no retry can help it, so it is dead-lettered. Any
# other error (a producer fenced or wedged after a broker restart: "InitProducerIdResponse
# UnknownError", non-retriable too) is the connection's: a new producer sends the record again.
RECORD_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, CorruptRecordError,
                 InvalidTimestampError)
RECONNECT_EVERY_S = 2.0


class Capture:
    def __init__(self, bootstrap: str, topic: str, spool: Spool, queue_size: int = 10_000,
                 partitions: int = 4, flush_timeout_s: float = 10.0, batch_s: float = 0.5,
                 overflow_size: int = 10_000, outbox: Outbox | None = None, journal_wait_s: float = 0.05):
        self.bootstrap = bootstrap
        self.outbox = outbox
        self.journal_wait_s = journal_wait_s
        self.topic = topic
        self.partitions = partitions
        self.spool = spool
        self.flush_timeout_s = flush_timeout_s
        self.batch_s = batch_s
        self._queue: queue.Queue[SpooledMessage] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._producer = None
        self._next_connect = 0.0
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._overflow: queue.Queue[SpooledMessage] = queue.Queue(maxsize=overflow_size)
        self._overflow_thread = threading.Thread(target=self._spool_overflow, name="capture-overflow", daemon=True)

    # -- request path -------------------------------------------------------------------------
    async def capture(self, record: InteractionRecord) -> None:
        """Journaled (handed to the OS, bounded by `journal_wait_s`), then queued for the broker;
        never waits on Kafka."""
        message = self._message(record)
        if self.outbox is not None:
            await self._journal(record.trace_id, message)
        self._enqueue(message, record.trace_id)

    async def _journal(self, trace_id: str, message: SpooledMessage) -> None:
        kept = OutboxMessage(id=trace_id, topic=message.topic, key=message.key.decode(), value=message.value.decode(),
                             added_at=time.time())
        try:
            if not await self.outbox.journal([kept], self.journal_wait_s):
                CAPTURED.labels("journal_late").inc()
                log.warning("capture journal: write took over %.3f s (disk stalled?); answer served first",
                            self.journal_wait_s)
        except OutboxFull as exc:  # ingestion far behind: this one is kept by the broker only
            CAPTURED.labels("unjournaled").inc()
            log.error("capture outbox full (%s): record %s kept by the broker only", exc, trace_id)

    def submit(self, record: InteractionRecord) -> None:
        """Queued for the broker, not journaled (a caller that keeps its own copy)."""
        self._enqueue(self._message(record), record.trace_id)

    def _enqueue(self, message: SpooledMessage, trace_id: str) -> None:
        """Never blocks on Kafka or the disk: the memory queue, else the overflow writer's queue
        (to the spool)."""
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            try:
                self._overflow.put_nowait(message)
            except queue.Full:
                CAPTURED.labels("dropped").inc()
                log.error("capture overloaded (memory queue and spool writer full): record %s dropped", trace_id)

    def _spool_overflow(self) -> None:
        """What did not fit in the memory queue, to the spool in batches (one fsync each)."""
        while not self._stop.is_set() or not self._overflow.empty():
            try:
                batch = [self._overflow.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < BATCH:
                try:
                    batch.append(self._overflow.get_nowait())
                except queue.Empty:
                    break
            dropped = self.spool.append(batch)
            CAPTURED.labels("spooled").inc(len(batch) - dropped)
            CAPTURED.labels("dropped").inc(dropped)

    def _message(self, record: InteractionRecord) -> SpooledMessage:
        return SpooledMessage(self.topic, record.customer.encode(), record.model_dump_json().encode())

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "Capture":
        self._thread.start()
        self._overflow_thread.start()
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Send what is queued (or spool it), then close the producer."""
        self._stop.set()
        self._overflow_thread.join(timeout_s)
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # stuck on the broker: what is still in memory goes to disk
            rest = []
            while True:
                try:
                    rest.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            dropped = self.spool.append(rest)
            CAPTURED.labels("spooled").inc(len(rest) - dropped)
            CAPTURED.labels("dropped").inc(dropped)

    def connected(self) -> bool:
        return self._producer is not None

    # -- worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set() or not self._queue.empty():
            batch = self._take_batch(timeout_s=0.1)
            QUEUE_DEPTH.set(self._queue.qsize())
            if self._producer is None and time.monotonic() >= self._next_connect:
                self._connect()
            if batch:
                failed = self._send(batch) if self._producer else batch
                if failed:
                    dropped = self.spool.append(failed)
                    CAPTURED.labels("spooled").inc(len(failed) - dropped)
                    CAPTURED.labels("dropped").inc(dropped)
            if self._producer is not None and self.spool.pending():
                self.spool.drain(self._send_indices, max_messages=2_000)
            SPOOL_BYTES.set(self.spool.size_bytes())
        if self._producer is not None:
            self._producer.close(timeout=5)

    def _take_batch(self, timeout_s: float) -> list[SpooledMessage]:
        """The next record and whatever follows it within `batch_s` (less once stopping)."""
        try:
            batch = [self._queue.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_s
        while len(batch) < BATCH:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or self._stop.is_set():
                    batch.append(self._queue.get_nowait())
                else:  # short waits, so that stop() is noticed within one
                    batch.append(self._queue.get(timeout=min(remaining, 0.05)))
            except queue.Empty:
                if remaining <= 0 or self._stop.is_set():
                    break
        return batch

    def _connect(self) -> None:
        try:
            ensure_topics(self.bootstrap, [self.topic], self.partitions)
            self._producer = reliable_producer(self.bootstrap, "clora-capture")
            log.info("capture connected to Kafka at %s", self.bootstrap)
        except (KafkaError, OSError) as exc:
            self._next_connect = time.monotonic() + RECONNECT_EVERY_S
            log.warning("Kafka unreachable at %s (%s); spooling records", self.bootstrap, exc)

    def _send(self, batch: list[SpooledMessage]) -> list[SpooledMessage]:
        done = self._send_indices(batch)
        return [m for i, m in enumerate(batch) if i not in done]

    def _send_indices(self, batch: list[SpooledMessage]) -> set[int]:
        """Send and wait for acks; the indices done with: acknowledged, or refused for good (a
        record error: dead-lettered with the reason). Any other failure marks the broker down."""
        producer = self._producer
        assert producer is not None
        futures, refused = {}, {}
        try:
            for i, message in enumerate(batch):
                try:
                    futures[i] = producer.send(message.topic, key=message.key, value=message.value)
                except KafkaError as exc:
                    if not isinstance(exc, RECORD_ERRORS):
                        raise
                    refused[i] = exc  # e.g. over the producer's max_request_size: no retry can help
            producer.flush(timeout=self.flush_timeout_s)
        except KafkaError as exc:
            log.warning("Kafka send failed: %s", exc)
        ok = {i for i, f in futures.items() if f.is_done and f.succeeded()}
        refused |= {i: f.exception for i, f in futures.items()
                    if f.is_done and f.failed() and isinstance(f.exception, RECORD_ERRORS)}
        for i, exc in refused.items():
            self.spool.dead.add(batch[i], f"{type(exc).__name__}: {exc}")
        CAPTURED.labels("sent").inc(len(ok))
        CAPTURED.labels("dead").inc(len(refused))
        done = ok | set(refused)
        if len(done) < len(batch):
            self._disconnect()
        return done

    def _disconnect(self) -> None:
        producer, self._producer = self._producer, None
        self._next_connect = time.monotonic() + RECONNECT_EVERY_S
        if producer is not None:
            discard_producer(producer)


class InteractionOutboxKeeper(OutboxKeeper):
    """Confirms captured interactions once ingestion has stored them in Redis; sends again (through
    the spool, which the capture thread drains) those still missing `resend_after_s` later."""

    name = "capture"

    def __init__(self, capture: Capture, redis: aioredis.Redis, every_s: float = 1.0, resend_after_s: float = 30.0):
        assert capture.outbox is not None
        super().__init__(capture.outbox, every_s, resend_after_s)
        self.capture, self.redis = capture, redis

    async def stored(self, ids: list[str]) -> set[str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for trace in ids:
                pipe.exists(interaction_key(trace))
            found = await pipe.execute()
        return {trace for trace, n in zip(ids, found) if n}

    async def resend(self, messages: list[OutboxMessage]) -> None:
        spooled = [SpooledMessage(m.topic, m.key.encode(), m.value.encode()) for m in messages]
        dropped = await asyncio.to_thread(self.capture.spool.append, spooled)
        if dropped:
            log.error("capture spool full: %d interactions not sent again", dropped)
