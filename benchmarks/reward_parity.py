"""Does sharing the runtime change what an RL experiment learns? The same seeds three ways.

`clora bench experiments` compares concurrent experiments' per-step rewards with single ones; its
sweeps had the concurrent runs behind at step 2 (issue 19's no-regression criterion). This asks
the question with nothing else different: one warm runtime (engine + trainer process, as the
sweep's), the same seeds, the same tenant config (`SweepOptions.tenant`: arithmetic:0, 2 problems x
group 8, lr 1e-3, T 0.7), `--steps` steps each, three modes in turn on fresh tenants:

- **pipelined**: N at once through `clora train`'s loop (from 4 tenants they take turns in halves,
  one half's rollouts sampled while the other half trains), as the sweep's concurrent runs;
- **sync**: N at once, every tenant in every step, each step sampling then training (no pipeline):
  the multiplexing (shared decode batches, shared trainer passes) without the pipeline;
- **single**: one after another, sampling then training, as the sweep's warm serial runs.

A seed draws the same problems in every mode (the tenant's own RNG), so differences are paired by
seed: per step, the mean over seeds of (mode - single) and its sd. Rollouts are sampled (T 0.7,
vLLM unseeded), so a rerun gives other rewards: the claim is only whether a mode falls behind
beyond that noise, not the rewards themselves.

    .venv/bin/python benchmarks/reward_parity.py [--seeds 4] [--steps 4] [--model tiny]

Writes benchmarks/results/reward_parity.json (with --model: /tmp/reward_parity-MODEL.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "reward_parity.json"
PROGRAM = "python benchmarks/reward_parity.py"
MODES = ("pipelined", "sync", "single")


async def measure(seeds: list[int], steps: int, model: str | None = None) -> dict:
    from clora.bench.experiments import SweepOptions, run_experiments
    from clora.bench.harness import bench_runtime, trainer_process

    options = SweepOptions()
    tenants = {f"{mode}-{s}": options.tenant(s) for mode in MODES for s in seeds}
    tenants["warm-up"] = options.tenant(len(seeds) + 100)
    rewards, seconds = {}, {}
    async with bench_runtime(tenants, model, max_loras=max(8, len(seeds)), max_cpu_loras=16) as runtime, \
            trainer_process(runtime) as trainer:
        print(f"runtime up (logs: {runtime.stack.run_dir}); an untimed warm-up step", flush=True)
        await trainer.run(run_experiments, ["warm-up"], [len(seeds) + 100], 1)
        for mode in MODES:
            started = time.perf_counter()
            names = [f"{mode}-{s}" for s in seeds]
            if mode == "single":
                runs = [e for name, s in zip(names, seeds)
                        for e in await trainer.run(run_experiments, [name], [s], steps, False)]
            else:
                runs = await trainer.run(run_experiments, names, seeds, steps, mode == "pipelined")
            rewards[mode], seconds[mode] = [e.rewards for e in runs], round(time.perf_counter() - started, 1)
            print(f"{mode}: {seconds[mode]} s, rewards {rewards[mode]}", flush=True)
        dtypes = {"engine": runtime.settings.serving.dtype, "trainer": runtime.train_run().dtype}
        model = runtime.model.rsplit("/", 1)[-1]
    return {"rewards": rewards, "seconds": seconds, "dtype": dtypes, "model": model, "settings": runtime.settings,
            "tenant": options.tenant(0)}  # every tenant's config but for its seed


def mean_sd(values: list[float]) -> list[float]:
    return [round(statistics.fmean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0]


def summarise(rewards: dict[str, list[list[float]]], steps: int) -> dict:
    """Per mode and step: reward mean and sd over seeds, and (mode - single) paired by seed."""
    out = {}
    for mode in MODES:
        runs, single = rewards[mode], rewards["single"]
        out[mode] = {"reward_per_step": [mean_sd([r[k] for r in runs]) for k in range(steps)]}
        if mode != "single":
            out[mode]["minus_single_per_step"] = [mean_sd([r[k] - s[k] for r, s in zip(runs, single)])
                                                  for k in range(steps)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4, help="experiments per mode (seeds 0..n-1)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", help="`tiny`: a random Llama (a smoke run: it learns nothing) [default: CLORA_MODEL]")
    args = parser.parse_args()
    from clora.cli.common import run_serving
    from clora.core.provenance import command, provenance

    # The command before the runtime's in-process engine exports CLORA_ variables of its own.
    started, started_at, ran_as = time.perf_counter(), datetime.now(timezone.utc), command(PROGRAM)
    seeds = list(range(args.seeds))
    measured = run_serving(measure(seeds, args.steps, args.model))
    result = {"benchmark": "reward_parity", "model": measured["model"], "dtype": measured["dtype"],
              "environment": "arithmetic:0", "seeds": seeds, "steps": args.steps,
              **provenance(PROGRAM, measured["settings"], measured["tenant"], ignore=("seed",), started_at=started_at),
              "command": ran_as, "at": time.time(), "seconds": measured["seconds"], "rewards": measured["rewards"],
              **summarise(measured["rewards"], args.steps), "total_s": round(time.perf_counter() - started)}
    out = OUT if args.model is None else Path(f"/tmp/reward_parity-{args.model}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    for mode in MODES:
        line = " ".join(f"{m:.2f}" for m, _ in result[mode]["reward_per_step"])
        diff = " ".join(f"{m:+.2f}±{sd:.2f}" for m, sd in result[mode].get("minus_single_per_step", []))
        print(f"{mode:>9}: {line}" + (f"   vs single, paired: {diff}" if diff else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
