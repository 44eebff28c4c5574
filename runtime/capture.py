"""Traffic capture: interaction records to Kafka without ever making serving wait.

The request path only does `queue.put_nowait`. A background thread owns the Kafka producer:
it collects records for up to `batch_s` after the first one arrives (so a broker round trip
carries many records rather than one: on a small machine each round trip's CPU, here and in
the broker, is time taken from the model) and sends each batch with acks=all; whatever the broker does not acknowledge (down, unreachable,
timing out) goes to the on-disk spool, which is drained once the broker answers again.
Delivery to the topic is at-least-once; each record carries its trace id so consumers apply
it exactly once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from kafka.errors import KafkaError
from prometheus_client import Counter, Gauge

from clora.runtime.spool import Spool, SpooledMessage
from clora.wire.interactions import InteractionRecord
from clora.wire.kafka import ensure_topics, reliable_producer

log = logging.getLogger("clora.capture")

CAPTURED = Counter("clora_capture_records_total", "Interaction records by outcome", ["outcome"])
QUEUE_DEPTH = Gauge("clora_capture_queue_depth", "Records waiting in memory for the producer")
SPOOL_BYTES = Gauge("clora_capture_spool_bytes", "Bytes waiting in the on-disk spool")

BATCH = 256
RECONNECT_EVERY_S = 2.0


class Capture:
    def __init__(self, bootstrap: str, topic: str, spool: Spool, queue_size: int = 10_000,
                 partitions: int = 4, flush_timeout_s: float = 10.0, batch_s: float = 0.5):
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.spool = spool
        self.flush_timeout_s = flush_timeout_s
        self.batch_s = batch_s
        self._queue: queue.Queue[InteractionRecord] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._producer = None
        self._next_connect = 0.0
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    # -- request path -------------------------------------------------------------------------
    def submit(self, record: InteractionRecord) -> None:
        """Never blocks on Kafka: memory queue (serialised off the request path), else the spool."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            dropped = self.spool.append([self._message(record)])
            CAPTURED.labels("spooled" if not dropped else "dropped").inc()

    def _message(self, record: InteractionRecord) -> SpooledMessage:
        return SpooledMessage(self.topic, record.customer.encode(), record.model_dump_json().encode())

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "Capture":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Send what is queued (or spool it), then close the producer."""
        self._stop.set()
        self._thread.join(timeout_s)

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
        return [self._message(record) for record in batch]

    def _connect(self) -> None:
        try:
            ensure_topics(self.bootstrap, [self.topic], self.partitions)
            self._producer = reliable_producer(self.bootstrap, "clora-capture")
            log.info("capture connected to Kafka at %s", self.bootstrap)
        except (KafkaError, OSError) as exc:
            self._next_connect = time.monotonic() + RECONNECT_EVERY_S
            log.warning("Kafka unreachable at %s (%s); spooling records", self.bootstrap, exc)

    def _send(self, batch: list[SpooledMessage]) -> list[SpooledMessage]:
        ok = self._send_indices(batch)
        CAPTURED.labels("sent").inc(len(ok))
        return [m for i, m in enumerate(batch) if i not in ok]

    def _send_indices(self, batch: list[SpooledMessage]) -> set[int]:
        """Send and wait for acks; indices acknowledged. Any failure marks the broker down."""
        producer = self._producer
        assert producer is not None
        futures = []
        try:
            for message in batch:
                futures.append(producer.send(message.topic, key=message.key, value=message.value))
            producer.flush(timeout=self.flush_timeout_s)
        except KafkaError as exc:
            log.warning("Kafka send failed: %s", exc)
        ok = {i for i, f in enumerate(futures) if f.is_done and f.succeeded()}
        if len(ok) < len(batch):
            self._disconnect()
        return ok

    def _disconnect(self) -> None:
        producer, self._producer = self._producer, None
        self._next_connect = time.monotonic() + RECONNECT_EVERY_S
        if producer is not None:
            try:
                producer.close(timeout=0)
            except Exception:  # noqa: BLE001 - best effort on a broken connection
                pass
