"""Capture and its spool against a real broker that is down, then comes up: nothing lost or twice."""

from __future__ import annotations

import base64
import time
import uuid

from kafka import KafkaConsumer

from clora.core.processes import free_port
from clora.core.services import start_broker
from clora.runtime.capture import Capture
from clora.runtime.spool import Spool, SpooledMessage
from clora.wire.interactions import CapturedChoice, CapturedRequest, InteractionRecord


def record(i: int, customer: str = "acme") -> InteractionRecord:
    return InteractionRecord(
        trace_id=f"chatcmpl-{uuid.uuid4().hex}", customer=customer, adapter=None, base_model="tiny",
        request=CapturedRequest(messages=[{"role": "user", "content": f"q{i}"}]), prompt_token_ids=[1, 2, i],
        choices=[CapturedChoice(message={"role": "assistant", "content": "a"}, token_ids=[i], logprobs=[-0.5])],
        latency_ms=1.0, created_at=time.time())


def read_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 60) -> list[InteractionRecord]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             group_id=None, consumer_timeout_ms=2000)
    out: list[InteractionRecord] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            out += [InteractionRecord.model_validate_json(m.value) for m in consumer]
        out += [InteractionRecord.model_validate_json(m.value) for m in consumer]  # anything extra
    finally:
        consumer.close()
    return out


def test_records_survive_a_broker_outage_exactly_once(tmp_path):
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    spool = Spool(tmp_path / "spool", max_bytes=50 << 20)
    capture = Capture(bootstrap, "t.outage", spool, queue_size=100, flush_timeout_s=5).start()
    sent = [record(i) for i in range(300)]
    started = time.perf_counter()
    for r in sent:
        capture.submit(r)  # broker is down: must not block
    assert time.perf_counter() - started < 0.5
    deadline = time.monotonic() + 30
    while spool.size_bytes() == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spool.pending()

    broker = start_broker(tmp_path / "logs", port=port)
    try:
        deadline = time.monotonic() + 60
        while spool.pending() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not spool.pending()
        got = read_all(bootstrap, "t.outage", expect=len(sent))
        assert sorted(r.trace_id for r in got) == sorted(r.trace_id for r in sent)
    finally:
        capture.stop()
        broker.stop()


def test_records_flow_straight_through_when_the_broker_is_up(broker, tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    capture = Capture(broker, "t.direct", spool).start()
    sent = [record(i, customer=f"c{i % 3}") for i in range(500)]
    for r in sent:
        capture.submit(r)
    capture.stop()
    assert not spool.pending()
    got = read_all(broker, "t.direct", expect=len(sent))
    assert sorted(r.trace_id for r in got) == sorted(r.trace_id for r in sent)


def test_spool_resends_only_unacknowledged_lines_and_is_bounded(tmp_path):
    spool = Spool(tmp_path, max_bytes=1000)
    messages = [SpooledMessage("t", b"k", f"value-{i}".encode()) for i in range(40)]
    assert spool.append(messages) > 0  # over the bound: some dropped, counted
    kept = 40 - spool.dropped
    delivered: list[bytes] = []

    def flaky(batch: list[SpooledMessage]) -> set[int]:
        ok = {i for i in range(len(batch)) if i % 2 == 0}  # every other one fails
        delivered.extend(batch[i].value for i in ok)
        return ok

    sent, complete = spool.drain(flaky)
    assert not complete and spool.pending()
    # Reopen (a restart): only what was not acknowledged is sent again.
    reopened = Spool(tmp_path, max_bytes=1000)
    while reopened.pending():
        reopened.drain(lambda batch: (delivered.extend(m.value for m in batch), set(range(len(batch))))[1])
    assert sorted(delivered) == sorted(m.value for m in messages[:kept])
    assert len(delivered) == len(set(delivered))


class CountingCapture(Capture):
    """The real capture, noting the size of each batch it sends to the broker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def _send(self, batch: list[SpooledMessage]) -> list[SpooledMessage]:
        self.batches.append(len(batch))
        return super()._send(batch)


def test_records_arriving_within_the_batch_window_share_one_broker_round_trip(broker, tmp_path):
    capture = CountingCapture(broker, "t.window", Spool(tmp_path / "spool", max_bytes=1 << 20), batch_s=1.5).start()
    sent = [record(i) for i in range(10)]
    for r in sent:  # 10 records over ~0.3 s, well inside the window
        capture.submit(r)
        time.sleep(0.03)
    deadline = time.monotonic() + 30
    while not capture.batches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert capture.batches == [10]
    late = record(99)
    capture.submit(late)
    stopping = time.perf_counter()
    capture.stop()  # stopping does not wait out the window
    assert time.perf_counter() - stopping < 1.0
    assert capture.batches == [10, 1]
    got = read_all(broker, "t.window", expect=11)
    assert sorted(r.trace_id for r in got) == sorted(r.trace_id for r in [*sent, late])


def huge(i: int) -> InteractionRecord:
    """Over the producer's 1 MiB request limit (64 long choices would get there)."""
    big = record(i)
    big.choices = [CapturedChoice(message={"role": "assistant", "content": "x" * 40_000}, token_ids=[i] * 2000,
                                  logprobs=[-0.5] * 2000) for _ in range(32)]
    return big


def test_a_record_the_broker_refuses_for_good_is_dead_lettered_and_blocks_nothing(broker, tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=200 << 20)
    capture = Capture(broker, "t.oversize", spool, batch_s=0.2).start()
    sent = [record(1), huge(2), record(3)]
    try:
        for r in sent:
            capture.submit(r)
        got = read_all(broker, "t.oversize", expect=2)
        assert sorted(r.trace_id for r in got) == sorted([sent[0].trace_id, sent[2].trace_id])
        # The same from the spool (records spooled during an outage): the drain is not wedged.
        spool.append([capture._message(huge(4)), capture._message(record(5))])
        deadline = time.monotonic() + 30
        while spool.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not spool.pending()
    finally:
        capture.stop()
    letters = spool.dead.read()
    assert [InteractionRecord.model_validate_json(base64.b64decode(d.value_b64)).trace_id
            for d in letters][0] == sent[1].trace_id
    assert len(letters) == 2 and all("MessageSizeTooLarge" in d.reason for d in letters)
    got = read_all(broker, "t.oversize", expect=3)
    assert len(got) == 3  # the spooled small record came through


class SlowDiskSpool(Spool):
    """A spool on a disk that takes 0.3 s per write."""

    def append(self, messages):
        time.sleep(0.3)
        return super().append(messages)


def test_a_full_memory_queue_spools_without_making_the_caller_wait_on_the_disk(tmp_path):
    port = free_port()  # nothing listens: every record ends up in the spool
    spool = SlowDiskSpool(tmp_path / "spool", max_bytes=50 << 20)
    capture = Capture(f"127.0.0.1:{port}", "t.slowdisk", spool, queue_size=2, flush_timeout_s=1).start()
    try:
        started = time.perf_counter()
        for i in range(50):
            capture.submit(record(i))
        assert time.perf_counter() - started < 0.2  # a fsync'd write on this thread would take 0.3 s each
    finally:
        capture.stop()
    lines = [line for segment in spool._segments() for line in segment.read_bytes().splitlines()]
    assert len(lines) == 50  # every record on disk, none dropped
