"""The trainer's dtype: the engine's unless told (its logprobs are computed as the server's are),
bfloat16 on CUDA; in bfloat16 the adapters and their gradients stay float32."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from clora.core.settings import Settings
from clora.trainer.batching import sequence_logprobs
from clora.trainer.lora import LoRASpec, Segment, bind, new_weights
from clora.trainer.model import load_model
from clora.trainer.run import TrainRun


def run_for(tmp_path: Path, **settings) -> TrainRun:
    return TrainRun.from_settings(Settings(home=tmp_path, trainer_device="cpu", **settings), gateway_url="http://gw",
                                  redis_url="redis://r", model_dir="m", admin_key="k")


@pytest.mark.parametrize("engine,trainer,expected", [("float32", "auto", "float32"), ("bfloat16", "auto", "bfloat16"),
                                                     ("float32", "bfloat16", "bfloat16"),
                                                     ("bfloat16", "float32", "float32")])
def test_the_trainer_computes_in_the_engines_dtype_unless_told(tmp_path, engine, trainer, expected):
    assert run_for(tmp_path, dtype=engine, trainer_dtype=trainer).dtype == expected


def test_a_bfloat16_trainer_keeps_float32_adapters_and_float32_logprobs(tiny_model):
    full, full_layers, _ = load_model(tiny_model, "cpu", "float32")
    half, half_layers, _ = load_model(tiny_model, "cpu", "bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(12)] for _ in range(3)]
    completions = [[rng.randrange(1000) for _ in range(n)] for n in (5, 3, 7)]
    results = {}
    for name, model, layers in (("full", full, full_layers), ("half", half, half_layers)):
        weights = new_weights(layers, LoRASpec(rank=4, alpha=8), torch.Generator().manual_seed(1), init_b_zero=False)
        for t in weights.tensors():
            t.requires_grad_(True)
        with bind(layers, [Segment(0, 3, weights)]):
            logprobs = sequence_logprobs(model, prompts, completions).logprobs
        logprobs.mean().backward()
        results[name] = logprobs.detach()
        assert logprobs.dtype == torch.float32
        assert all(t.dtype == torch.float32 and t.grad is not None and t.grad.dtype == torch.float32
                   for t in weights.tensors())
        assert max(float(t.grad.abs().max()) for t in weights.tensors()) > 0
    gap = (results["full"] - results["half"]).abs()
    assert 0 < float(gap.mean()) < 0.1  # bfloat16's rounding, not another model


def test_a_cpu_trainer_leaves_the_engine_its_core_unless_told(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert run_for(tmp_path).threads == 7  # every core but the engine's
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert run_for(tmp_path).threads == 1
    assert run_for(tmp_path, trainer_threads=2).threads == 2
