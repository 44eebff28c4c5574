"""Rated production answers teach on their own: thumbs-up alone raises the rated answers'
probability and thumbs-down alone lowers it, for greedy answers (no importance ratio) and for
sampled ones (importance-weighted against the processed logprobs they were sampled with).
Before the running-mean baseline, a batch of only ups (or only downs) was centred to zero and
taught nothing. Tiny random model, the trainer's own step maths (no server needed)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from clora.trainer.adapter_store import AdapterStore
from clora.trainer.batching import sequence_logprobs
from clora.trainer.data import TenantData
from clora.trainer.lora import Segment, bind, spec_of
from clora.trainer.model import load_model
from clora.trainer.optim import adamw_step
from clora.trainer.records import IMPORTANCE, RATIO_FREE
from clora.trainer.step import backward, greedy
from clora.wire.feedback import TrainingRecord
from clora.wire.interactions import CapturedChoice, CapturedRequest, InteractionRecord, Sampler
from clora.wire.trainer_config import TenantConfig

SAMPLED = Sampler(temperature=0.7, top_p=0.9)
GREEDY = Sampler(temperature=0.0)
STEPS = 6


@pytest.fixture(scope="module")
def trainer_model(tiny_model: Path):
    return load_model(tiny_model, "cpu")


def rated_records(model, layers, tokenizer, sampler: Sampler, reward: float) -> list[TrainingRecord]:
    """Four answers of the base model (greedy: tokens any sampler can produce), rated alike, with
    the logprobs vLLM would have captured for them under `sampler`."""
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 5000) for _ in range(6)] for _ in range(4)]
    answers = [greedy(model, layers, None, p, 6, tokenizer.eos_token_id) for p in prompts]
    with torch.no_grad():
        behaviour = sequence_logprobs(model, prompts, answers, [sampler] * 4)
    records = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        logprobs = behaviour.logprobs[behaviour.rows == i].tolist()
        interaction = InteractionRecord(
            trace_id=f"t{i}", customer="c", adapter=None, base_model="tiny",
            request=CapturedRequest(messages=[{"role": "user", "content": "?"}]), prompt_token_ids=prompt,
            choices=[CapturedChoice(message={"role": "assistant", "content": "x"}, token_ids=answer,
                                    logprobs=logprobs)],
            latency_ms=1.0, created_at=0.0, sampler=sampler)
        records.append(TrainingRecord(event_id=f"e{i}", customer="c", trace_id=f"t{i}", kind="rating",
                                      source="operator", reward=reward, created_at=0.0, interaction=interaction))
    return records


def answers_logprob(model, layers, weights, records: list[TrainingRecord]) -> float:
    """Mean log-likelihood of the rated answers under `weights` (the unprocessed distribution)."""
    with torch.no_grad(), bind(layers, [Segment(0, len(records), weights)]):
        result = sequence_logprobs(model, [r.prompt_token_ids for r in records],
                                   [r.completion_token_ids for r in records])
    return float(result.logprobs.sum()) / len(records)


@pytest.mark.parametrize(("sampler", "path"), [(GREEDY, RATIO_FREE), (SAMPLED, IMPORTANCE)], ids=["greedy", "sampled"])
@pytest.mark.parametrize("reward", [1.0, -1.0], ids=["up-only", "down-only"])
def test_one_sided_ratings_move_the_rated_answers(trainer_model, tmp_path, sampler, path, reward):
    model, layers, tokenizer = trainer_model
    config = TenantConfig(rank=8, alpha=16, lr=1e-2, weights={"onpolicy": 0, "correction": 0})
    store = AdapterStore(tmp_path)
    store.create("c", layers, spec_of(config))
    records = rated_records(model, layers, tokenizer, sampler, reward)
    before = answers_logprob(model, layers, store.tenants["c"].weights, records)

    baseline = 0.0
    for step in range(STEPS):
        data = TenantData("c", config, rated=records, baseline=baseline, current=[step == 0] * len(records))
        state = store.swap_in("c")
        result = backward(model, layers, [data], {"c": state}, pass_tokens=512)["c"]
        assert result.paths == {path: len(records)}
        if step == 0 and path == IMPORTANCE:  # the trainer sees the distribution that sampled
            assert result.gap.tokens > 0 and result.gap.mean < 1e-4
        adamw_step(state, lr=config.lr)
        baseline = state.reward_baseline = data.next_baseline()
        store.swap_out(state)

    after = answers_logprob(model, layers, store.tenants["c"].weights, records)
    assert abs(baseline) < 1.0 and baseline * reward > 0  # the running mean follows the rewards
    if reward > 0:
        assert after > before + 0.5, (before, after)
    else:
        assert after < before - 0.5, (before, after)


def test_a_running_mean_baseline_starts_neutral_and_follows_rewards():
    config = TenantConfig(baseline_rate=0.5)
    records = [TrainingRecord.model_construct(reward=1.0)] * 2
    data = TenantData("c", config, rated=records)
    assert data.next_baseline() == pytest.approx(0.75)  # 0 -> 0.5 -> 0.75
