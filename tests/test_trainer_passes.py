"""Trainer building blocks on the tiny random model: LoRA layers that match PEFT (and so vLLM's
loader), shared-prefix and batched multi-adapter passes that match the plain per-sequence,
per-tenant path, and tenant state that survives swaps and checkpoints bit-exactly."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from clora.trainer import lora
from clora.trainer.adapter_store import AdapterStore, TenantState
from clora.trainer.batching import (
    PrefixGroup,
    TenantBatch,
    multi_tenant_backward,
    sequence_logprobs,
    shared_prefix_logprobs,
)
from clora.trainer.data import TenantData
from clora.trainer.lora import LoRASpec, Segment, bind, inject, load_peft, new_weights, save_peft
from clora.trainer.losses import group_advantages, kl_to_reference, ppo_clip_loss, sft_loss
from clora.trainer.optim import adamw_step
from clora.trainer.packing import length_buckets, pack, pack_groups, padded_tokens
from clora.trainer.rollouts import Group
from clora.trainer.step import backward
from clora.wire.interactions import Sampler
from clora.wire.trainer_config import TenantConfig

SPEC = LoRASpec(rank=8, alpha=16)


@pytest.fixture(scope="module")
def base(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    layers = inject(model)
    return model, layers


def random_weights(layers, seed: int, spec: LoRASpec = SPEC):
    """Random A and B (PEFT's default B = 0 would make A's gradients zero and prove nothing)."""
    weights = new_weights(layers, spec, torch.Generator().manual_seed(seed), init_b_zero=False)
    for t in weights.tensors():
        t.requires_grad_(True)
    return weights


def grads(weights) -> list[torch.Tensor]:
    out = [t.grad.clone() for t in weights.tensors()]
    for t in weights.tensors():
        t.grad = None
    return out


def assert_close_lists(xs, ys, rtol=2e-4, atol=1e-6):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def rand_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 49152) for _ in range(n)]


def test_saved_adapter_is_what_peft_computes(base, tiny_model, tmp_path):
    from peft import PeftModel

    model, layers = base
    weights = random_weights(layers, seed=1)
    ids = torch.tensor([rand_tokens(random.Random(0), 12)])
    with torch.no_grad(), bind(layers, [Segment(0, 1, weights)]):
        ours = model(input_ids=ids).logits
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    save_peft(weights, tmp_path / "adapter", str(tiny_model))
    reloaded = load_peft(tmp_path / "adapter")
    assert_close_lists(reloaded.tensors(), [t.detach() for t in weights.tensors()], rtol=0, atol=0)

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_shared_prefix_pass_matches_separate_sequences(base):
    model, layers = base
    weights = random_weights(layers, seed=2)
    rng = random.Random(1)
    prompt = rand_tokens(rng, 24)
    completions = [rand_tokens(rng, n) for n in (6, 9, 1, 9)]  # ragged, one single-token
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    adv = group_advantages(rewards)[0]

    def loss_of(result):
        old = result.logprobs.detach() - 0.05  # a slightly different sampler: ratios != 1
        return ppo_clip_loss(result.logprobs, old, adv[result.rows])

    with bind(layers, [Segment(0, len(completions), weights)]):
        naive = sequence_logprobs(model, [prompt] * len(completions), completions)
        naive_loss = loss_of(naive)
        naive_loss.backward()
    naive_grads = grads(weights)
    shared = shared_prefix_logprobs(model, layers, [PrefixGroup(prompt, completions, weights)])
    shared_loss = loss_of(shared)
    shared_loss.backward()
    shared_grads = grads(weights)

    assert torch.equal(naive.rows, shared.rows)
    torch.testing.assert_close(shared.logprobs, naive.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_loss, naive_loss, rtol=1e-5, atol=1e-7)
    assert max(g.abs().max() for g in naive_grads) > 0
    assert_close_lists(shared_grads, naive_grads)


SAMPLED = Sampler(temperature=0.7)  # random tokens: a top-p set would exclude them


@pytest.mark.parametrize("pass_tokens", [100_000, 90], ids=["one-pass", "tenants-split-across-passes"])
def test_packed_grpo_of_several_tenants_matches_one_pass_per_group(base, pass_tokens):
    """Every tenant's groups in shared-prefix passes (mixed K, prompt and completion lengths, samplers,
    one tenant with a KL term): each tenant's loss and gradients are those of plain per-group passes."""
    model, layers = base
    rng = random.Random(5)
    shapes = [[(7, 3), (15, 2)], [(4, 4)], [(11, 2), (6, 3), (9, 1)]]  # per tenant: (prompt length, K) per group
    configs = [TenantConfig(clip=0.2), TenantConfig(clip=0.1, kl_coef=0.5), TenantConfig(weights={"onpolicy": 2.0})]
    tenants = []
    for t, groups in enumerate(shapes):
        data = TenantData(f"t{t}", configs[t])
        for length, k in groups:
            completions = [rand_tokens(rng, rng.randrange(1, 9)) for _ in range(k)]
            data.groups.append(Group(rand_tokens(rng, length), completions,
                                     [[-rng.uniform(0.5, 3) for _ in c] for c in completions],
                                     [float(rng.random() < 0.5) + 0.1 * i for i in range(k)],
                                     None if configs[t].kl_coef else SAMPLED))
        tenants.append(data)
    states = {d.customer: TenantState(d.customer, random_weights(layers, seed=30 + t), [], [])
              for t, d in enumerate(tenants)}
    for d in tenants:  # the sampler's logprobs: the policy's own, a little off (ratios near 1, some clipped)
        for g in d.groups:
            k = len(g.completions)
            with torch.no_grad(), bind(layers, [Segment(0, k, states[d.customer].weights)]):
                own = sequence_logprobs(model, [g.prompt_token_ids] * k, g.completions, [g.sampler] * k)
            g.logprobs = [(own.logprobs[own.rows == i] + 0.3 * torch.randn(len(c), generator=torch.Generator()
                                                                            .manual_seed(i))).tolist()
                          for i, c in enumerate(g.completions)]

    expected_losses, expected_grads = [], []
    for d in tenants:  # the reference: per tenant, per group, plain rows (prompt + completion), no sharing
        weights, total = states[d.customer].weights, sum(len(c) for g in d.groups for c in g.completions)
        tenant_loss = 0.0
        for g in d.groups:
            k = len(g.completions)
            with bind(layers, [Segment(0, k, weights)]):
                result = sequence_logprobs(model, [g.prompt_token_ids] * k, g.completions, [g.sampler] * k)
            old = torch.tensor([lp for lps in g.logprobs for lp in lps])
            advantages = group_advantages(torch.tensor([g.rewards]))[0][result.rows]
            loss = ppo_clip_loss(result.logprobs, old, advantages, d.config.clip)
            if d.config.kl_coef:
                with torch.no_grad():
                    ref = sequence_logprobs(model, [g.prompt_token_ids] * k, g.completions).logprobs
                loss = loss + d.config.kl_coef * kl_to_reference(result.logprobs, ref)
            share = sum(len(c) for c in g.completions) / total
            (loss * share * d.config.weights.onpolicy).backward()
            tenant_loss += float(loss.detach()) * share
        expected_losses.append(tenant_loss)
        expected_grads.append(grads(weights))

    passes = pack_groups([PrefixGroup(g.prompt_token_ids, g.completions) for d in tenants for g in d.groups],
                         pass_tokens)
    # One pass; or three, the middle one holding two tenants' groups and the last tenant's split in two.
    assert passes == ([[0, 1, 2, 3, 4, 5]] if pass_tokens > 1000 else [[0, 1], [2, 3], [4, 5]])
    results = backward(model, layers, tenants, states, pass_tokens)
    for t, d in enumerate(tenants):
        assert results[d.customer].losses["onpolicy"] == pytest.approx(expected_losses[t], rel=1e-4)
        # Every sampled token that took a pass is compared (random ones may fall outside top-p); a
        # group of one completion teaches nothing (advantage 0) and takes no pass unless KL pulls it.
        gap = results[d.customer].gap
        assert gap.tokens + gap.outside == sum(len(c) for g in d.groups for c in g.completions
                                               if d.config.kl_coef or len(set(g.rewards)) > 1)
        # Counted once per group, however many passes its rows were split across.
        assert results[d.customer].taught_groups == sum(1 for g in d.groups if d.config.kl_coef or len(set(g.rewards)) > 1)
        assert max(g.abs().max() for g in expected_grads[t]) > 0
        assert_close_lists(grads(states[d.customer].weights), expected_grads[t])


@pytest.mark.parametrize("rows_per_tenant,max_tokens", [((2, 2, 2), 10_000), ((1, 3, 2), 10_000), ((1, 3, 2), 40)],
                         ids=["equal-rows-one-pass", "ragged-one-pass", "tenants-split-across-passes"])
@pytest.mark.parametrize("stacked", [False, True], ids=["per-segment", "stacked"])
def test_batched_multi_adapter_pass_matches_per_tenant_passes(base, rows_per_tenant, max_tokens, stacked,
                                                              monkeypatch):
    monkeypatch.setattr(lora, "STACKED_DEVICES", {"cpu", "cuda"} if stacked else set())
    model, layers = base
    rng = random.Random(2)
    tenants = [random_weights(layers, seed=10 + i) for i in range(len(rows_per_tenant))]
    batches = [TenantBatch(w, [rand_tokens(rng, 10) for _ in range(n)], [rand_tokens(rng, 6) for _ in range(n)])
               for w, n in zip(tenants, rows_per_tenant)]
    advantages = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in rows_per_tenant]

    def loss_fn(tenant, logprobs, rows):  # per-row advantages: rows must map back correctly
        return ppo_clip_loss(logprobs, logprobs.detach() - 0.1, advantages[tenant][rows])

    separate, separate_losses = [], []
    for t, batch in enumerate(batches):
        with bind(layers, [Segment(0, len(batch.prompts), batch.weights)]):
            result = sequence_logprobs(model, batch.prompts, batch.completions)
            loss = loss_fn(t, result.logprobs, result.rows)
            loss.backward()
        separate.append(grads(batch.weights))
        separate_losses.append(float(loss.detach()))

    assert len(pack(batches, max_tokens)) == (1 if max_tokens > 1000 else 3)
    losses = multi_tenant_backward(model, layers, batches, loss_fn, max_tokens)
    assert losses == pytest.approx(separate_losses, rel=1e-5)
    for batch, expected in zip(batches, separate):
        assert_close_lists(grads(batch.weights), expected)


def test_rows_without_an_adapter_get_the_base_model(base):
    model, layers = base
    weights = random_weights(layers, seed=3)
    ids = torch.tensor([rand_tokens(random.Random(3), 8)] * 2)
    with torch.no_grad():
        plain = model(input_ids=ids[:1]).logits
        with bind(layers, [Segment(0, 1, weights), Segment(1, 2, None)]):
            mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[1:], plain, rtol=1e-5, atol=1e-5)
    assert (mixed[0] - plain[0]).abs().max() > 1e-2


def test_swap_round_trip_and_checkpoint_are_bit_exact(base, tmp_path, tiny_model):
    model, layers = base
    store = AdapterStore(tmp_path / "trainer")
    host = store.create("acme", layers, SPEC, seed=5)
    before = [t.clone() for t in host.tensors()]

    device = store.swap_in("acme")
    assert all(t.requires_grad for t in device.weights.tensors())
    store.swap_out(device)  # no step: nothing changes, to the bit
    assert all(torch.equal(a, b) for a, b in zip(before, host.tensors()))

    # A real step on the device copy; the host is untouched until swap_out.
    ids = [rand_tokens(random.Random(4), 12)]
    for _ in range(2):
        device = store.swap_in("acme")
        with bind(layers, [Segment(0, 1, device.weights)]):
            sft_loss(sequence_logprobs(model, ids, [rand_tokens(random.Random(5), 5)]).logprobs).backward()
        adamw_step(device, lr=1e-2)
        assert all(torch.equal(a, b) for a, b in zip(before, host.tensors()))
        device.rng.random()
        store.swap_out(device)
        before = [t.clone() for t in host.tensors()]
    assert host.step == 2 and max((a - b).abs().max() for a, b in zip(host.weights.tensors(), before)) == 0
    assert any(t.abs().max() > 0 for t in host.weights.b.values())  # B moved off zero
    device = store.swap_in("acme")
    adamw_step(device, lr=1e-2)  # a step without gradient: counted, not an AdamW update
    store.swap_out(device)
    assert (host.step, host.adam_steps) == (3, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, host.tensors()))
    draw = random.Random()
    draw.setstate(host.rng.getstate())

    checkpoint = store.checkpoint("acme", str(tiny_model))
    store.mark_published("acme", checkpoint, 7)
    restored = AdapterStore(tmp_path / "trainer").get("acme")
    assert restored is not None and (restored.step, restored.adam_steps, restored.published_version) == (3, 2, 7)
    assert all(torch.equal(a, b) for a, b in zip(host.tensors(), restored.tensors()))
    assert restored.rng.random() == draw.random()
    assert (checkpoint / "adapter" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "trainer" / "acme").glob(".tmp-*"))


def bucket_cost(lengths, buckets, overhead):
    return sum(len(b) * max(lengths[i] for i in b) + overhead for b in buckets)


@pytest.mark.parametrize("seed", range(20))
def test_length_buckets_are_the_cheapest_cut_of_the_rows_sorted_by_length(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(40, 120)]) for _ in range(rng.randint(1, 8))]
    overhead = rng.choice([0, 8, 64])
    buckets = length_buckets(lengths, max_buckets=3, overhead=overhead)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert all(b == sorted(b) for b in buckets)
    # Every cut of the sorted rows into at most 3 runs: none is cheaper.
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, best = len(order), float("inf")
    for k in range(0, min(2, n - 1) + 1):
        for cuts in itertools.combinations(range(1, n), k):
            edges = [0, *cuts, n]
            runs = [order[a:b] for a, b in zip(edges, edges[1:])]
            best = min(best, bucket_cost(lengths, runs, overhead))
    assert bucket_cost(lengths, buckets, overhead) == best


def test_short_and_long_rows_are_cut_apart():
    assert length_buckets([90, 3, 95, 2], overhead=16) == [[1, 3], [0, 2]]
    assert length_buckets([90, 88, 95, 92], overhead=16) == [[0, 1, 2, 3]]
    assert padded_tokens([90, 3, 95, 2]) == 2 * 3 + 2 * 95


def test_rows_of_very_different_lengths_match_separate_sequences_and_skip_the_padding(base):
    """An episode's short first answers and long later turns, of two tenants, interleaved: the
    pass runs them in length buckets (fewer tokens than padding all to the longest) and gives the
    per-row logprobs and gradients of one plain forward per row, in row order."""
    model, layers = base
    w1, w2 = random_weights(layers, seed=5), random_weights(layers, seed=6)
    rng = random.Random(3)
    p1, p2 = rand_tokens(rng, 20), rand_tokens(rng, 17)
    c1 = [rand_tokens(rng, n) for n in (2, 70, 3, 65)]
    c2 = [rand_tokens(rng, n) for n in (60, 1, 75, 4)]
    x2 = [[], rand_tokens(rng, 6), [], rand_tokens(rng, 9)]  # unscored context before some rows
    groups = [PrefixGroup(p1, c1, w1), PrefixGroup(p2, c2, w2, contexts=x2)]
    rows = [r for g in groups for r in g.rows()]
    computed = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: computed.append(kwargs["input_ids"].numel()), with_kwargs=True)
    try:
        shared = shared_prefix_logprobs(model, layers, groups)
    finally:
        hook.remove()
    row_tokens = sum(computed) - 2 * max(len(p1), len(p2))  # less the prompts' pass
    assert row_tokens == padded_tokens([len(r) for r in rows])
    assert row_tokens < len(rows) * max(len(r) for r in rows) * 0.7
    shared_loss = (shared.logprobs * torch.linspace(-1, 1, shared.logprobs.numel())).sum()
    shared_loss.backward()
    shared_grads = grads(w1) + grads(w2)

    prompts = [p1] * 4 + [p2 + x for x in x2]
    with bind(layers, [Segment(0, 4, w1), Segment(4, 8, w2)]):
        naive = sequence_logprobs(model, prompts, c1 + c2)
    naive_loss = (naive.logprobs * torch.linspace(-1, 1, naive.logprobs.numel())).sum()
    naive_loss.backward()
    naive_grads = grads(w1) + grads(w2)
    assert torch.equal(naive.rows, shared.rows)
    torch.testing.assert_close(shared.logprobs, naive.logprobs, rtol=1e-5, atol=1e-5)
    assert min(g.abs().max() for g in naive_grads) > 0
    assert_close_lists(shared_grads, naive_grads, atol=1e-5)  # a sum over ~300 tokens: larger gradients


def test_a_group_counts_as_taught_once_however_its_rows_are_split_and_not_at_all_when_its_rewards_are_equal(base):
    """`taught_groups` (the experiments' count of backward passes) counts groups, not pass items."""
    model, layers = base
    rng = random.Random(11)
    data = TenantData("t", TenantConfig())
    for rewards in ([0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.0, 0.0, 0.0]):
        completions = [rand_tokens(rng, 6) for _ in rewards]
        data.groups.append(Group(rand_tokens(rng, 12), completions, [[-1.0] * 6 for _ in completions], rewards, SAMPLED))
    states = {"t": TenantState("t", random_weights(layers, seed=3), [], [])}
    # 4 pass tokens: a part may hold 16 (GROUP_PASS_FACTOR x 4), so each row of 18 is a part of its own.
    results = backward(model, layers, [data], states, pass_tokens=4)
    assert results["t"].taught_groups == 2
