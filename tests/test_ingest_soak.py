"""Ingestion under abuse: 10,000 messages for 8 customers, `clora ingest` SIGKILLed at random points
and restarted, duplicate deliveries, feedback sent before its interaction. Afterwards every buffer
holds exactly the expected records: none missing, none twice."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis.asyncio as aioredis
from kafka import KafkaProducer

from clora.feedback.replay import ReplayBuffer
from clora.wire.feedback import FeedbackEvent, FeedbackMessage
from clora.wire.kafka import ensure_topics
from tests.test_capture import record as interaction

pytestmark = pytest.mark.slow
CUSTOMERS = 8
PAIRS = 5_000  # 5,000 interactions + 5,000 feedback events


async def buffer_ids(redis_url: str, customers: list[str]) -> dict[str, list[str]]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        replay = ReplayBuffer(client)
        return {c: [r.event_id for r in await replay.sample(c, 100_000, "recent")] for c in customers}
    finally:
        await client.aclose()


def progress(redis_url: str, customers: list[str]) -> int:
    return sum(len(v) for v in asyncio.run(buffer_ids(redis_url, customers)).values())


def test_nothing_lost_nothing_twice_across_kills(broker, redis_url, tmp_path):
    tag = uuid.uuid4().hex[:8]
    env = {**os.environ, "CLORA_HOME": str(tmp_path), "CLORA_KAFKA_BOOTSTRAP": broker, "CLORA_REDIS_URL": redis_url,
           "CLORA_INTERACTIONS_TOPIC": f"si.{tag}", "CLORA_FEEDBACK_TOPIC": f"sf.{tag}",
           "CLORA_DEAD_LETTER_TOPIC": f"sd.{tag}", "CLORA_INGEST_GROUP": f"sg.{tag}",
           # Small batches: a whole backlog in a handful of big batches is done before a kill can land.
           "CLORA_INGEST_MAX_POLL_RECORDS": "20"}
    ensure_topics(broker, [f"si.{tag}", f"sf.{tag}", f"sd.{tag}"], 4)
    rng = random.Random(7)
    customers = [f"soak{tag}-{i}" for i in range(CUSTOMERS)]
    expected: dict[str, set[str]] = {c: set() for c in customers}
    producer = KafkaProducer(bootstrap_servers=broker, acks="all", linger_ms=5)
    for i in range(PAIRS):
        customer = customers[i % CUSTOMERS]
        served = interaction(i, customer)
        event = FeedbackEvent(trace_id=served.trace_id, event_id=uuid.uuid4().hex, rating=rng.choice(["up", "down"]))
        message = FeedbackMessage(event=event, customer=customer, submitted_by="customer", received_at=time.time())
        expected[customer].add(event.event_id)
        sends = [(f"si.{tag}", served.model_dump_json()), (f"sf.{tag}", message.model_dump_json())]
        if rng.random() < 0.1:
            sends.reverse()  # feedback before its interaction
        if rng.random() < 0.05:
            sends.append((f"sf.{tag}", message.model_dump_json()))  # a duplicate delivery
        for topic, value in sends:
            producer.send(topic, key=customer.encode(), value=value.encode())
    producer.flush()
    producer.close()

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "clora.cli.main", "ingest"], env=env,
                                stdout=open(tmp_path / "ingest.log", "ab"), stderr=subprocess.STDOUT)

    total = sum(len(v) for v in expected.values())
    progress_at_kills = []
    proc = start()
    try:
        for _ in range(3):  # kill at a random point once this incarnation has made progress, then restart
            before = progress_at_kills[-1] if progress_at_kills else 0
            deadline = time.monotonic() + 120
            while (done := progress(redis_url, customers)) <= before and time.monotonic() < deadline:
                time.sleep(0.2)
            if done >= total:
                break
            time.sleep(rng.uniform(0.0, 0.5))
            progress_at_kills.append(progress(redis_url, customers))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            got = asyncio.run(buffer_ids(redis_url, customers))
            if sum(len(v) for v in got.values()) >= total:
                break
            time.sleep(2)
        time.sleep(3)  # anything extra would show up now
        got = asyncio.run(buffer_ids(redis_url, customers))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # The kills must have hit work in progress, or this test proves nothing.
    assert any(0 < p < total for p in progress_at_kills), progress_at_kills
    for customer in customers:
        assert len(got[customer]) == len(set(got[customer])), f"{customer}: duplicates"
        assert set(got[customer]) == expected[customer], (
            f"{customer}: {len(expected[customer] - set(got[customer]))} missing, "
            f"{len(set(got[customer]) - expected[customer])} unexpected; the ingestion's log ends: "
            + (tmp_path / "ingest.log").read_text()[-2000:])
