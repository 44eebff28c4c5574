"""Who trains next: every ready tenant when they fit, fair shares by priority when they do not,
nobody without work, failing tenants backed off (and only them: the trainer's loop retries a failed
step tenant by tenant)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from clora.trainer import loop
from clora.trainer.results import TenantResult
from clora.trainer.scheduler import Candidate, Scheduler


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_all_ready_tenants_train_together_and_idle_ones_wait():
    scheduler = Scheduler(max_tenants=8)
    picked = scheduler.pick([Candidate("a", 1.0), Candidate("b", 0.5), Candidate("idle", 0.0)])
    assert sorted(picked) == ["a", "b"]


def test_shares_follow_priority_when_tenants_do_not_fit():
    scheduler = Scheduler(max_tenants=1)
    counts = Counter(scheduler.pick([Candidate("gold", 1.0, priority=2.0), Candidate("std", 1.0)])[0]
                     for _ in range(300))
    assert counts["gold"] == 200 and counts["std"] == 100


def test_pending_work_weighs_in():
    scheduler = Scheduler(max_tenants=1)
    counts = Counter(scheduler.pick([Candidate("busy", 3.0), Candidate("quiet", 1.0)])[0] for _ in range(400))
    assert counts["busy"] == 300 and counts["quiet"] == 100


def test_peek_says_who_the_next_pick_chooses_and_changes_nothing():
    scheduler = Scheduler(max_tenants=1)
    offered = [Candidate("gold", 1.0, priority=2.0), Candidate("std", 1.0)]
    for _ in range(30):
        predicted = scheduler.peek(offered)
        assert scheduler.peek(offered) == predicted  # peeking twice: the same
        assert scheduler.pick(offered) == predicted


def fake_steps(monkeypatch) -> tuple[list[list[str]], list[tuple[list[str], list[str]]]]:
    """The loop's step and sampling ahead replaced by recorders: which tenants were sampled ahead,
    and per step, its tenants and those whose rollouts it was given."""
    ahead: list[list[str]] = []
    steps: list[tuple[list[str], list[str]]] = []

    async def sample_ahead(trainer, customers):
        ahead.append(list(customers))
        return {c: f"rollouts of {c}" for c in customers}

    async def step(trainer, customers, rollouts=None):
        steps.append((list(customers), sorted(rollouts)))
        return [loop.StepReport(c, 1, f"{c}.v1", None, 0, 0, TenantResult(), 0.0) for c in customers]

    monkeypatch.setattr(loop, "sample_ahead", sample_ahead)
    monkeypatch.setattr(loop, "step", step)
    return ahead, steps


async def test_the_pipelined_loop_samples_ahead_only_tenants_with_rollouts_and_uses_only_those_it_picks(monkeypatch):
    """Rollouts are sampled ahead for the predicted next pick's sampling tenants that are not in
    the current step (one that is would be sampled by the version the step replaces; a
    feedback-only tenant has nothing to sample, and its records are read by its own step); a
    tenant sampled ahead but not picked gets its rollouts dropped, one picked but not sampled
    ahead samples in its step."""
    ahead, steps = fake_steps(monkeypatch)
    samplers = [Candidate(name, 1.0, samples=True) for name in "abcde"]
    feedback = Candidate("feedback", 1.0)
    offers = iter([samplers[:4] + [feedback], samplers[:4] + [feedback],
                   [samplers[i] for i in (0, 1, 3, 4)] + [feedback],  # c's config changed, e is new
                   []])

    async def candidates():
        return next(offers)

    stop = asyncio.Event()
    reports = []
    async for step_reports in loop.drive(None, Scheduler(max_tenants=8), candidates, stop, idle_s=0.01):
        reports.append(step_reports)
        if len(reports) == 3:
            stop.set()
    # Halves of 3 out of 5; a of step 2 is not sampled ahead for step 3, which it is in too.
    assert ahead[:2] == [["d"], ["b", "c"]]
    assert [(sorted(c), r) for c, r in steps] == [(["a", "b", "c"], []), (["a", "d", "feedback"], ["d"]),
                                                  (["a", "b", "d"], ["b"])]
    assert len(reports) == 3

    # Pipeline off: nothing is sampled ahead.
    ahead.clear()
    offers = iter([[Candidate("env", 1.0, samples=True)]] * 2)
    stop = asyncio.Event()
    async for _ in loop.drive(None, Scheduler(), candidates, stop, pipeline=False):
        stop.set()
    assert ahead == []


async def test_tenants_that_sample_take_turns_in_halves_so_none_samples_a_version_behind(monkeypatch):
    """Four tenants with rollouts: each step takes half of them, and the rollouts sampled while it
    computes are the other half's, the ones the next step picks (none in two steps in a row). A
    feedback-only tenant counts in the halves; with fewer than four samplers there is no cap (a
    half of one would sample alone, sharing no decode batch)."""
    ahead, steps = fake_steps(monkeypatch)
    offered = [Candidate(name, 1.0, samples=True) for name in "abcd"]

    async def candidates():
        return offered

    stop = asyncio.Event()
    async for _ in loop.drive(None, Scheduler(max_tenants=8), candidates, stop, idle_s=0.01):
        if len(steps) == 4:
            stop.set()
    assert [(sorted(c), r) for c, r in steps] == [(["a", "b"], []), (["c", "d"], ["c", "d"]), (["a", "b"], ["a", "b"]),
                                                  (["c", "d"], ["c", "d"])]
    assert [sorted(a) for a in ahead[:3]] == [["c", "d"], ["a", "b"], ["c", "d"]]

    assert loop.halves(offered + [Candidate("feedback", 1.0)]) == 3
    assert loop.halves([Candidate(name, 1.0, samples=True) for name in "abc"]) is None  # halves would sample alone
    assert Scheduler(max_tenants=1).pick(offered, limit=2) == ["a"]  # max_tenants still holds


def test_a_failing_tenant_is_backed_off_exponentially_and_others_go_on():
    clock = Clock()
    scheduler = Scheduler(max_tenants=8, base_backoff_s=5, max_backoff_s=60, clock=clock)
    both = [Candidate("bad", 1.0), Candidate("good", 1.0)]
    assert scheduler.failed("bad") == 5
    assert scheduler.pick(both) == ["good"]
    clock.now = 5.0
    assert sorted(scheduler.pick(both)) == ["bad", "good"]
    assert [scheduler.failed("bad") for _ in range(5)] == [10, 20, 40, 60, 60]
    clock.now = 64.0
    assert scheduler.pick(both) == ["good"]
    scheduler.succeeded("bad")
    assert sorted(scheduler.pick(both)) == ["bad", "good"]


def test_skipped_steps_count_in_a_row_until_the_limit_or_a_step_that_lands():
    scheduler = Scheduler(max_skipped_steps=3)
    assert [scheduler.skipped("a") for _ in range(2)] == [1, 2]
    scheduler.succeeded("a")  # a step that lands: the count starts again
    assert [scheduler.skipped("a") for _ in range(4)] == [1, 2, 3, 1]  # halted at 3; resumed, 3 more tries
    assert scheduler.skipped("b") == 1  # per tenant
    with pytest.raises(ValueError):
        Scheduler(max_skipped_steps=0)


async def test_a_failed_step_is_retried_tenant_by_tenant_and_only_the_failing_one_backs_off(monkeypatch):
    steps: list[list[str]] = []

    async def step(trainer, customers: list[str], rollouts=None) -> list[loop.StepReport]:
        steps.append(list(customers))
        if "bad" in customers:
            raise RuntimeError("this tenant's data breaks the step")
        return [loop.StepReport(c, 1, f"{c}.v1", None, 0, 0, TenantResult(), 0.0) for c in customers]

    monkeypatch.setattr(loop, "step", step)
    clock = Clock()
    scheduler = Scheduler(max_tenants=8, base_backoff_s=5, clock=clock)
    scheduler.failed("good")  # an earlier failure: a step that lands clears it
    clock.now = 5.0
    await loop.train(None, scheduler, ["good", "bad", "other"])
    assert steps == [["good", "bad", "other"], ["good"], ["bad"], ["other"]]
    everyone = [Candidate("good", 1.0), Candidate("bad", 1.0), Candidate("other", 1.0)]
    assert sorted(scheduler.pick(everyone)) == ["good", "other"]
    assert scheduler.failures == {"bad": 1}
    clock.now = 10.0
    assert sorted(scheduler.pick(everyone)) == ["bad", "good", "other"]


async def test_a_lone_record_trains_once_it_has_waited_max_record_wait_s(redis_url, tmp_path):
    """Below `min_records` a customer has no work, until its oldest new record has waited
    `max_record_wait_s` since its 202: a lone correction is learnt from within seconds."""
    import time
    import uuid

    import redis.asyncio as aioredis

    from clora.core.admin_client import RuntimeClient
    from clora.core.customers import CustomerStore
    from clora.core.tenant_configs import TenantConfigStore
    from clora.feedback.replay import ReplayBuffer
    from clora.trainer.adapter_store import AdapterStore
    from clora.trainer.data import TrainerIO
    from clora.wire.trainer_config import TenantConfig
    from tests.test_replay import training_record

    client = aioredis.Redis.from_url(redis_url)
    customers, configs, replay = CustomerStore(client), TenantConfigStore(client), ReplayBuffer(client)
    runtime = RuntimeClient("http://127.0.0.1:9", "unused")
    io = TrainerIO(AdapterStore(tmp_path), runtime, replay, configs, customers, tokenizer=None)
    waited, fresh, many = (f"wait-{uuid.uuid4().hex[:6]}" for _ in range(3))
    for name in (waited, fresh, many):
        await customers.create(name)
        await configs.set(name, TenantConfig(min_records=4, max_record_wait_s=30, records_per_step=8))
    await replay.push(training_record(waited, "correction").model_copy(update={"created_at": time.time() - 31}))
    await replay.push(training_record(fresh, "correction"))
    await replay.push_many([training_record(many) for _ in range(4)])
    work = {c.customer: c.work for c in await io.candidates()}
    assert work[waited] == 1 / 8 and work[fresh] == 0.0 and work[many] == 4 / 8
    assert 31 <= await io.oldest_pending_age(waited) < 40
    await runtime.close()
    await client.aclose()


@pytest.mark.parametrize("names", ["a", "ab", "abc"])
async def test_fewer_than_four_samplers_are_never_sampled_a_version_behind(monkeypatch, names):
    """Under four tenants with rollouts, each is in every step, so none is sampled ahead (its
    rollouts would come from the version the step replaces: one-step-lagged rollouts learned far
    slower per step, BENCHMARKS.md); each step samples them together, then trains."""
    ahead, steps = fake_steps(monkeypatch)
    offered = [Candidate(name, 1.0, samples=True) for name in names]

    async def candidates():
        return offered

    stop = asyncio.Event()
    async for _ in loop.drive(None, Scheduler(max_tenants=8), candidates, stop, idle_s=0.01):
        if len(steps) == 3:
            stop.set()
    assert ahead == [] and steps == [(list(names), [])] * 3
