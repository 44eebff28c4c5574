"""Host memory and time of repeated GRPO passes under three glibc malloc policies.

One process per setting loads SmolLM2-135M-Instruct (CLORA_MODEL) as the trainer does (in
`--dtype`, CLORA_DTYPE by default), wraps every projection with rank-16 LoRA and runs `--passes`
shared-prefix GRPO passes of the same shape (a prompt of `--prompt` tokens, `--rows` completions of
`--completion` tokens: the agent RL benchmark's group size) with backward, on one thread. After
each pass: seconds, system seconds and page faults it took, resident memory and the process's peak
so far. `default` leaves glibc's dynamic mmap threshold (it rises to each large block freed, after
which activations come from a fragmenting heap); `fixed-128k` is the trainer's earlier policy (every
activation a fresh mmap); `trainer` is what `clora.trainer.loop` does now (the threshold fixed at
32 MB at load, the heap trimmed after each step). Writes benchmarks/results/trainer_memory.json.

    .venv/bin/python benchmarks/trainer_memory.py [--passes 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


SETTINGS = ("default", "fixed-128k", "trainer")


def worker(setting: str, dtype: str, passes: int, prompt: int, rows: int, completion: int) -> list[dict]:
    import ctypes

    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from clora.core.models import resolve_model
    from clora.core.settings import Settings
    from clora.trainer.batching import PrefixGroup, shared_prefix_logprobs
    from clora.trainer.lora import LoRASpec, inject, new_weights
    from clora.trainer.model import fix_mmap_threshold, return_freed_host_memory

    if setting == "fixed-128k":
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    elif setting == "trainer":
        fix_mmap_threshold()
    torch.set_num_threads(1)
    settings = Settings()
    model = AutoModelForCausalLM.from_pretrained(resolve_model(settings.serving.model, settings.cache_dir),
                                                 dtype=getattr(torch, dtype)).eval()
    layers = inject(model)
    for p in model.parameters():
        p.requires_grad_(False)
    spec = LoRASpec(rank=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"))
    weights = new_weights(layers, spec, torch.Generator().manual_seed(0), init_b_zero=False)
    for t in weights.tensors():
        t.requires_grad_(True)
    out = []
    for n in range(passes):
        group = PrefixGroup(list(range(100, 100 + prompt)), [list(range(200 + r, 200 + r + completion))
                                                             for r in range(rows)], weights)
        started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        shared_prefix_logprobs(model, layers, [group]).logprobs.mean().backward()
        if setting == "trainer":
            return_freed_host_memory()
        after = resource.getrusage(resource.RUSAGE_SELF)
        out.append({"pass": n + 1, "seconds": round(time.perf_counter() - started, 1),
                    "system_s": round(after.ru_stime - before.ru_stime, 1),
                    "page_faults": after.ru_minflt - before.ru_minflt,
                    "rss_gb": round(psutil.Process().memory_info().rss / 2**30, 2),
                    "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
        print(setting, out[-1], file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=350)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--completion", type=int, default=150)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: CLORA_DTYPE's)")
    parser.add_argument("--worker", choices=SETTINGS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "trainer_memory.json")
    args = parser.parse_args()
    started_at = datetime.now(timezone.utc)
    from clora.core.settings import Settings

    settings = Settings()
    dtype = args.dtype or settings.serving.dtype
    shape = [args.passes, args.prompt, args.rows, args.completion]
    if args.worker:
        print(json.dumps(worker(args.worker, dtype, *shape)))
        return
    from clora.core.provenance import provenance

    results = {}
    for setting in SETTINGS:
        done = subprocess.run([sys.executable, __file__, "--worker", setting, "--dtype", dtype,
                               "--passes", str(args.passes),
                               "--prompt", str(args.prompt), "--rows", str(args.rows),
                               "--completion", str(args.completion)], capture_output=True, text=True, check=True)
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    report = {"benchmark": "trainer_memory",
              **provenance("python benchmarks/trainer_memory.py", settings, started_at=started_at),
              "at": time.time(), "dtype": dtype,
              "shape": {"prompt": args.prompt, "rows": args.rows, "completion": args.completion,
                        "tokens": args.prompt + args.rows * args.completion},
              "passes": results,
              "peak_gb": {s: r[-1]["peak_gb"] for s, r in results.items()},
              "rss_after_last_gb": {s: r[-1]["rss_gb"] for s, r in results.items()},
              # Passes after the first (allocator warm): what a step costs in steady state.
              "steady_seconds": {s: round(sum(p["seconds"] for p in r[1:]) / max(1, len(r) - 1), 1)
                                 for s, r in results.items()},
              "steady_page_faults": {s: round(sum(p["page_faults"] for p in r[1:]) / max(1, len(r) - 1))
                                     for s, r in results.items()}}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("shape", "peak_gb", "rss_after_last_gb", "steady_seconds",
                                              "steady_page_faults")}, indent=2))


if __name__ == "__main__":
    main()
