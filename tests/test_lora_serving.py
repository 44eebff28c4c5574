"""The grouped LoRA ops in the real engine (the session's vLLM, tiny model, plugin on by default).

- vLLM's engine core loaded our plugin (its log says so) and serves with it.
- With every slot holding an adapter and adapter requests in the same batches, the base model's
  answers still have the base model's logprobs (transformers' forward on the same tokens). With
  vLLM's own CPU ops (CLORA_GROUPED_LORA=false) this fails: they give rows without an adapter the
  last slot's adapter.
- An adapter's answers have that adapter's logprobs (PEFT's forward on the same tokens), whether it
  is alone in its batch or beside other adapters and the base model.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
PROMPTS = [[1, 17, 230, 45, 99], [1, 300, 12, 88], [1, 5, 6, 7, 8, 9, 10]]
TOKENS = 12


def answer(engine, model: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    """A sampled answer (T=1: its logprobs are the model's own) as token ids with their logprobs."""
    resp = engine.post("/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 1.0, "logprobs": 0,
        "return_tokens_as_token_ids": True, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    logprobs = resp.json()["choices"][0]["logprobs"]
    return [int(t.split(":")[1]) for t in logprobs["tokens"]], logprobs["token_logprobs"]


def reference_logprobs(model_dir: Path, adapter: Path | None, prompt: list[int], tokens: list[int]) -> list[float]:
    """transformers (with PEFT for an adapter) on prompt + answer: each answer token's logprob."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def gap(served: list[float], reference: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(served, reference))


def test_the_engine_serves_lora_with_the_grouped_ops(stack):
    log = stack.stack.engine.config.log_path.read_text(errors="replace")
    assert "clora grouped LoRA ops on" in log
    assert "Using GroupedPunicaWrapperCPU" in log


def test_base_and_adapter_answers_keep_their_own_logprobs_with_every_slot_full(engine, stack, tiny_model,
                                                                               make_adapter):
    slots = stack.stack.engine.config.max_loras
    adapters = {f"slots-{seed}": make_adapter(seed=40 + seed, rank=8) for seed in range(slots)}
    for name, path in adapters.items():
        resp = engine.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        assert resp.status_code == 200, resp.text
    for name in adapters:  # alone in its batch: every slot gets an adapter
        answer(engine, name, PROMPTS[0])
    jobs = [(model, prompt) for prompt in PROMPTS for model in ["base", *adapters]]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all in flight together: mixed batches
        results = list(pool.map(lambda job: answer(engine, *job), jobs))
    for (model, prompt), (tokens, served) in zip(jobs, results):
        reference = reference_logprobs(tiny_model, adapters.get(model), prompt, tokens)
        assert gap(served, reference) < 1e-3, (model, prompt, served, reference)
    # The adapters do change the answers' logprobs (else the check above could not tell).
    base_tokens, _ = results[0]
    base_under_adapter = reference_logprobs(tiny_model, adapters["slots-0"], PROMPTS[0], base_tokens)
    assert gap(results[0][1], base_under_adapter) > 0.05


def test_adapters_keep_their_own_logprobs_while_slots_are_reused(engine, stack, tiny_model, make_adapter):
    """More adapters than the engine has slots (and CPU cache places), loaded one after another
    while earlier ones are still in use: vLLM evicts the least recently used and writes the next
    one into its slot. Every answer, in batches mixing the two newest adapters and the base model,
    must have its own adapter's logprobs, not a slot's earlier occupant's (a stale copy of a slot
    would serve one customer's version with another's weights)."""
    slots = stack.stack.engine.config.max_loras
    adapters: dict[str, Path] = {}
    for i in range(3 * slots):
        name = f"churn-{i}"
        adapters[name] = make_adapter(seed=60 + i, rank=8)
        resp = engine.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters[name])})
        assert resp.status_code == 200, resp.text
        newest = list(adapters)[-slots:]
        jobs = [(model, PROMPTS[(i + j) % len(PROMPTS)]) for j, model in enumerate(["base", *newest, *newest])]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: answer(engine, *job), jobs))
        for (model, prompt), (tokens, served) in zip(jobs, results):
            reference = reference_logprobs(tiny_model, adapters.get(model), prompt, tokens)
            assert gap(served, reference) < 1e-3, (i, model, prompt, served, reference)
        if i >= 1:  # the two newest adapters do differ (else a swapped slot would pass unseen)
            tokens, served = results[1]
            other = reference_logprobs(tiny_model, adapters[newest[-1] if jobs[1][0] != newest[-1] else newest[0]],
                                       jobs[1][1], tokens)
            assert gap(served, other) > 0.05
