"""The trainer's maths on a fixed batch equal what release 98d410f computed (tests/data/golden_step.json):
every loss path at once (GRPO groups, a grammar-constrained multi-turn group, a lagged tenant,
KL, rated answers on both record paths, corrections with SFT and DPO), several tenants sharing
small passes. Refactoring the loop, the step or the batching must not change one number.

The reference was written by the release before the trainer was split into modules; to write it
again (only when the maths is meant to change, said in the commit): CLORA_WRITE_GOLDEN=1 pytest
tests/test_golden_step.py."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from clora.trainer.adapter_store import TenantState
from clora.trainer.data import TenantData
from clora.trainer.lora import LoRASpec, inject, new_weights
from clora.trainer.rollouts import Group, Turn
from clora.trainer.step import backward
from clora.wire.feedback import TrainingRecord
from clora.wire.interactions import CapturedChoice, CapturedRequest, InteractionRecord, Sampler
from clora.wire.trainer_config import TenantConfig

GOLDEN = Path(__file__).parent / "data" / "golden_step.json"
SAMPLED = Sampler(temperature=0.7)
FORCED = Sampler(temperature=0.8, constrained=True)
SPEC = LoRASpec(rank=4, alpha=8)


@pytest.fixture(scope="module")
def base(tiny_model: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, inject(model)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 4000) for _ in range(n)]


def logprobs(rng: random.Random, n: int) -> list[float]:
    return [-rng.uniform(6.0, 12.0) for _ in range(n)]


def group(rng: random.Random, k: int, sampler: Sampler, multi_turn: bool = False) -> Group:
    prompt = tokens(rng, 10)
    completions = [tokens(rng, rng.randrange(3, 8)) for _ in range(k)]
    later = []
    if multi_turn:  # one later turn extends the prompt (a row of the group), one is an item of its own
        for c in completions:
            extends = Turn(prompt + c + tokens(rng, 3), tokens(rng, 4), logprobs(rng, 4))
            alone = Turn(tokens(rng, 7), tokens(rng, 3), logprobs(rng, 3))
            later.append([extends, alone])
    return Group(prompt, completions, [logprobs(rng, len(c)) for c in completions],
                 [rng.choice([0.0, 0.5, 1.0]) for _ in completions], sampler, later)


def record(rng: random.Random, i: int, sampler: Sampler | None, reward: float | None,
           correction: str | None = None) -> TrainingRecord:
    answer = tokens(rng, rng.randrange(3, 7))
    interaction = InteractionRecord(
        trace_id=f"t{i}", customer="c", adapter=None, base_model="tiny",
        request=CapturedRequest(messages=[{"role": "user", "content": "?"}]), prompt_token_ids=tokens(rng, 8),
        choices=[CapturedChoice(message={"role": "assistant", "content": "x"}, token_ids=answer,
                                logprobs=logprobs(rng, len(answer)))],
        latency_ms=1.0, created_at=0.0, sampler=sampler)
    return TrainingRecord(event_id=f"e{i}", customer="c", trace_id=f"t{i}",
                          kind="correction" if correction else "rating", source="operator", reward=reward,
                          correction={"role": "assistant", "content": correction} if correction else None,
                          created_at=0.0, interaction=interaction)


def fixed_batch(layers) -> tuple[list[TenantData], dict[str, TenantState]]:
    rng = random.Random(44)
    weights = {name: new_weights(layers, SPEC, torch.Generator().manual_seed(seed), init_b_zero=False)
               for seed, name in enumerate(("a", "b", "c"))}
    a = TenantData("a", TenantConfig(rank=4, alpha=8, kl_coef=0.05, weights={"preference": 0.5}),
                   groups=[group(rng, 4, SAMPLED), group(rng, 3, FORCED, multi_turn=True)],
                   rated=[record(rng, i, SAMPLED if i % 2 else None, (-1.0) ** i) for i in range(4)],
                   baseline=0.2, current=[True, False, True, True])
    a.corrections = [record(rng, 10 + i, SAMPLED, None, correction="fixed") for i in range(2)]
    a.targets = [tokens(rng, 4) for _ in a.corrections]
    behaviour = weights["b"].copy()
    with torch.no_grad():
        for t in behaviour.tensors():
            t.add_(0.03 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))
    b = TenantData("b", TenantConfig(rank=4, alpha=8, clip=0.3),
                   groups=[group(rng, 4, SAMPLED), group(rng, 2, FORCED, multi_turn=True)], behaviour=behaviour,
                   rated=[record(rng, 20 + i, SAMPLED, 1.0) for i in range(2)], current=[True, True])
    c = TenantData("c", TenantConfig(rank=4, alpha=8), rated=[record(rng, 30, None, -1.0)], current=[False])
    c.corrections = [record(rng, 31, None, None, correction="no")]
    c.targets = [tokens(rng, 5)]
    states = {}
    for name, w in weights.items():
        for t in w.tensors():
            t.requires_grad_(True)
        states[name] = TenantState(name, w, [], [])
    return [a, b, c], states


def fingerprint(t: torch.Tensor) -> list[float]:
    """A gradient in four numbers: sum, |sum|, norm, and a dot product with a fixed random tensor."""
    probe = torch.randn(t.shape, generator=torch.Generator().manual_seed(7))
    return [float(t.sum()), float(t.abs().sum()), float(t.norm()), float((t * probe).sum())]


def outcome(model, layers) -> dict:
    data, states = fixed_batch(layers)
    results = backward(model, layers, data, states, pass_tokens=48)
    out = {}
    for d in data:
        r, w = results[d.customer], states[d.customer].weights
        out[d.customer] = {
            "losses": r.losses, "paths": r.paths, "lagged_groups": r.lagged_groups, "taught_groups": r.taught_groups,
            "gap": {"tokens": r.gap.tokens, "total": r.gap.total, "max": r.gap.max, "outside": r.gap.outside,
                    "records": {str(k): list(v) for k, v in sorted(r.gap.records.items())}},
            "grads": {f"{name}.{side}": fingerprint(getattr(w, side)[name].grad)
                      for name in sorted(w.a) for side in ("a", "b")},
        }
    return out


def assert_equal_numbers(got, want, where: str = "") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_equal_numbers(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_equal_numbers(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7), where
    else:
        assert got == want, where


def test_losses_and_gradients_on_a_fixed_batch_equal_the_reference(base):
    model, layers = base
    got = json.loads(json.dumps(outcome(model, layers)))  # the reference's types (ints, floats, str keys)
    if os.environ.get("CLORA_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    # Every path ran: a reference without one would not guard it.
    assert set(want["a"]["losses"]) == {"onpolicy", "offpolicy", "correction", "preference"}
    assert want["a"]["paths"] == {"importance": 2, "ratio_free": 2, "correction": 2}
    assert want["b"]["lagged_groups"] == 2 and want["a"]["lagged_groups"] == 0
    assert_equal_numbers(got, want)
