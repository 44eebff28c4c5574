"""Eval suites and the promotion gate against the live server (tiny model)."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import redis.asyncio as aioredis

from clora.core.admin_client import RuntimeClient
from clora.evals.gate import Best, EvalHistory, PromotionGate
from clora.evals.intervals import half_width, interval90, wilson
from clora.evals.job import EvalJob
from clora.evals.scoring import EvalScore, admin_chat_client
from clora.evals.suites import EvalSuite, GoldenCase, SuiteStore
from tests.conftest import ADMIN_KEY
from tests.test_gateway import client_for

PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(4)]


def publish(admin: httpx.Client, customer: str, path, switch: bool = True) -> dict:
    resp = admin.post(f"/admin/customers/{customer}/adapters", json={"path": str(path), "switch": switch})
    assert resp.status_code == 200, resp.text
    return resp.json()


def served_tokens(gateway: str, key: str, messages) -> list[int]:
    reply = client_for(gateway, key).chat.completions.create(
        model="default", messages=messages, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
    return reply.choices[0].model_extra["token_ids"]


def run(gateway: str, redis_url: str, tmp_path, action, tolerance: float = 0.05):
    """`action(job)` with an eval job wired to the test stack, on a loop of its own."""
    async def main():
        client = aioredis.Redis.from_url(redis_url)
        job = EvalJob(RuntimeClient(gateway, ADMIN_KEY), SuiteStore(client), EvalHistory(client),
                      PromotionGate(tolerance), gateway, ADMIN_KEY)
        try:
            return await action(job)
        finally:
            await job.close()
            await client.aclose()
    return asyncio.run(main())


def golden_suite(gateway: str, customer: str, version: str) -> EvalSuite:
    """Golden answers = what `version` answers now: the served version scores 1.0 by construction."""
    async def answers():
        client = admin_chat_client(gateway, ADMIN_KEY, customer)
        try:
            return [(await client.chat.completions.create(model=version, messages=p, max_tokens=12,
                                                          temperature=0)).choices[0].message.content for p in PROMPTS]
        finally:
            await client.close()
    return EvalSuite(golden=[GoldenCase(messages=p, expected=a) for p, a in zip(PROMPTS, asyncio.run(answers()))],
                     max_tokens=12)


def test_degraded_candidate_is_never_served(gateway, redis_url, make_customer, make_adapter, admin, tmp_path):
    name, key = make_customer("gate")
    good = publish(admin, name, make_adapter(seed=11))
    suite = golden_suite(gateway, name, good["name"])
    before = [served_tokens(gateway, key, p) for p in PROMPTS]

    degraded = publish(admin, name, make_adapter(seed=12), switch=False)  # other weights: other answers
    assert admin.get(f"/admin/customers/{name}/adapters").json()["current"] == good["name"]

    async def gate_once(job: EvalJob):
        await job.suites.set(name, suite)
        first = await job.evaluate(name)
        again = await job.evaluate(name)  # decided already: not re-run, not promoted later
        return first, again, await job.history.decisions(name)

    decision, again, history = run(gateway, redis_url, tmp_path, gate_once)
    assert decision.action == "held-back" and decision.candidate == degraded["name"]
    assert decision.current_score == 1.0 and decision.candidate_score < 1.0 - 0.05
    assert again is None and [d.action for d in history] == ["held-back"]
    listed = admin.get(f"/admin/customers/{name}/adapters").json()
    assert listed["current"] == good["name"]
    assert [served_tokens(gateway, key, p) for p in PROMPTS] == before  # still the good version's answers


def test_equal_candidate_is_promoted_and_rollback_restores(gateway, redis_url, make_customer, make_adapter, admin,
                                                           tmp_path):
    name, key = make_customer("gate")
    first = publish(admin, name, make_adapter(seed=13))
    suite = golden_suite(gateway, name, first["name"])
    same = tmp_path / "same"
    shutil.copytree(first["path"], same)  # identical weights under a new version: scores the same
    candidate = publish(admin, name, same, switch=False)

    async def promote_then_rollback(job: EvalJob):
        await job.suites.set(name, suite)
        decision = await job.evaluate(name)
        served_after_gate = (await job.admin.versions(name)).current
        pinned = await job.admin.pin(name, [])  # what the gate pinned through the admin API
        rolled = await job.rollback(name)
        served_after_rollback = (await job.admin.versions(name)).current
        return decision, served_after_gate, pinned, rolled, served_after_rollback, await job.history.decisions(name)

    decision, after_gate, pinned, rolled, after_rollback, history = run(gateway, redis_url, tmp_path,
                                                                        promote_then_rollback)
    assert decision.action == "promoted" and decision.candidate_score == decision.current_score == 1.0
    assert pinned == sorted([first["name"], candidate["name"]])  # both rollback targets survive pruning
    assert after_gate == candidate["name"]
    assert rolled.candidate == first["name"] and after_rollback == first["name"]
    assert [d.action for d in history] == ["promoted", "rollback"]


def test_pins_take_only_the_customers_own_versions(make_customer, make_adapter, admin):
    name, _ = make_customer("pins")
    other, _ = make_customer("pins")
    own = publish(admin, name, make_adapter(seed=15), switch=False)
    foreign = publish(admin, other, make_adapter(seed=16), switch=False)
    refused = admin.put(f"/admin/customers/{name}/pins", json={"pin": [foreign["name"]]})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    pinned = admin.put(f"/admin/customers/{name}/pins", json={"pin": [own["name"]]})
    assert pinned.status_code == 200 and pinned.json()["pinned"] == [own["name"]]
    released = admin.put(f"/admin/customers/{name}/pins", json={"unpin": [own["name"], "base"]})
    assert released.json()["pinned"] == []
    assert admin.put(f"/admin/customers/{other}/pins", json={}, headers={"Authorization": "Bearer no"}).status_code \
        == 401


def test_rollback_past_the_first_promotion_serves_the_base_model(gateway, redis_url, make_customer, make_adapter,
                                                                 admin, tmp_path):
    name, key = make_customer("gate")
    base_answer = served_tokens(gateway, key, PROMPTS[0])
    version = publish(admin, name, make_adapter(seed=14), switch=False)

    async def manual(job: EvalJob):
        promoted = await job.promote(name, version["name"])
        served = (await job.admin.versions(name)).current
        rolled = await job.rollback(name)
        try:
            await job.rollback(name)
            raise AssertionError("a second rollback has nothing to go back to")
        except LookupError:
            pass
        return promoted, served, rolled

    promoted, served, rolled = run(gateway, redis_url, tmp_path, manual)
    assert promoted.action == "manual-promote" and served == version["name"]
    assert rolled.action == "rollback" and rolled.candidate is None
    assert admin.get(f"/admin/customers/{name}/adapters").json()["current"] is None
    assert served_tokens(gateway, key, PROMPTS[0]) == base_answer


def test_environment_suite_scores_base_model_and_caches(gateway, redis_url, make_customer, tmp_path):
    name, _ = make_customer("gate")
    suite = EvalSuite(environment="token-range:0-100000", n=3, max_tokens=8)  # every token in range

    async def twice(job: EvalJob) -> tuple[EvalScore, EvalScore]:
        return await job.score(name, suite, None), await job.score(name, suite, None)

    first, second = run(gateway, redis_url, tmp_path, twice)
    assert first.score == 1.0 and first.n == 3 and len(first.answers) == 3
    assert second == first  # cached: the same record, not a re-run


def test_gate_tolerance():
    gate = PromotionGate(tolerance=0.1)
    score = lambda s: EvalScore(adapter="x", suite="s", score=s, n=10, seconds=0, at=0)  # noqa: E731
    assert gate.decide("c", score(0.8), score(0.7), "c.v1", "c.v2").action == "promoted"
    assert gate.decide("c", score(0.8), score(0.69), "c.v1", "c.v2").action == "held-back"
    assert gate.decide("c", score(0.2), score(0.9), None, "c.v1").action == "promoted"


def test_gate_refuses_a_slow_drift_below_the_best_served():
    """Each candidate is within tolerance of the served one, but three steps of -0.08 add up: the
    gate holds back the one that falls more than the tolerance below the best it ever served."""
    gate = PromotionGate(tolerance=0.1)
    score = lambda s: EvalScore(adapter="x", suite="s", score=s, n=10, seconds=0, at=0)  # noqa: E731
    best = Best(version="c.v1", score=0.8)
    assert gate.decide("c", score(0.8), score(0.72), "c.v1", "c.v2", best).action == "promoted"
    drifted = gate.decide("c", score(0.72), score(0.64), "c.v2", "c.v3", best)
    assert drifted.action == "held-back" and "below the best served (c.v1, 0.800)" in drifted.reason
    assert drifted.best == "c.v1" and drifted.best_score == 0.8
    # Without a best on record, the served version is the bar.
    assert gate.decide("c", score(0.72), score(0.64), "c.v2", "c.v3").action == "promoted"


def test_the_job_keeps_the_best_served_score_per_suite(gateway, redis_url, make_customer, make_adapter, admin,
                                                       tmp_path):
    name, _ = make_customer("best")
    suite = EvalSuite(environment="token-range:0-24576", n=8, max_tokens=8)  # about half of the tokens score

    async def act(job: EvalJob):
        await job.suites.set(name, suite)
        publish(admin, name, make_adapter(seed=7), switch=False)
        decision = await job.evaluate(name)
        return decision, await job.history.best(name, suite.fingerprint())

    decision, best = run(gateway, redis_url, tmp_path, act, tolerance=1.0)  # any candidate is promoted
    assert decision.action == "promoted" and decision.current is None
    assert decision.best is None and decision.best_score == decision.current_score  # the base model set the bar
    # After the promotion the bar is the better of the two: a worse promotion never lowers it.
    if decision.candidate_score > decision.current_score:
        assert best == Best(version=decision.candidate, score=decision.candidate_score)
    else:
        assert best == Best(version=None, score=decision.current_score)


def test_intervals_by_hand():
    # Wilson at 90%, 8 of 10 (z^2 = 2.7055): centre (0.8 + 0.1353) / 1.2706 = 0.7361, half-width
    # 1.6449 * sqrt(0.016 + 0.006764) / 1.2706 = 0.1953: 0.541..0.931.
    low, high = wilson(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.541, 0.931)
    assert wilson(0, 16)[0] == 0.0 and 0.1 < wilson(0, 16)[1] < 0.2  # not degenerate at 0/n
    assert interval90([1.0] * 8 + [0.0] * 2) == wilson(8, 10)
    partial = interval90([0.5, 0.25, 0.75, 1.0] * 16)
    assert partial[0] < 0.625 < partial[1] and partial == interval90([0.5, 0.25, 0.75, 1.0] * 16)  # seeded
    # 64 prompts at a share near 0.5 give about +/-0.1: what the demo's report set needs.
    assert half_width(*wilson(32, 64)) < 0.105


def test_the_base_model_answers_each_question_once_for_every_customer(gateway, redis_url, make_customer, tmp_path):
    """Customers' suites draw the same questions: the base model's greedy answers are asked once and
    shared (the demo's five report sets cost 64 requests, not 320); adapters are asked per customer."""
    names = [make_customer("shared")[0] for _ in range(3)]
    suite = EvalSuite(environment="preference:json", n=6, max_tokens=8, split="report")

    async def act(job: EvalJob):
        scores = await asyncio.gather(*[job.score(name, suite, None) for name in names])
        return scores, job.base_answers.asked

    scores, asked = run(gateway, redis_url, tmp_path, act)
    assert asked == 6  # one request per question, not one per customer and question
    assert scores[0].answers == scores[1].answers == scores[2].answers and len(scores[0].answers) == 6


def test_cached_scores_go_with_their_pruned_versions(gateway, redis_url, make_customer, make_adapter, admin,
                                                     tmp_path):
    name, _ = make_customer("prune")
    v1 = publish(admin, name, make_adapter(seed=1))["name"]
    suite = EvalSuite(environment="token-range:0-100000", n=2, max_tokens=4)

    async def scored(job: EvalJob) -> list[str]:
        await job.score(name, suite, v1)
        await job.score(name, suite, None)
        await job.history.cache_score(EvalScore(adapter=f"{name}/{name}.v99", suite=suite.fingerprint(), score=1.0,
                                                n=1, seconds=0, at=0))  # a version pruned since
        await job.candidate(name)  # each gate round looks at the registry's versions
        return [f.decode() async for f, _ in job.history.redis.hscan_iter("clora:eval:scores", match=f"{name}/*")]

    kept = run(gateway, redis_url, tmp_path, scored)
    assert sorted(k.split("|")[0] for k in kept) == sorted([f"{name}/{v1}", f"{name}/base"])
