"""Replay buffers against the real Redis-protocol server: idempotence, priority eviction, sampling."""

from __future__ import annotations

import random
import time
import uuid

import pytest
import redis.asyncio as aioredis

from clora.feedback.replay import ReplayBuffer
from clora.wire.feedback import FeedbackEvent, TrainingRecord
from tests.test_capture import record


def training_record(customer: str, kind: str = "rating", event_id: str | None = None) -> TrainingRecord:
    interaction = record(3, customer)
    return TrainingRecord(
        event_id=event_id or uuid.uuid4().hex, customer=customer, trace_id=interaction.trace_id,
        kind=kind, source="operator", reward=1.0 if kind != "comment" else None,
        correction={"role": "assistant", "content": "Hello!"} if kind == "correction" else None,
        created_at=time.time(), interaction=interaction)


@pytest.fixture
async def buffer(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    yield ReplayBuffer(client, default_capacity=50)
    await client.aclose()


async def test_push_is_idempotent_by_event_id(buffer):
    customer = f"rb-{uuid.uuid4().hex[:6]}"
    record = training_record(customer)
    assert await buffer.push(record) is True
    assert await buffer.push(record) is False
    assert await buffer.push(record.model_copy(update={"reward": -1.0})) is False  # same id, other body
    stats = await buffer.stats(customer)
    assert stats.size == 1 and stats.pushed == 1 and stats.duplicates == 2
    assert (await buffer.sample(customer, 5))[0] == record


async def test_eviction_keeps_corrections_over_ratings_and_respects_quota(buffer):
    customer = f"rb-{uuid.uuid4().hex[:6]}"
    await buffer.set_quota(customer, 10)
    corrections = [training_record(customer, "correction") for _ in range(4)]
    for r in corrections:
        await buffer.push(r)
    ratings = [training_record(customer, "rating") for _ in range(20)]
    for r in ratings:
        await buffer.push(r)
    kept = {r.event_id for r in await buffer.sample(customer, 100)}
    stats = await buffer.stats(customer)
    assert stats.size == 10 and stats.evicted == 14 and stats.capacity == 10
    assert {r.event_id for r in corrections} <= kept  # older, but outrank plain ratings
    assert {r.event_id for r in ratings[-6:]} <= kept  # among ratings, the newest stay
    # Once ratings are down to their minimum share (10% of 10: the newest one), the oldest
    # correction goes first.
    more = [training_record(customer, "correction") for _ in range(10)]
    for r in more:
        await buffer.push(r)
    assert {r.event_id for r in await buffer.sample(customer, 100)} == {r.event_id for r in [ratings[-1], *more[1:]]}


async def test_a_buffer_full_of_corrections_keeps_the_newest_ratings_at_their_minimum_share(redis_url):
    """Corrections outrank ratings, but a buffer full of them must not evict every new rating on
    arrival: ratings keep min_share of the capacity (their newest), then corrections make room."""
    client = aioredis.Redis.from_url(redis_url)
    buffer = ReplayBuffer(client, default_capacity=10, min_share=0.2)
    customer = f"rb-{uuid.uuid4().hex[:6]}"
    corrections = [training_record(customer, "correction") for _ in range(10)]
    await buffer.push_many(corrections)
    ratings = [training_record(customer, "rating") for _ in range(5)]
    for r in ratings:
        await buffer.push(r)
    kept = {r.event_id for r in await buffer.sample(customer, 100)}
    assert kept == {r.event_id for r in ratings[-2:] + corrections[2:]}
    stats = await buffer.stats(customer)
    assert stats.size == 10 and stats.evicted == 5
    with pytest.raises(ValueError):
        ReplayBuffer(client, min_share=0.5)
    await client.aclose()


async def test_sampling_policies(buffer):
    customer = f"rb-{uuid.uuid4().hex[:6]}"
    records = [training_record(customer, "correction" if i % 5 == 0 else "rating") for i in range(30)]
    for r in records:
        await buffer.push(r)
    recent = await buffer.sample(customer, 3, "recent")
    assert [r.event_id for r in recent] == [r.event_id for r in records[::-1][:3]]
    uniform = await buffer.sample(customer, 10, "uniform")
    assert len({r.event_id for r in uniform}) == 10
    rng = random.Random(0)
    picks = [r.kind for _ in range(200) for r in await buffer.sample(customer, 1, "prioritized", rng=rng)]
    # 6 corrections (weight 4) vs 24 ratings (weight 2): corrections picked ~1/3 of the time, not 1/5.
    assert picks.count("correction") / len(picks) > 0.22
    with pytest.raises(ValueError):
        await buffer.sample(customer, 1, "newest")  # type: ignore[arg-type]


async def test_consumption_bookkeeping(buffer):
    customer = f"rb-{uuid.uuid4().hex[:6]}"
    record = training_record(customer)
    await buffer.push(record)
    await buffer.mark_consumed(customer, [record.event_id], f"{customer}.v1")
    await buffer.mark_consumed(customer, [record.event_id], f"{customer}.v2")
    assert await buffer.consumed_by(customer, record.event_id) == [f"{customer}.v1", f"{customer}.v2"]
    assert (await buffer.stats(customer)).consumed == 1


def test_feedback_event_validation():
    assert FeedbackEvent(trace_id="t", rating="down").scalar_reward() == -1.0
    assert FeedbackEvent(trace_id="t", reward=0.5, rating="down").scalar_reward() == 0.5
    assert FeedbackEvent(trace_id="t", correction={"role": "assistant", "content": "x"}).kind() == "correction"
    for bad in ({"trace_id": "t"}, {"trace_id": "t", "reward": 2}, {"trace_id": "t", "rating": "meh"},
                {"trace_id": "t", "correction": {"role": "user", "content": "x"}},
                {"trace_id": "t", "reward": 1, "surprise": True}):
        with pytest.raises(ValueError):
            FeedbackEvent.model_validate(bad)
