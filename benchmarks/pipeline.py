"""Rollouts overlapping training: time per tenant-step of N tenants' agent RL, pipeline off and on.

N tenants (4 by default) learn tool-use arithmetic (`arithmetic:1`, `--tasks` problems x `--group`
two-turn episodes each per step) on SmolLM2-135M-Instruct served by vLLM on one core, the trainer
on the other (one torch thread), driven by `clora train`'s own loop (`trainer.loop.drive`). Off:
every tenant in every step, sampling its rollouts, then training (shared decode batches and
trainer passes, nothing overlapped). On: the loop as `clora train` runs it: from four tenants they
take turns in halves, one half's rollouts sampled (by its newest versions) while the other half
trains. A cycle of the loop therefore trains all N tenants off and half of them on, so the modes
compare by seconds per tenant-step (a cycle's wall time over the tenants it trained). Per cycle:
wall time between cycle ends, and the share of it the engine spent sampling for the trainer and
the trainer computing. Each mode runs its own tenants from the base model. The modes alternate in
`--rounds` blocks of `--steps` steps per tenant (off, on, off, on, ...: a slow spell of the
machine falls on both); each block's first cycle is a warm-up (the pipeline has nothing sampled
ahead when a block starts) and is not measured. Writes benchmarks/results/pipeline.json.

    .venv/bin/python benchmarks/pipeline.py [--tenants 4] [--rounds 2] [--steps 4] [--tasks 1] [--group 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from contextlib import aclosing
from datetime import datetime, timezone
from pathlib import Path

from clora.bench.harness import bench_runtime, inline_trainer
from clora.core.provenance import command, provenance
from clora.trainer.loop import Trainer, drive
from clora.trainer.scheduler import Candidate, Scheduler
from clora.trainer.timeline import Timeline
from clora.wire.trainer_config import TenantConfig

REPO = Path(__file__).resolve().parents[1]
PROGRAM = "python benchmarks/pipeline.py"

MODES = {"off": False, "on": True}


async def run_block(trainer: Trainer, customers: list[str], pipeline: bool, steps: int, block: int) -> list[dict]:
    trainer.timeline = Timeline()

    async def candidates() -> list[Candidate]:
        return [Candidate(c, 1.0, samples=True) for c in customers]

    rows = []
    async with aclosing(drive(trainer, Scheduler(len(customers)), candidates, asyncio.Event(), pipeline=pipeline)) as driven:
        async for reports in driven:
            first = reports[0]
            rows.append({"block": block, "step": len(rows) + 1, "cycle_s": round(first.cycle_s, 2),
                         "engine_busy": round(first.engine_busy, 3), "trainer_busy": round(first.trainer_busy, 3),
                         "backward_s": round(first.backward_s, 2), "tenants": len(reports),
                         "lagged_groups": sum(r.result.lagged_groups for r in reports),
                         "skipped": sum(bool(r.skipped) for r in reports),
                         "gap_mean": [r.result.gap.mean for r in reports],
                         "sampled_reward": statistics.fmean(r.mean_reward for r in reports)})
            print(f"pipeline {'on' if pipeline else 'off'} cycle {len(rows)} ({len(reports)} tenants): "
                  f"{first.cycle_s:.1f} s, engine busy "
                  f"{first.engine_busy:.0%}, trainer busy {first.trainer_busy:.0%}", flush=True)
            if sum(row["tenants"] for row in rows) >= steps * len(customers):
                break
    return rows


def summary(rows: list[dict]) -> dict:
    measured = [r for r in rows if r["step"] > 1]  # each block's first cycle is a warm-up
    tenant_steps = sum(r["tenants"] for r in measured)
    return {"measured_cycles": len(measured), "measured_tenant_steps": tenant_steps,
            "s_per_tenant_step": round(sum(r["cycle_s"] for r in measured) / tenant_steps, 2),
            "cycle_s_median": statistics.median(r["cycle_s"] for r in measured),
            "engine_busy_mean": round(statistics.fmean(r["engine_busy"] for r in measured), 3),
            "trainer_busy_mean": round(statistics.fmean(r["trainer_busy"] for r in measured), 3),
            "backward_s_median": statistics.median(r["backward_s"] for r in measured),
            "lagged_groups": sum(r["lagged_groups"] for r in measured),
            "skipped_tenant_steps": sum(r["skipped"] for r in measured)}


async def main(args: argparse.Namespace) -> dict:
    # The command before the runtime's in-process engine exports CLORA_ variables of its own.
    started_at, ran_as = datetime.now(timezone.utc), command(PROGRAM)
    config = TenantConfig(environment="arithmetic:1", lr=1e-3, rank=16, alpha=32, group_size=args.group,
                          prompts_per_step=args.tasks, max_new_tokens=48, temperature=args.temperature)
    tenants = {mode: [f"{mode}-{i}" for i in range(args.tenants)] for mode in MODES}
    configs = {name: config.model_copy(update={"seed": i}) for names in tenants.values()
               for i, name in enumerate(names)}
    out = {"benchmark": "pipeline", "config": config.model_dump(), "tenants": args.tenants, "modes": {}}
    async with bench_runtime(configs) as runtime, inline_trainer(runtime) as trainer:
        out["model"] = runtime.model.rsplit("/", 1)[-1]
        # Seeds are the tenants' indices (configs above).
        out |= {**provenance(PROGRAM, runtime.settings, config, ignore=("seed",), started_at=started_at),
                "command": ran_as}
        rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for block in range(args.rounds):
            for mode, pipeline in MODES.items():
                rows[mode] += await run_block(trainer, tenants[mode], pipeline, args.steps, block)
        out["modes"] = {mode: {"summary": summary(r), "steps": r} for mode, r in rows.items()}
    off, on = out["modes"]["off"]["summary"], out["modes"]["on"]["summary"]
    out["speedup"] = round(off["s_per_tenant_step"] / on["s_per_tenant_step"], 3)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="blocks per mode, alternating off and on")
    parser.add_argument("--steps", type=int, default=4, help="steps per tenant per block")
    parser.add_argument("--tasks", type=int, default=1, help="problems per tenant per step")
    parser.add_argument("--group", type=int, default=4, help="episodes per problem")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pipeline.json")
    cli = parser.parse_args()
    result = asyncio.run(main(cli))
    cli.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({mode: v["summary"] for mode, v in result["modes"].items()}, indent=2))
    print(f"speedup {result['speedup']}x; wrote {cli.out}")
