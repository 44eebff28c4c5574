"""The trainer sees the policy that sampled: against the real stack (gateway + vLLM, tiny model).

- Answers sampled at temperature 0.7 and top_p 0.9 are captured with their sampling parameters and
  with logprobs equal to the trainer's processed logprobs of the same tokens (mean gap < 0.01 nats);
  the raw logprobs (what vLLM returned before `processed_logprobs`) are far off.
- A step whose logprob gap is above the tenant's bound is skipped; the records that pushed it over
  are quarantined and the tenant trains on the others and newer ones; a tenant whose every batch is
  over is halted after `max_skipped_steps`, /healthz says why, and a new trainer config resumes it.
- A tenant's first step starts from the adapter it is served when that has the configured shape,
  else from zero (and then samples from the base model, which a zero adapter is).
"""

from __future__ import annotations

import httpx
import pytest
import redis.asyncio as aioredis
import torch
from prometheus_client import REGISTRY

from clora.trainer.batching import sequence_logprobs
from clora.trainer.loop import sample, step, train
from clora.trainer.lora import load_peft
from clora.trainer.report import observe
from clora.trainer.scheduler import Scheduler
from clora.wire.feedback import TrainingRecord
from clora.wire.interactions import Sampler
from clora.wire.trainer_config import TenantConfig
from tests.test_gateway import captured, client_for
from tests.test_trainer_loop import make_trainer

pytestmark = pytest.mark.slow
PROMPTS = ["Name three colours.", "Count to five.", "Describe the sea.", "What is a cat?", "Say something kind."]


def trainer_gap(model, records, samplers) -> tuple[float, int]:
    """Mean |trainer - captured| logprob over the records' tokens, and how many tokens."""
    with torch.no_grad():
        result = sequence_logprobs(model, [r.prompt_token_ids for r in records],
                                   [r.choices[0].token_ids for r in records], samplers)
    captured_lp = torch.tensor([lp for r in records for lp in r.choices[0].logprobs])
    return float((result.logprobs - captured_lp).abs().mean()), len(captured_lp)


async def test_captured_logprobs_are_the_trainers_processed_logprobs(gateway, broker, make_customer, redis_url,
                                                                   tiny_model, tmp_path):
    _, key = make_customer("lp")
    client = client_for(gateway, key)
    traces = {client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": text}], max_tokens=32, temperature=0.7, top_p=0.9,
    ).headers["x-clora-trace-id"] for text in PROMPTS}
    records = list(captured(broker, "clora.interactions", traces).values())
    assert len(records) == len(PROMPTS)
    assert all(r.sampler == Sampler(temperature=0.7, top_p=0.9) for r in records)

    redis_client = aioredis.Redis.from_url(redis_url)
    trainer = make_trainer(tiny_model, gateway, redis_client, tmp_path)
    try:
        gap, tokens = trainer_gap(trainer.model, records, [r.sampler for r in records])
        raw_gap, _ = trainer_gap(trainer.model, records, None)
    finally:
        await trainer.io.client.close()
        await redis_client.aclose()
    assert tokens >= 100
    assert gap < 0.01, gap
    assert raw_gap > 0.05, raw_gap  # so the comparison can tell the two apart


async def test_a_batch_over_the_gap_bound_is_quarantined_and_the_tenant_moves_on(gateway, broker, admin, make_customer,
                                                                                  redis_url, tiny_model, tmp_path):
    customer, key = make_customer("gap")
    client = client_for(gateway, key)
    traces = {client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": text}], max_tokens=12,
    ).headers["x-clora-trace-id"] for text in PROMPTS[:4]}
    interactions = list(captured(broker, "clora.interactions", traces).values())
    redis_client = aioredis.Redis.from_url(redis_url)
    trainer = make_trainer(tiny_model, gateway, redis_client, tmp_path)
    config = TenantConfig(rank=8, alpha=16, records_per_step=4, max_logprob_gap=0.2)
    await trainer.io.configs.set(customer, config)

    def record(i: int, interaction, shift: float, to: str = customer) -> TrainingRecord:
        choice = interaction.choices[0]
        wrong = interaction.model_copy(update={"choices": [choice.model_copy(
            update={"logprobs": [lp - shift for lp in choice.logprobs]})]})  # as if another policy sampled
        return TrainingRecord(event_id=f"{to}-{i}", customer=to, trace_id=interaction.trace_id,
                              kind="rating", source="operator", reward=1.0, created_at=0.0, interaction=wrong)

    stuck, _ = make_customer("halt")  # its every batch is over the bound (the same answers, as base-model ones)
    await trainer.io.configs.set(stuck, config)
    try:
        # Two answers whose logprobs another policy sampled, two true ones: the step is over the bound.
        await trainer.io.replay.push_many([record(i, r, 0.5 if i < 2 else 0.0) for i, r in enumerate(interactions)])
        [report] = await step(trainer, [customer])
        assert report.skipped and "logprob gap" in report.skipped and report.version is None
        assert 0.2 < report.result.gap.mean < 0.5 and report.result.gap.max == pytest.approx(0.5, abs=0.01)
        assert (await trainer.io.client.versions(customer)).versions == []  # nothing published
        assert trainer.store.tenants[customer].step == 0  # the update was not applied
        # The two that pushed it over leave the buffer, with why; the true ones wait.
        assert report.quarantined == 2 and await trainer.io.pending(customer) == 2
        quarantined = await trainer.io.replay.quarantined(customer)
        assert set(quarantined) == {f"{customer}-0", f"{customer}-1"}
        assert all("logprob gap" in q.reason and q.record.trace_id in traces for q in quarantined.values())
        replay = admin.get(f"/admin/customers/{customer}/replay").json()
        assert replay["stats"]["quarantined"] == 2 and replay["stats"]["size"] == 2
        fate = admin.get(f"/admin/customers/{customer}/feedback/{customer}-0").json()
        assert fate["state"] == "quarantined" and "logprob gap" in fate["reason"], fate
        observe(report)  # exported as the trainer's metrics
        labels = {"customer": customer}
        assert REGISTRY.get_sample_value("clora_trainer_steps_total", {**labels, "outcome": "skipped"}) == 1
        assert REGISTRY.get_sample_value("clora_trainer_quarantined_records_total", labels) == 2
        assert REGISTRY.get_sample_value("clora_trainer_logprob_gap_nats", {**labels, "stat": "max"}) == \
            pytest.approx(0.5, abs=0.01)

        # No cursor moved by hand: the next step trains on the true answers.
        [report] = await step(trainer, [customer])
        assert report.skipped is None and report.version == f"{customer}.v1" and report.rated == 2
        assert report.result.gap.mean < 0.01

        # A mismatch on every batch (as a trainer that does not compute what the engine serves
        # would see): after `max_skipped_steps` in a row the tenant is halted, and health says why.
        scheduler = Scheduler(max_skipped_steps=2)
        for round_ in range(2):
            await trainer.io.replay.push_many([record(10 * round_ + i, r, 0.5, stuck)
                                               for i, r in enumerate(interactions)])
            [report] = await train(trainer, scheduler, [stuck])
            assert report.skipped and report.quarantined == 4
            halted = await trainer.io.halts.all()
            assert (stuck in halted) == (round_ == 1), halted
        assert halted[stuck].skipped_steps == 2 and "logprob gap" in halted[stuck].reason
        await trainer.io.replay.push_many([record(40, interactions[0], 0.0, stuck)])  # something new to learn
        assert stuck not in {c.customer for c in await trainer.io.candidates()}
        health = httpx.get(f"{gateway}/healthz", timeout=10).json()
        assert health["status"] == "degraded" and health["training"]["ok"] is False
        assert "logprob gap" in health["training"]["detail"]["halted"][stuck]["reason"]
        # The operator's fix (here a bound that fits) resumes it.
        resp = admin.put(f"/admin/customers/{stuck}/trainer-config",
                         json=config.model_copy(update={"max_logprob_gap": 1.0}).model_dump())
        assert resp.status_code == 200, resp.text
        assert await trainer.io.halts.all() == {}
        assert httpx.get(f"{gateway}/healthz", timeout=10).json()["training"]["ok"] is True
        assert stuck in {c.customer for c in await trainer.io.candidates() if c.work > 0}
    finally:
        await trainer.io.halts.resume(stuck)  # the session's stack is shared: leave its health as found
        await trainer.io.client.close()
        await redis_client.aclose()


async def test_the_first_step_starts_from_the_served_adapter_when_it_fits(gateway, admin, make_customer, make_adapter,
                                                                          redis_url, tiny_model, tmp_path):
    redis_client = aioredis.Redis.from_url(redis_url)
    trainer = make_trainer(tiny_model, gateway, redis_client, tmp_path)
    adapter = make_adapter(seed=3, rank=8)  # alpha 32, all seven projections
    served = load_peft(adapter)
    try:
        for rank, adopted in ((8, True), (16, False)):
            customer, _ = make_customer(f"first{rank}")
            resp = admin.post(f"/admin/customers/{customer}/adapters", json={"path": str(adapter), "origin": "hand"})
            assert resp.status_code == 200, resp.text
            config = TenantConfig(rank=rank, alpha=32.0, environment="token-range:0-24576", prompts_per_step=1,
                                  group_size=2, max_new_tokens=4)
            await trainer.io.configs.set(customer, config)
            data = await trainer.io.gather(customer, await sample(trainer, customer))
            state = trainer.store.tenants[customer]
            name = next(iter(served.a))
            if adopted:
                assert torch.equal(state.weights.a[name], served.a[name])
                assert torch.equal(state.weights.b[name], served.b[name])
                assert trainer.io.policy_model(customer, state) == f"{customer}.v1"
            else:  # the served adapter has rank 8: a fresh rank-16 one, which is the base model
                assert all(float(b.abs().max()) == 0 for b in state.weights.b.values())
                assert trainer.io.policy_model(customer, state) == "base"
            # On-policy samples come from that version, so the trainer's logprobs are vLLM's.
            assert data.groups
            [report] = await step(trainer, [customer])
            assert report.result.gap.tokens > 0 and report.result.gap.mean < 0.01, report.result.gap
    finally:
        await trainer.io.client.close()
        await redis_client.aclose()
