"""Trainer benchmark: tenant swaps, serial vs batched multi-adapter training, shared-prefix groups.

A random-initialised Llama of SmolLM2-135M's shape (or a larger one with --shape 1b, for a GPU),
LoRA rank 16 on all seven projections. For 1, 2, 4 and 8 tenants it measures:
  - swap-in / swap-out of one tenant's state (weights, AdamW moments) between host and device;
  - serial training (one pass per tenant) vs batched multi-adapter passes over every tenant's rows
    (packed into passes of at most --pass-tokens tokens), forward + backward + AdamW, with per-tenant batches of 4 rows x 128 tokens and of
    1 row x 64 tokens (half prompt, half completion; loss on completion tokens only);
  - update_s: one round that updates every tenant once (batched path, swaps included).
Then shared-prefix vs naive group training: K=8 completions of 64 tokens on a 256-token prompt,
PPO loss; both paths compute logits only at completion positions.
Writes benchmarks/results/trainer.json (trainer-<device>.json off CPU) unless --quick.

    .venv/bin/python benchmarks/trainer_throughput.py [--device cuda] [--shape 1b] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
from clora.core.provenance import provenance  # noqa: E402
from clora.trainer import lora  # noqa: E402
from clora.trainer.adapter_store import AdapterStore  # noqa: E402
from clora.trainer.batching import (  # noqa: E402
    PrefixGroup,
    TenantBatch,
    multi_tenant_backward,
    sequence_logprobs,
    shared_prefix_logprobs,
)
from clora.trainer.lora import LoRASpec, Segment, bind, inject  # noqa: E402
from clora.trainer.losses import ppo_clip_loss  # noqa: E402
from clora.trainer.optim import adamw_step  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "1b": (2048, 8192, 16, 32, 8),
}
SPEC = LoRASpec(rank=16, alpha=32)


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SHAPES[shape]
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return model, inject(model)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 49152) for _ in range(n)]


def rows_for(rng: random.Random, rows: int, length: int) -> tuple[list[list[int]], list[list[int]]]:
    half = length // 2
    return [tokens(rng, half) for _ in range(rows)], [tokens(rng, length - half) for _ in range(rows)]


def ppo_on_logprobs(logp: torch.Tensor) -> torch.Tensor:
    return ppo_clip_loss(logp, logp.detach() - 0.01, torch.ones_like(logp))


def ppo_on(result) -> torch.Tensor:
    return ppo_on_logprobs(result.logprobs)


def train_serial(model, layers, states, batches) -> None:
    for state, (prompts, completions) in zip(states, batches):
        with bind(layers, [Segment(0, len(prompts), state.weights)]):
            ppo_on(sequence_logprobs(model, prompts, completions)).backward()
        adamw_step(state, lr=1e-4)


def train_batched(model, layers, states, batches, max_tokens: int) -> None:
    tenant_batches = [TenantBatch(state.weights, prompts, completions)
                      for state, (prompts, completions) in zip(states, batches)]
    multi_tenant_backward(model, layers, tenant_batches, lambda _t, logp, _rows: ppo_on_logprobs(logp), max_tokens)
    for state in states:
        adamw_step(state, lr=1e-4)


def best_of(repeats: int, device: torch.device, fn) -> float:
    return min(timed(device, fn) for _ in range(repeats))


def tenant_rows(args, model, layers, store, device, tenants: int, rows: int, length: int) -> dict:
    rng = random.Random(tenants * 1000 + rows)
    for i in range(tenants):
        if f"t{i}" not in store.tenants:
            store.create(f"t{i}", layers, SPEC, seed=i)
    states = [store.swap_in(f"t{i}") for i in range(tenants)]
    batches = [rows_for(rng, rows, length) for _ in range(tenants)]
    def serial_round() -> None:
        train_serial(model, layers, states, batches)

    def batched_round() -> None:
        train_batched(model, layers, states, batches, args.pass_tokens)

    # Warm-up: on this CPU a new pass shape runs up to 25% slower for its first few rounds in a
    # process (memory being faulted in and settling), then steadies; a trainer runs for hours.
    for _ in range(args.warmup):
        serial_round(), batched_round()
    serial, batched = float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, best of each
        serial = min(serial, timed(device, serial_round))
        batched = min(batched, timed(device, batched_round))
    total = tenants * rows * length
    return {"serial_tok_s": total / serial, "batched_tok_s": total / batched, "batched_vs_serial": serial / batched}


def swaps(store: AdapterStore, device: torch.device, repeats: int) -> tuple[float, float]:
    ins, outs = [], []
    for _ in range(repeats):
        holder = {}
        ins.append(timed(device, lambda: holder.setdefault("s", store.swap_in("t0"))))
        outs.append(timed(device, lambda: store.swap_out(holder["s"])))
    return statistics.median(ins) * 1000, statistics.median(outs) * 1000


def update_round(model, layers, store, device, tenants: int, pass_tokens: int) -> float:
    """Every tenant updated once: swap in all, one batched pass, optimizer steps, swap out all."""
    rng = random.Random(7)
    batches = [rows_for(rng, 4, 128) for _ in range(tenants)]

    def round_() -> None:
        states = [store.swap_in(f"t{i}") for i in range(tenants)]
        train_batched(model, layers, states, batches, pass_tokens)
        for state in states:
            store.swap_out(state)

    return timed(device, round_)


def shared_prefix(args, model, layers, store, device) -> dict:
    rng = random.Random(3)
    prompt, completions = tokens(rng, 256), [tokens(rng, 64) for _ in range(8)]
    state = store.swap_in("t0")

    def naive() -> None:
        with bind(layers, [Segment(0, 8, state.weights)]):
            ppo_on(sequence_logprobs(model, [prompt] * 8, completions)).backward()

    def shared() -> None:
        ppo_on(shared_prefix_logprobs(model, layers, [PrefixGroup(prompt, completions, state.weights)])).backward()

    naive(), shared()  # warm-up
    t_naive = best_of(args.repeats, device, naive)
    t_shared = best_of(args.repeats, device, shared)
    return {"naive_s": t_naive, "shared_s": t_shared, "speedup": t_naive / t_shared}


def main() -> None:
    started_at = datetime.now(timezone.utc)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--tenants", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds per measurement (best is kept).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed rounds of each path first.")
    parser.add_argument("--pass-tokens", type=int, default=None,
                        help="Token budget of one batched pass (default: 512 on CPU, 65536 on GPU).")
    parser.add_argument("--stacked", choices=["auto", "on", "off"], default="auto",
                        help="Equal tenant segments through batched matmuls (auto: on GPU only).")
    parser.add_argument("--quick", action="store_true", help="Tenants 1,2 only, one repeat; nothing written.")
    args = parser.parse_args()
    if args.stacked != "auto":
        lora.STACKED_DEVICES = {"cpu", "cuda"} if args.stacked == "on" else set()
    if args.quick:
        args.tenants, args.repeats, args.warmup = "1,2", 1, 1
    device = torch.device(args.device)
    args.pass_tokens = args.pass_tokens or (65536 if device.type == "cuda" else 512)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, layers = build_model(args.shape, device, dtype)
    store = AdapterStore(Path(tempfile.mkdtemp(prefix="clora-trainer-bench-")), device)
    results = []
    for n in [int(t) for t in args.tenants.split(",")]:
        big = tenant_rows(args, model, layers, store, device, n, rows=4, length=128)
        small = tenant_rows(args, model, layers, store, device, n, rows=1, length=64)
        swap_in_ms, swap_out_ms = swaps(store, device, repeats=5)
        row = {"tenants": n, "swap_in_ms": round(swap_in_ms, 2), "swap_out_ms": round(swap_out_ms, 2),
               "update_s": round(update_round(model, layers, store, device, n, args.pass_tokens), 3),
               "serial_tok_s": round(big["serial_tok_s"], 1), "batched_tok_s": round(big["batched_tok_s"], 1),
               "batched_vs_serial": round(big["batched_vs_serial"], 3),
               "serial_tok_s_1x64": round(small["serial_tok_s"], 1),
               "batched_tok_s_1x64": round(small["batched_tok_s"], 1),
               "batched_vs_serial_1x64": round(small["batched_vs_serial"], 3)}
        results.append(row)
        print(json.dumps(row), flush=True)
    prefix = shared_prefix(args, model, layers, store, device)
    print(json.dumps({"shared_prefix": prefix}), flush=True)
    out = {"tenants": results, "shared_prefix_speedup": round(prefix["speedup"], 3),
           "shared_prefix_naive_s": round(prefix["naive_s"], 3), "shared_prefix_s": round(prefix["shared_s"], 3),
           "shape": args.shape, "device": str(device), "pass_tokens": args.pass_tokens,
           "stacked_lora": sorted(lora.STACKED_DEVICES), "dtype": str(dtype).removeprefix("torch."),
           "lora": {"rank": SPEC.rank, "alpha": SPEC.alpha, "targets": list(SPEC.targets)},
           **provenance("python benchmarks/trainer_throughput.py", started_at=started_at),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if not args.quick:
        name = "trainer.json" if device.type == "cpu" else f"trainer-{device.type}-{args.shape}.json"
        path = Path(os.environ.get("OUT", REPO / "benchmarks" / "results")) / name
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
