"""The ingestion consumer against the real broker and Redis: joins, waits, duplicates, dead letters."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import redis.asyncio as aioredis
from kafka import KafkaProducer

from clora.feedback.consumer import IngestConfig, IngestConsumer
from clora.feedback.replay import ReplayBuffer
from clora.wire.feedback import DeadLetter, FeedbackEvent, FeedbackMessage, FeedbackPost, TrainingRecord, joined_record
from tests.helpers import read_topic
from tests.test_capture import read_all
from tests.test_capture import record as interaction


def topics(tag: str) -> IngestConfig:
    return IngestConfig(bootstrap="", interactions_topic=f"i.{tag}", feedback_topic=f"f.{tag}",
                        dead_letter_topic=f"d.{tag}", group_id=f"g.{tag}", max_wait_s=8.0)


def feedback(trace_id: str, customer: str, **signal) -> FeedbackMessage:
    event = FeedbackEvent(trace_id=trace_id, event_id=uuid.uuid4().hex, **(signal or {"rating": "up"}))
    return FeedbackMessage(event=event, customer=customer, submitted_by="customer", received_at=time.time())


async def wait_for(done, timeout_s: float = 60, consumer: IngestConsumer | None = None,
                   task: asyncio.Task | None = None) -> None:
    """Until `done()`; a consumer task that ended meanwhile fails at once with its own error, and
    a timeout says where the consumer was (its state, lag and last error)."""
    deadline = time.monotonic() + timeout_s
    while not await done():
        if task is not None and task.done():
            task.result()  # raises the consumer's error
            raise AssertionError("the consumer stopped before the records arrived")
        health = consumer.health() if consumer is not None else None
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s; consumer: {health}"
        await asyncio.sleep(0.2)


async def test_joins_waits_deduplicates_and_dead_letters(broker, redis_url):
    config = topics(uuid.uuid4().hex[:8])
    config.bootstrap = broker
    client = aioredis.Redis.from_url(redis_url)
    replay = ReplayBuffer(client)
    producer = KafkaProducer(bootstrap_servers=broker, acks="all")
    customer = f"ing-{uuid.uuid4().hex[:6]}"

    early = interaction(1, customer)  # its feedback is sent before it
    on_time = interaction(2, customer)
    joined_first = feedback(early.trace_id, customer, correction={"role": "assistant", "content": "Fixed."})
    dup = feedback(on_time.trace_id, customer, reward=0.5)
    orphan = feedback("chatcmpl-never-served", customer)
    wrong_owner = feedback(on_time.trace_id, customer + "x")
    posted = interaction(3, customer)  # rated by one post of two events, as the webhook sends them
    post = FeedbackPost(id="post-" + uuid.uuid4().hex, customer=customer, submitted_by="customer",
                        received_at=time.time(), events=[
                            FeedbackEvent(trace_id=posted.trace_id, event_id=uuid.uuid4().hex, reward=-0.5),
                            FeedbackEvent(trace_id=posted.trace_id, event_id=uuid.uuid4().hex, rating="up")])

    def send(topic: str, payload: bytes, key: str = customer) -> None:
        producer.send(topic, key=key.encode(), value=payload)

    send(config.feedback_topic, joined_first.model_dump_json().encode())
    send(config.interactions_topic, on_time.model_dump_json().encode())
    send(config.interactions_topic, posted.model_dump_json().encode())
    send(config.feedback_topic, dup.model_dump_json().encode())
    send(config.feedback_topic, post.model_dump_json().encode())
    send(config.feedback_topic, dup.model_dump_json().encode())  # redelivery / double send
    send(config.feedback_topic, orphan.model_dump_json().encode())
    send(config.feedback_topic, wrong_owner.model_dump_json().encode())
    send(config.feedback_topic, b"{not json")
    send(config.interactions_topic, json.dumps({"trace_id": "x"}).encode())
    producer.flush()

    consumer = IngestConsumer(config, client, replay)
    task = asyncio.create_task(consumer.run())
    try:
        # The first records wait for the consumer to join its new group on fresh topics.
        await wait_for(lambda: _size_is(replay, customer, 3), 120, consumer, task)
        first_seen = time.monotonic()
        await asyncio.sleep(1.0)
        assert (await replay.stats(customer)).size == 3  # early's feedback waits for its interaction

        send(config.interactions_topic, early.model_dump_json().encode())
        producer.flush()
        await wait_for(lambda: _size_is(replay, customer, 4), 60, consumer, task)
        records = {r.event_id: r for r in await replay.sample(customer, 10)}
        assert set(records) == {joined_first.event.event_id, dup.event.event_id, *(e.event_id for e in post.events)}
        assert [records[e.event_id].reward for e in post.events] == [-0.5, 1.0]
        assert all(records[e.event_id].completion_token_ids == posted.choices[0].token_ids for e in post.events)
        # Handled (what the webhook's outbox confirms against): a post by its id, a lone event by its own.
        handled = await client.zmscore(consumer.handled_key, [post.id, dup.event.event_id, post.events[0].event_id])
        assert handled[0] is not None and handled[1] is not None and handled[2] is None
        fixed = records[joined_first.event.event_id]
        assert fixed.kind == "correction" and fixed.completion_token_ids == early.choices[0].token_ids
        assert fixed.behaviour_logprobs == early.choices[0].logprobs
        assert fixed.prompt_token_ids == early.prompt_token_ids
        assert records[dup.event.event_id].reward == 0.5
        assert (await replay.stats(customer)).duplicates >= 1
        # The orphan waits max_wait_s, then is dead-lettered like the malformed and mismatched ones.
        await asyncio.sleep(max(0.0, first_seen + config.max_wait_s + 2 - time.monotonic()))
    finally:
        consumer.stop()
        await task
    letters = read_topic(broker, config.dead_letter_topic, lambda v: DeadLetter.model_validate_json(v),
                         lambda d: d.reason.split(":")[0].split(" ")[0], {"malformed", "no", "customer"})
    assert set(letters) == {"malformed", "no", "customer"}
    assert base64.b64decode(letters["no"].value_b64).decode().find(orphan.event.event_id) >= 0
    producer.close()
    await client.aclose()


async def test_feedback_waiting_through_an_ingestion_outage_is_joined_or_dead_lettered_and_counted(redis_url,
                                                                                                   tmp_path):
    """Two events wait for their interactions; the whole pipeline is down past the wait window (its
    in-memory broker restarted empty, as `clora serve`'s does) while one interaction is sent again:
    back up, that one joins (it was in the backlog) and the other is dead-lettered; the waiting and
    dead counts and each event's fate say so throughout."""
    from clora.core.services import start_broker
    from clora.feedback.fates import EventFates

    broker, port, config = own_broker(tmp_path)
    config.max_wait_s = 4.0  # the first pass sees them waiting well inside it
    client = aioredis.Redis.from_url(redis_url)
    replay = ReplayBuffer(client)
    fates = EventFates(client, config.group_id, replay)
    producer = KafkaProducer(bootstrap_servers=config.bootstrap, acks="all")
    customer = f"wait-{uuid.uuid4().hex[:6]}"
    late, never = interaction(1, customer), interaction(2, customer)
    joins, dies = feedback(late.trace_id, customer), feedback(never.trace_id, customer)
    anchor = interaction(3, customer)  # ingested first: the consumer has joined its group

    def send(topic: str, payload: bytes) -> None:
        producer.send(topic, key=customer.encode(), value=payload)
        producer.flush()

    send(config.interactions_topic, anchor.model_dump_json().encode())
    consumer = IngestConsumer(config, client, replay)
    task = asyncio.create_task(consumer.supervise())
    try:
        await wait_for(lambda: client.exists(f"clora:interaction:{anchor.trace_id}"), 120, consumer, task)
        send(config.feedback_topic, joins.model_dump_json().encode())
        send(config.feedback_topic, dies.model_dump_json().encode())

        async def both_waiting() -> bool:
            return (await fates.counts(customer))[0] == 2
        await wait_for(both_waiting, 60, consumer, task)
        fate = await fates.lookup(customer, joins.event.event_id)
        assert fate is not None and (fate.state, fate.trace_id) == ("waiting", late.trace_id)
    finally:
        consumer.stop()
        await task
    assert await client.ttl(f"clora:ingest:{{{config.group_id}}}:waiting:{never.trace_id}") == -1  # no TTL
    producer.close()
    broker.stop()
    broker = start_broker(tmp_path / "b2", port=port)
    producer = KafkaProducer(bootstrap_servers=config.bootstrap, acks="all")
    send(config.interactions_topic, late.model_dump_json().encode())  # while ingestion is down
    await asyncio.sleep(config.max_wait_s + 1)  # past the wait window
    consumer = IngestConsumer(config, client, replay)
    task = asyncio.create_task(consumer.supervise())
    try:
        async def settled() -> bool:
            return (await fates.counts(customer)) == (0, 1)
        await wait_for(settled, 60, consumer, task)
        joined = await fates.lookup(customer, joins.event.event_id)
        dead = await fates.lookup(customer, dies.event.event_id)
    finally:
        consumer.stop()
        await task
    assert joined is not None and joined.state == "in_buffer"
    assert [r.event_id for r in await replay.sample(customer, 10)] == [joins.event.event_id]
    assert dead is not None and dead.state == "dead" and f"no interaction for trace {never.trace_id}" in dead.reason
    assert await fates.lookup(customer, "never-sent") is None
    producer.close()
    broker.stop()
    await client.aclose()


async def _size_is(replay: ReplayBuffer, customer: str, n: int) -> bool:
    return (await replay.stats(customer)).size >= n



async def test_ingestion_comes_back_after_redis_dies_and_delivers_what_arrived_meanwhile(broker, tmp_path):
    """Redis goes away under the ingestion: it fails, is started again with backoff (health says
    so, degraded), and once Redis is back the feedback sent during the outage (never committed)
    is delivered again and reaches the buffer."""
    from clora.core.services import start_redis

    config = topics(uuid.uuid4().hex[:8])
    config.bootstrap, config.restart_backoff_s = broker, 0.2
    service = start_redis(tmp_path / "data", tmp_path, persistent=True)
    port = int(service.url.rsplit(":", 1)[1].split("/")[0])
    client = aioredis.Redis.from_url(service.url, socket_timeout=2)
    replay = ReplayBuffer(client)
    producer = KafkaProducer(bootstrap_servers=broker, acks="all")
    customer = f"sup-{uuid.uuid4().hex[:6]}"

    def send_pair(n: int) -> FeedbackMessage:
        served = interaction(n, customer)
        rated = feedback(served.trace_id, customer)
        producer.send(config.interactions_topic, key=customer.encode(), value=served.model_dump_json().encode())
        producer.send(config.feedback_topic, key=customer.encode(), value=rated.model_dump_json().encode())
        producer.flush()
        return rated

    consumer = IngestConsumer(config, client, replay)
    task = asyncio.create_task(consumer.supervise())
    try:
        before = send_pair(1)
        await wait_for(lambda: _size_is(replay, customer, 1), 120, consumer, task)  # joins its group first
        assert consumer.health().ok and consumer.health().state == "running"

        service.stop()  # AOF flushed on SIGTERM: what was pushed survives
        during = send_pair(2)

        async def restarting() -> bool:
            return consumer.restarts >= 1 and consumer.health().state == "restarting"
        await wait_for(restarting, 30, consumer, task)
        health = consumer.health()
        assert not health.ok and "Error" in health.detail["last_error"]
        await asyncio.sleep(1.0)
        assert not task.done()  # still trying, not gone

        service = start_redis(tmp_path / "data", tmp_path, port=port, persistent=True)
        await wait_for(lambda: _size_is(replay, customer, 2), 60, consumer, task)
        assert {r.event_id for r in await replay.sample(customer, 10)} == {before.event.event_id,
                                                                          during.event.event_id}
        await wait_for(lambda: _true(consumer.health().ok), 30)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 30)
        service.stop()
        producer.close()
        await client.aclose()
    assert consumer.health().state == "stopped"


async def test_an_ingestion_pass_cancelled_mid_batch_is_started_again_and_delivers_once(broker, redis_url):
    """The pass is cancelled (the `CLORA_FAULT_HOOKS` hook) once a batch's interactions are written,
    before its feedback is joined or anything committed: the supervisor counts a restart instead of
    ending with the pass, the rewound consumer reads the batch again, and every event reaches the
    buffer once."""
    config = topics(uuid.uuid4().hex[:8])
    config.bootstrap, config.restart_backoff_s = broker, 0.2
    client = aioredis.Redis.from_url(redis_url)
    replay = ReplayBuffer(client)
    producer = KafkaProducer(bootstrap_servers=broker, acks="all")
    customer = f"cxl-{uuid.uuid4().hex[:6]}"

    def send_pair(n: int) -> FeedbackMessage:
        served = interaction(n, customer)
        rated = feedback(served.trace_id, customer)
        producer.send(config.interactions_topic, key=customer.encode(), value=served.model_dump_json().encode())
        producer.send(config.feedback_topic, key=customer.encode(), value=rated.model_dump_json().encode())
        producer.flush()
        return rated

    consumer = IngestConsumer(config, client, replay)
    task = asyncio.create_task(consumer.supervise())
    try:
        sent = [send_pair(0)]
        await wait_for(lambda: _size_is(replay, customer, 1), 120, consumer, task)  # joins its group first
        consumer.cancel_mid_batch()
        sent += [send_pair(n) for n in range(1, 4)]
        await wait_for(lambda: _true(consumer.restarts == 1), 60, consumer, task)
        assert "cancelled" in consumer.health().detail["last_error"]
        await wait_for(lambda: _size_is(replay, customer, 4), 60, consumer, task)
        assert {r.event_id for r in await replay.sample(customer, 10)} == {m.event.event_id for m in sent}
        assert (await replay.stats(customer)).pushed == 4
        await wait_for(lambda: _true(consumer.health().state == "running"), 30, consumer, task)
        assert consumer.restarts == 1 and not task.done()
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 30)
        producer.close()
        await client.aclose()


async def _true(value: bool) -> bool:
    return value


def own_broker(tmp_path):
    """A broker of this test's own (it will be restarted empty), and topics on it."""
    from clora.core.processes import free_port
    from clora.core.services import start_broker

    port = free_port()
    config = topics(uuid.uuid4().hex[:8])
    config.bootstrap = f"127.0.0.1:{port}"
    return start_broker(tmp_path / "b1", port=port), port, config


async def test_feedback_accepted_before_the_broker_restarts_empty_reaches_the_buffer_once(redis_url, tmp_path):
    """202 means kept: the webhook's publisher writes the outbox before the broker's ack; the broker
    then restarts empty before ingestion read the feedback; the keeper sends it again once ingestion
    has not stored it within resend_after_s, and confirms it once stored."""
    from clora.core.outbox import Outbox
    from clora.core.services import start_broker
    from clora.feedback.outbox_keeper import FeedbackOutboxKeeper
    from clora.feedback.webhook import FeedbackPublisher, posts_of

    broker, port, config = own_broker(tmp_path)
    bootstrap = config.bootstrap
    client = aioredis.Redis.from_url(redis_url)
    replay = ReplayBuffer(client)
    customer = f"obx-{uuid.uuid4().hex[:6]}"
    served = [interaction(i, customer) for i in range(5)]

    # The interactions are ingested (stored in Redis) first.
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for record in served:
        producer.send(config.interactions_topic, key=customer.encode(), value=record.model_dump_json().encode())
    producer.flush()
    producer.close()
    consumer = IngestConsumer(config, client, replay)
    task = asyncio.create_task(consumer.supervise())

    async def stored() -> bool:
        return all([await client.exists(f"clora:interaction:{r.trace_id}") for r in served])
    await wait_for(stored, 60, consumer, task)
    consumer.stop()
    await task

    # Feedback accepted while ingestion is away; then the broker restarts empty.
    outbox = Outbox(tmp_path / "outbox")
    publisher = FeedbackPublisher(bootstrap, config.feedback_topic, outbox=outbox)
    accepted = [feedback(r.trace_id, customer) for r in served]
    await publisher.publish(posts_of([(customer, m.event) for m in accepted[:3]], "customer", time.time()))
    await publisher.publish(posts_of([(customer, m.event) for m in accepted[3:]], "customer", time.time()))
    assert len(outbox) == 2  # one post per request
    broker.stop()
    await publisher.reset()
    broker = start_broker(tmp_path / "b2", port=port)
    keeper = FeedbackOutboxKeeper(outbox, publisher, client, IngestConsumer(config, client, replay).handled_key,
                          resend_after_s=2.0)
    consumer = IngestConsumer(config, client, replay)
    task = asyncio.create_task(consumer.supervise())
    resent = 0
    try:
        deadline = time.monotonic() + 90
        while len(outbox):
            assert time.monotonic() < deadline, f"{len(outbox)} unconfirmed"
            resent += (await keeper.tick())[1]
            await asyncio.sleep(0.5)
        records = await replay.sample(customer, 20)
        assert sorted(r.event_id for r in records) == sorted(m.event.event_id for m in accepted)
        assert resent >= 2  # each post lost once at least (more while the new consumer joins its group)
        print(f"outbox drained in {time.monotonic() - deadline + 90:.1f} s, {resent} resends")
        assert (await keeper.tick()) == (0, 0)  # nothing left to confirm or send
    finally:
        consumer.stop()
        await task
        publisher.close()
        outbox.close()
        broker.stop()
        await client.aclose()


async def test_interactions_captured_before_the_broker_restarts_empty_are_ingested(redis_url, tmp_path):
    """Acknowledged is not stored: capture journals each interaction in its outbox until ingestion
    has it in Redis; the broker restarts empty before ingestion ran, and the keeper sends them again
    (through the spool) until all are stored, then the outbox is empty."""
    from clora.core.outbox import Outbox
    from clora.core.services import start_broker
    from clora.runtime.capture import Capture, InteractionOutboxKeeper
    from clora.runtime.spool import Spool
    from clora.wire.interactions import interaction_key

    broker, port, config = own_broker(tmp_path)
    bootstrap = config.bootstrap
    client = aioredis.Redis.from_url(redis_url)
    customer = f"cob-{uuid.uuid4().hex[:6]}"
    served = [interaction(i, customer) for i in range(5)]
    capture = Capture(bootstrap, config.interactions_topic, Spool(tmp_path / "spool", 1 << 20), batch_s=0.05,
                      outbox=Outbox(tmp_path / "capture-outbox")).start()
    keeper = InteractionOutboxKeeper(capture, client, resend_after_s=2.0)
    consumer = None
    try:
        for record in served:
            await capture.capture(record)
        assert len(capture.outbox) == 5  # journaled before the answer would end
        on_topic = await asyncio.to_thread(read_all, bootstrap, config.interactions_topic, 5)
        assert sorted(r.trace_id for r in on_topic) == sorted(r.trace_id for r in served)  # the first broker has them
        broker.stop()
        broker = start_broker(tmp_path / "b2", port=port)
        consumer = IngestConsumer(config, client, ReplayBuffer(client))
        task = asyncio.create_task(consumer.supervise())
        resent, deadline = 0, time.monotonic() + 120
        while len(capture.outbox):
            assert time.monotonic() < deadline, f"{len(capture.outbox)} interactions never stored"
            resent += (await keeper.tick())[1]
            await asyncio.sleep(0.5)
        assert all([await client.exists(interaction_key(r.trace_id)) for r in served])
        assert resent >= 5  # each lost with the first broker
        assert (await keeper.tick()) == (0, 0)
    finally:
        if consumer is not None:
            consumer.stop()
            await task
        capture.stop()
        capture.outbox.close()
        broker.stop()
        await client.aclose()


def test_a_joined_record_is_the_training_record_of_its_event_and_interaction():
    served = interaction(7, "acme")
    post = FeedbackPost(id="p1", customer="acme", submitted_by="operator:ops", received_at=1234.5, events=[
        FeedbackEvent(trace_id=served.trace_id, event_id="e1", rating="down", comment="too long", source="operator"),
        FeedbackEvent(trace_id=served.trace_id, event_id="e2",
                      correction={"role": "assistant", "content": "Short."}, reward=0.25)])
    for event in post.events:
        joined = joined_record(event, post, served.model_dump_json().encode(), 2000.0)
        record = TrainingRecord.model_validate_json(joined.json)
        expected = TrainingRecord(
            event_id=event.event_id, customer="acme", trace_id=served.trace_id, kind=event.kind(),
            source=event.source, reward=event.scalar_reward(), correction=event.correction, comment=event.comment,
            created_at=1234.5, ingested_at=2000.0, interaction=served)
        assert record == expected
        assert (joined.customer, joined.event_id, joined.kind) == ("acme", event.event_id, event.kind())


async def test_a_batch_of_several_join_chunks_reaches_the_buffer_whole_and_is_marked_handled(redis_url):
    """Chunks are pushed while the next is prepared: every event of every chunk arrives, and the
    posts are marked handled only after all of their pushes."""
    from kafka import TopicPartition

    from clora.feedback.consumer import JOIN_CHUNK

    config = topics(uuid.uuid4().hex[:8])
    client = aioredis.Redis.from_url(redis_url)
    replay = ReplayBuffer(client)
    customer = f"ing-{uuid.uuid4().hex[:6]}"
    await replay.set_quota(customer, 10_000)
    consumer = IngestConsumer(config, client, replay)
    served = [interaction(i, customer) for i in range(50)]
    posts = [FeedbackPost(id=f"post-{p}-{uuid.uuid4().hex}", customer=customer, submitted_by="customer",
                          received_at=time.time(), events=[
                              FeedbackEvent(trace_id=served[(p * 7 + e) % 50].trace_id, event_id=uuid.uuid4().hex,
                                            reward=0.1) for e in range(100)]) for p in range(26)]
    feedback_tp, interactions_tp = TopicPartition(config.feedback_topic, 0), TopicPartition(config.interactions_topic, 0)
    batch = [(interactions_tp, i, r.model_dump_json().encode()) for i, r in enumerate(served)]
    batch += [(feedback_tp, i, post.model_dump_json().encode()) for i, post in enumerate(posts)]
    assert 2600 > 2 * JOIN_CHUNK
    await consumer.handle_batch(batch)
    assert (await replay.stats(customer)).size == 2600
    assert all(s is not None for s in await client.zmscore(consumer.handled_key, [p.id for p in posts]))
    stored = {key.decode() for key in await client.hkeys(f"clora:rb:{{{customer}}}:records")}
    assert stored == {event.event_id for post in posts for event in post.events}
    await client.aclose()
