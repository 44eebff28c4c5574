"""The trainer sees the policy that sampled: against the real stack (gateway + vLLM, tiny model).

- Answers sampled at temperature 0.7 and top_p 0.9 are captured with their sampling parameters and
  with logprobs equal to the trainer's processed logprobs of the same tokens (mean gap < 0.01 nats);
  the raw logprobs (what vLLM returned before `processed_logprobs`) are far off.
- A step whose logprob gap is above the tenant's bound is skipped, and its records are kept.
- A tenant's first step starts from the adapter it is served when that has the configured shape,
  else from zero (and then samples from the base model, which a zero adapter is).
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
import torch
from prometheus_client import REGISTRY

from clora.trainer.batching import sequence_logprobs
from clora.trainer.loop import observe, step
from clora.trainer.lora import load_peft
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


async def test_a_step_whose_logprob_gap_is_over_the_bound_is_skipped(gateway, broker, make_customer, redis_url,
                                                                   tiny_model, tmp_path):
    customer, key = make_customer("gap")
    client = client_for(gateway, key)
    traces = {client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": text}], max_tokens=12,
    ).headers["x-clora-trace-id"] for text in PROMPTS[:4]}
    interactions = captured(broker, "clora.interactions", traces)
    redis_client = aioredis.Redis.from_url(redis_url)
    trainer = make_trainer(tiny_model, gateway, redis_client, tmp_path)
    await trainer.io.configs.set(customer, TenantConfig(rank=8, alpha=16, records_per_step=4, max_logprob_gap=0.2))

    def record(i: int, interaction, shift: float) -> TrainingRecord:
        choice = interaction.choices[0]
        wrong = interaction.model_copy(update={"choices": [choice.model_copy(
            update={"logprobs": [lp - shift for lp in choice.logprobs]})]})  # as if another policy sampled
        return TrainingRecord(event_id=f"{customer}-{i}", customer=customer, trace_id=interaction.trace_id,
                              kind="rating", source="operator", reward=1.0, created_at=0.0, interaction=wrong)

    try:
        await trainer.io.replay.push_many([record(i, r, 0.5) for i, r in enumerate(interactions.values())])
        [report] = await step(trainer, [customer])
        assert report.skipped and "logprob gap" in report.skipped and report.version is None
        assert report.result.gap.mean == pytest.approx(0.5, abs=0.01)
        assert (await trainer.io.client.versions(customer))["versions"] == []  # nothing published
        assert await trainer.io.pending(customer) == 4  # the records wait
        assert trainer.store.tenants[customer].step == 0  # the update was not applied
        observe(report)  # exported as the trainer's metrics
        assert REGISTRY.get_sample_value("clora_trainer_steps_total",
                                         {"customer": customer, "outcome": "skipped"}) == 1
        assert REGISTRY.get_sample_value("clora_trainer_logprob_gap_nats",
                                         {"customer": customer, "stat": "mean"}) == pytest.approx(0.5, abs=0.01)

        # The same answers with their true logprobs: the step lands.
        await trainer.io.replay.push_many([record(i + 10, r, 0.0) for i, r in enumerate(interactions.values())])
        await trainer.io.replay.set_cursor(customer, 4)  # past the wrong ones
        [report] = await step(trainer, [customer])
        assert report.skipped is None and report.version == f"{customer}.v1"
        assert report.result.gap.mean < 0.01
    finally:
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
            data = await trainer.io.gather(customer, trainer.layers)
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
