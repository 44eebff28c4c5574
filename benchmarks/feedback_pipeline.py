"""Feedback pipeline benchmark: webhook -> Kafka -> ingestion consumer -> replay buffers.

Starts the embedded broker and Redis, then measures in one run:
  1. the raw ceiling: kafka-python produce (acks=all) in this process, kafka-python consume in a
     second process with pipelined raw Redis writes (HSET of a record-sized value per event) and
     the offsets committed after the writes; messages and values sized like clora's;
  2. clora's path: feedback POSTed in batches to `POST /v1/feedback` (the same router as `clora
     serve`, served alone by uvicorn in its own process), consumed by `clora ingest` (its own
     process), joined with interactions ingested beforehand, pushed into the replay buffers:
     events/s from the first POST until the last record is in a buffer;
  3. end-to-end latency per event (client send -> the record's `ingested_at`) with open-loop
     traffic at half of the rate measured in 2, in batches of the same size (--latency-batch to vary).
Writes benchmarks/results/feedback.json (unless --quick).

    .venv/bin/python benchmarks/feedback_pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx
import redis
from kafka import KafkaConsumer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
from clora.core.processes import ChildProcess, free_port  # noqa: E402
from clora.core.provenance import provenance  # noqa: E402
from clora.core.services import start_broker, start_redis  # noqa: E402
from clora.core.traces import TraceSigner  # noqa: E402
from clora.wire.feedback import FeedbackEvent, FeedbackMessage, FeedbackPost, TrainingRecord, joined_record  # noqa: E402
from clora.wire.interactions import CapturedChoice, CapturedRequest, InteractionRecord  # noqa: E402
from clora.wire.kafka import ensure_topics, reliable_producer  # noqa: E402

console = Console()
SECRET = b"benchmark-trace-secret-0123456789"
CUSTOMERS = 8
PROMPT_TOKENS, COMPLETION_TOKENS = 120, 64
TOPICS = {"CLORA_INTERACTIONS_TOPIC": "bench.interactions", "CLORA_FEEDBACK_TOPIC": "bench.feedback",
          "CLORA_DEAD_LETTER_TOPIC": "bench.dead"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def interaction(signer: TraceSigner, customer: str, rng: random.Random) -> InteractionRecord:
    """Shaped like a captured chat turn: 120 prompt tokens, 64 sampled tokens with logprobs."""
    return InteractionRecord(
        trace_id=signer.new(customer), customer=customer, adapter=f"{customer}.v1", adapter_version=1,
        base_model="bench", request=CapturedRequest(messages=[{"role": "user", "content": "How do I reset it?"}],
                                                    sampling={"temperature": 0.7}),
        prompt_token_ids=[rng.randrange(49152) for _ in range(PROMPT_TOKENS)],
        choices=[CapturedChoice(message={"role": "assistant", "content": "Hold the button for ten seconds. " * 4},
                                finish_reason="stop", token_ids=[rng.randrange(49152) for _ in range(COMPLETION_TOKENS)],
                                logprobs=[-rng.random() * 3 for _ in range(COMPLETION_TOKENS)])],
        latency_ms=850.0, created_at=time.time())


def feedback_event(trace_id: str, rng: random.Random) -> dict:
    return FeedbackEvent(trace_id=trace_id, reward=round(rng.uniform(-1, 1), 3), source="automated",
                         event_id=uuid.uuid4().hex).model_dump(exclude_none=True)


# -- roles run in child processes -------------------------------------------------------------------------
def serve_webhook(bootstrap: str, redis_url: str, port: int) -> None:
    """The feedback router of `clora serve`, alone: same auth, validation, trace check, acks=all."""
    import redis.asyncio as aioredis
    import uvicorn
    from fastapi import FastAPI

    from clora.core.customers import CustomerStore
    from clora.core.http import install_error_handlers
    from clora.core.outbox import Outbox
    from clora.core.settings import Settings
    from clora.feedback.joins import handled_key
    from clora.feedback.outbox_keeper import FeedbackOutboxKeeper
    from clora.feedback.webhook import FeedbackPublisher, WebhookLimits, mount_feedback

    # As in `clora serve`: each event in the outbox (fsync'd) before its 202, confirmed against
    # what ingestion has stored by the keeper running beside the webhook.
    outbox = Outbox(Path(tempfile.mkdtemp(prefix="clora-bench-outbox-")))
    publisher = FeedbackPublisher(bootstrap, TOPICS["CLORA_FEEDBACK_TOPIC"], outbox=outbox)
    client = aioredis.Redis.from_url(redis_url)
    keeper = FeedbackOutboxKeeper(outbox, publisher, client, handled_key(Settings().ingest_group))
    stop = asyncio.Event()

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(keeper.run(stop))
        yield
        stop.set()
        await task

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    limits = WebhookLimits(events_per_s=1e9, burst=10**9)  # measure the pipeline, not the rate limiter
    mount_feedback(app, CustomerStore(client), TraceSigner(SECRET), publisher, limits)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def raw_consume(bootstrap: str, redis_url: str, topic: str, count: int, value_bytes: int) -> None:
    """Ceiling consumer: poll, one pipelined HSET per event, commit after the writes."""
    client = redis.Redis.from_url(redis_url)
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"raw-{uuid.uuid4().hex[:6]}",
                             enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=500)
    value = b"x" * value_bytes
    while not consumer.assignment():  # joined the group (the topic is still empty)
        consumer.poll(100)
    print("ready", flush=True)
    seen = 0
    while seen < count:
        for messages in consumer.poll(500).values():
            with client.pipeline(transaction=False) as pipe:
                for m in messages:
                    pipe.hset(f"raw:{{{m.key.decode()}}}", m.value[:32], value)
                pipe.execute()
            seen += len(messages)
        consumer.commit()
    print(json.dumps({"last_write": time.time()}), flush=True)
    consumer.close(autocommit=False)


# -- measurements --------------------------------------------------------------------------------------------
def raw_ceiling(bootstrap: str, redis_url: str, count: int, message_bytes: int, value_bytes: int) -> float:
    topic = f"bench.raw.{uuid.uuid4().hex[:6]}"
    ensure_topics(bootstrap, [topic], 4)
    reader = subprocess.Popen([sys.executable, __file__, "--role", "raw-consumer", bootstrap, redis_url, topic,
                               str(count), str(value_bytes)], stdout=subprocess.PIPE, text=True)
    if reader.stdout.readline().strip() != "ready":
        raise RuntimeError("raw consumer failed to start")
    producer = reliable_producer(bootstrap, "bench-raw")
    started = time.time()
    for i in range(count):  # same shape as clora's: a unique id up front, padded to the message size
        body = uuid.uuid4().hex.encode()
        producer.send(topic, key=f"c{i % CUSTOMERS}".encode(), value=body + b" " * (message_bytes - len(body)))
    producer.flush()
    producer.close()
    out, _ = reader.communicate(timeout=600)
    return count / (json.loads(out.strip())["last_write"] - started)


async def post_batches(url: str, keys: dict[str, str], batches: list[tuple[str, list[dict]]], clients: int,
                       sent_at: dict[str, float], progress: Progress | None = None) -> None:
    """Closed loop: `clients` concurrent callers, each POSTing the next batch when the last was accepted."""
    queue: asyncio.Queue = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    task = progress.add_task("webhook", total=sum(len(b) for _, b in batches)) if progress else None
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
        async def caller() -> None:
            while not queue.empty():
                customer, events = queue.get_nowait()
                await post_one(client, url, keys[customer], events, sent_at)
                if progress:
                    progress.advance(task, len(events))

        await asyncio.gather(*[caller() for _ in range(clients)])


ACCEPT_MS: list[float] = []  # per POST: sent -> 202


async def post_one(client: httpx.AsyncClient, url: str, key: str, events: list[dict],
                   sent_at: dict[str, float]) -> None:
    now = time.time()
    for event in events:
        sent_at[event["event_id"]] = now
    resp = await client.post(f"{url}/v1/feedback", json={"events": events}, headers={"Authorization": f"Bearer {key}"})
    if resp.status_code != 202:
        raise RuntimeError(f"webhook answered {resp.status_code}: {resp.text[:200]}")
    ACCEPT_MS.append((time.time() - now) * 1000)


async def open_loop(url: str, keys: dict[str, str], traces: dict[str, list[str]], rate: float, seconds: float,
                    batch: int, sent_at: dict[str, float], rng: random.Random) -> int:
    """Batches sent on a fixed schedule (rate events/s), whether or not earlier ones finished."""
    interval = batch / rate
    customers = list(traces)
    tasks = []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()
        for k in range(int(seconds / interval)):
            await asyncio.sleep(max(0.0, start + k * interval - time.perf_counter()))
            customer = customers[k % len(customers)]
            events = [feedback_event(rng.choice(traces[customer]), rng) for _ in range(batch)]
            tasks.append(asyncio.create_task(post_one(client, url, keys[customer], events, sent_at)))
        await asyncio.gather(*tasks)
    return len(tasks) * batch


def wait_for_records(r: redis.Redis, customers: list[str], expected: int, timeout_s: float = 120) -> dict[str, float]:
    """event_id -> ingested_at, once every expected record is in a buffer."""
    deadline = time.monotonic() + timeout_s
    keys = [f"clora:rb:{{{c}}}:records" for c in customers]
    while sum(r.hlen(k) for k in keys) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sum(r.hlen(k) for k in keys)} of {expected} records arrived")
        time.sleep(0.2)
    out = {}
    for key in keys:
        for event_id, raw in r.hscan_iter(key, count=1000):
            out[event_id.decode()] = TrainingRecord.model_validate_json(raw).ingested_at
    return out


def ingest_interactions(bootstrap: str, r: redis.Redis, records: list[InteractionRecord]) -> None:
    producer = reliable_producer(bootstrap, "bench-interactions")
    for rec in records:
        producer.send(TOPICS["CLORA_INTERACTIONS_TOPIC"], key=rec.customer.encode(), value=rec.model_dump_json().encode())
    producer.flush()
    producer.close()
    deadline = time.monotonic() + 300
    while sum(1 for _ in r.scan_iter("clora:interaction:*", count=5000)) < len(records):
        if time.monotonic() > deadline:
            raise TimeoutError("interactions were not ingested")
        time.sleep(0.5)


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    home = Path(tempfile.mkdtemp(prefix="clora-feedback-bench-"))
    broker = start_broker(home)
    store = start_redis(home / "redis", home)  # AOF on, as `clora serve` runs it
    children: list[ChildProcess] = []
    try:
        r = redis.Redis.from_url(store.url)
        signer = TraceSigner(SECRET)
        customers = [f"bench{i}" for i in range(CUSTOMERS)]
        sample = interaction(signer, customers[0], rng)
        message_bytes = len(FeedbackMessage(event=FeedbackEvent(**feedback_event(sample.trace_id, rng)),
                                            customer=customers[0], submitted_by="customer",
                                            received_at=time.time()).model_dump_json())
        post = FeedbackPost(id="size", customer=customers[0], submitted_by="customer", received_at=time.time(),
                            events=[FeedbackEvent(**feedback_event(sample.trace_id, rng))])
        value_bytes = len(joined_record(post.events[0], post, sample.model_dump_json().encode(), time.time()).json)

        console.print(f"[bold]1. raw ceiling[/]: {args.events} messages of {message_bytes} B, "
                      f"Redis values of {value_bytes} B")
        ceiling = raw_ceiling(broker.url, store.url, args.events, message_bytes, value_bytes)
        console.print(f"   {ceiling:,.0f} events/s")

        import redis.asyncio as aioredis

        from clora.core.customers import CustomerStore
        from clora.feedback.replay import ReplayBuffer
        async_r = aioredis.Redis.from_url(store.url)
        keys = {c: await CustomerStore(async_r).create(c) for c in customers}
        for c in customers:  # room for every event: the benchmark counts records, eviction would hide some
            await ReplayBuffer(async_r).set_quota(c, 1_000_000)
        await async_r.aclose()
        ensure_topics(broker.url, list(TOPICS.values()), 4)
        env = {**os.environ, "CLORA_HOME": str(home), "CLORA_KAFKA_BOOTSTRAP": broker.url,
               "CLORA_REDIS_URL": store.url, **TOPICS}
        children.append(ChildProcess("ingest", [str(Path(sys.executable).with_name("clora")), "ingest"],
                                     home / "ingest.log", env=env).start())
        port = free_port()
        webhook = ChildProcess("webhook", [sys.executable, __file__, "--role", "webhook", broker.url, store.url,
                                           str(port)], home / "webhook.log", env=env).start()
        children.append(webhook)
        webhook.wait_for_port("127.0.0.1", port, timeout_s=60)
        url = f"http://127.0.0.1:{port}"

        traces = {c: [] for c in customers}
        records = []
        for i in range(args.interactions):
            rec = interaction(signer, customers[i % CUSTOMERS], rng)
            traces[rec.customer].append(rec.trace_id)
            records.append(rec)
        console.print(f"[bold]2. clora[/]: {len(records)} interactions ingested first (not timed)")
        ingest_interactions(broker.url, r, records)

        # Warm-up: connections, producer metadata, consumer assignment.
        sent_at: dict[str, float] = {}
        warm = [(c, [feedback_event(traces[c][0], rng)]) for c in customers]
        await post_batches(url, keys, warm, 4, sent_at)
        wait_for_records(r, customers, len(warm))

        batches = []
        for i in range(args.events // args.batch):
            customer = customers[i % CUSTOMERS]
            batches.append((customer, [feedback_event(rng.choice(traces[customer]), rng) for _ in range(args.batch)]))
        total = len(warm) + sum(len(b) for _, b in batches)
        sent_at.clear()
        started = time.time()
        with Progress(console=console, transient=True) as progress:
            await post_batches(url, keys, batches, args.clients, sent_at, progress)
        accepted_s = time.time() - started
        ingested = wait_for_records(r, customers, total)
        last = max(ingested[e] for e in sent_at)
        events_per_s = len(sent_at) / (last - started)
        max_latencies = [(ingested[e] - t) * 1000 for e, t in sent_at.items()]
        console.print(f"   {events_per_s:,.0f} events/s into the replay buffers "
                      f"(webhook accepted {len(sent_at) / accepted_s:,.0f}/s)")

        rate = events_per_s / 2
        console.print(f"[bold]3. latency[/] at {rate:,.0f} events/s for {args.seconds:g} s, batches of {args.latency_batch}")
        sent_at = {}
        ACCEPT_MS.clear()
        sent = await open_loop(url, keys, traces, rate, args.seconds, args.latency_batch, sent_at, rng)
        ingested = wait_for_records(r, customers, total + sent)
        latencies = [(ingested[e] - t) * 1000 for e, t in sent_at.items()]
        return {
            "events_per_s": round(events_per_s, 1), "raw_ceiling_events_per_s": round(ceiling, 1),
            "ratio_to_raw": round(events_per_s / ceiling, 3),
            "p50_ms": round(pct(latencies, 0.5), 1), "p99_ms": round(pct(latencies, 0.99), 1),
            "accepted_p50_ms": round(pct(ACCEPT_MS, 0.5), 1), "accepted_p99_ms": round(pct(ACCEPT_MS, 0.99), 1),
            "latency_rate_events_per_s": round(rate, 1), "latency_events": len(latencies),
            "webhook_accepted_events_per_s": round(len(max_latencies) / accepted_s, 1),
            "max_rate_p50_ms": round(pct(max_latencies, 0.5), 1), "max_rate_p99_ms": round(pct(max_latencies, 0.99), 1),
            "events": args.events, "batch": args.batch, "clients": args.clients, "customers": CUSTOMERS,
            "latency_batch": args.latency_batch, "message_bytes": message_bytes, "record_bytes": value_bytes,
        }
    finally:
        for child in children:
            child.stop()
        store.stop()
        broker.stop()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        role, rest = sys.argv[2], sys.argv[3:]
        if role == "webhook":
            serve_webhook(rest[0], rest[1], int(rest[2]))
        else:
            raw_consume(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]))
        return
    started_at = datetime.now(timezone.utc)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer events; results are not written.")
    parser.add_argument("--events", type=int, default=100_000, help="Events in the maximum-rate run (~10 s).")
    parser.add_argument("--interactions", type=int, default=4_000)
    parser.add_argument("--batch", type=int, default=100, help="Events per POST at max rate.")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="Duration of the latency run.")
    parser.add_argument("--latency-batch", type=int, default=None,
                        help="Events per POST in the latency run (default: --batch, the shape the maximum rate "
                             "was measured with; smaller batches at the same event rate are more requests/s).")
    args = parser.parse_args()
    args.latency_batch = args.latency_batch or args.batch
    if args.quick:
        args.events, args.interactions, args.seconds = 4_000, 1_000, 8.0
    result = asyncio.run(run(args))
    table = Table(title="feedback pipeline")
    for key in ("events_per_s", "raw_ceiling_events_per_s", "ratio_to_raw", "p50_ms", "p99_ms",
                "accepted_p50_ms", "accepted_p99_ms",
                "latency_rate_events_per_s", "max_rate_p50_ms", "max_rate_p99_ms"):
        table.add_row(key, str(result[key]))
    console.print(table)
    if not args.quick:
        result |= {**provenance("python benchmarks/feedback_pipeline.py", started_at=started_at),
                   "date": time.strftime("%Y-%m-%d")}
        out = REPO / "benchmarks" / "results" / "feedback.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
