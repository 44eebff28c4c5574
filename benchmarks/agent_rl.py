"""Agent RL on the report's task: one tenant learning tool-use arithmetic, the learning curve.

Level 0 (the default) is the documented variant SmolLM2-135M learns at our scale: the expression
is stated in the question and the reward also asks for a correct calculator call (see
clora/agents/arithmetic.py); at level 1 its held-out reward did not move in 10 steps (BENCHMARKS.md).

Starts the runtime (embedded Kafka and Redis, vLLM with SmolLM2-135M-Instruct unless CLORA_MODEL is
set; its own trainer and periodic evals off) and drives `clora train`'s step in this process, on
the other core (one torch thread), as the trainer child would: each step samples `--tasks`
problems x `--group` episodes of `arithmetic:<level>` through the gateway's admin API under the
tenant's newest version (turn 1: a calculator call, its result fed back; turn 2: final_answer),
trains every turn with GRPO, and publishes the version that vLLM then serves. Before the first step
and after every `--eval-every` steps the served version is scored greedily on held-out problems
(the `report` split, never trained on) with the eval job's code. Writes
benchmarks/results/agent_rl.json.

    .venv/bin/python benchmarks/agent_rl.py [--steps 20] [--level 0] [--tasks 8] [--group 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from clora.bench.harness import bench_runtime, inline_trainer
from clora.core.provenance import command, provenance
from clora.core.state import admin_key
from clora.evals.scoring import admin_chat_client, score
from clora.evals.suites import EvalSuite
from clora.trainer.loop import step
from clora.wire.trainer_config import TenantConfig

REPO = Path(__file__).resolve().parents[1]
PROGRAM = "python benchmarks/agent_rl.py"

CUSTOMER = "agent"


async def evaluate(client, level: int, episodes: int, model: str) -> dict:
    suite = EvalSuite(environment=f"arithmetic:{level}", n=episodes, max_tokens=48, split="report")
    result = await score(client, suite, model)
    return {"version": model, "reward": result.score, "interval90": [result.low, result.high],
            "completed_episodes": sum("(completed)" in a for a in result.answers), "examples": result.answers[:3]}


def report_of(args: argparse.Namespace, model: str, config: TenantConfig, origin: dict, evals: list, curve: list,
              done: bool) -> dict:
    """The result so far (written after every step: a long run stopped early keeps its curve);
    `origin`: the run's provenance."""
    return {"benchmark": "agent_rl", "model": model.rsplit("/", 1)[-1], **origin, "at": time.time(),
            "complete": done, "config": config.model_dump(), "eval_episodes": args.episodes, "eval": evals,
            "curve": curve, "step_seconds_median": statistics.median(c["seconds"] for c in curve) if curve else None}


async def main(args: argparse.Namespace) -> dict:
    # The command before the runtime's in-process engine exports CLORA_ variables of its own.
    started_at, ran_as = datetime.now(timezone.utc), command(PROGRAM)
    config = TenantConfig(environment=f"arithmetic:{args.level}", lr=args.lr, rank=16, alpha=32,
                          group_size=args.group, prompts_per_step=args.tasks, max_new_tokens=48,
                          temperature=args.temperature, seed=args.seed)
    curve, evals = [], []
    async with bench_runtime({CUSTOMER: config}) as runtime, inline_trainer(runtime) as trainer:
        stack, settings, model = runtime.stack, runtime.settings, runtime.model
        origin = provenance(PROGRAM, settings, config, started_at=started_at) | {"command": ran_as}
        client = admin_chat_client(stack.gateway_url, admin_key(settings), CUSTOMER)
        evals.append({"step": 0, **await evaluate(client, args.level, args.episodes, settings.serving.served_base_name)})
        print(f"step 0: held-out reward {evals[-1]['reward']:.3f}", flush=True)
        for n in range(1, args.steps + 1):
            started = time.perf_counter()
            (report,) = await step(trainer, [CUSTOMER])
            seconds = time.perf_counter() - started
            gap = report.result.gap
            curve.append({"step": n, "version": report.version, "sampled_reward": report.mean_reward,
                          "loss": report.result.losses.get("onpolicy"), "seconds": round(seconds, 1),
                          "sampling_s": round(report.gather_s, 1), "backward_s": round(report.backward_s, 1),
                          "logprob_gap": gap.mean, "skipped": report.skipped})
            print(f"step {n}: sampled reward {report.mean_reward:.3f}, {seconds:.1f} s (sampling "
                  f"{report.gather_s:.1f}, backward {report.backward_s:.1f})", flush=True)
            if n % args.eval_every == 0 or n == args.steps:
                evals.append({"step": n, **await evaluate(client, args.level, args.episodes, report.version)})
                print(f"step {n}: held-out reward {evals[-1]['reward']:.3f}", flush=True)
            report_so_far = report_of(args, model, config, origin, evals, curve, False)
            args.out.write_text(json.dumps(report_so_far, indent=2) + "\n")
        await client.close()
    return report_of(args, model, config, origin, evals, curve, True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--level", type=int, default=0, help="0: the variant SmolLM2 learns (see above)")
    parser.add_argument("--tasks", type=int, default=8, help="problems per step")
    parser.add_argument("--group", type=int, default=4, help="episodes per problem (GRPO group)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=64, help="held-out episodes per eval")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "agent_rl.json")
    cli = parser.parse_args()
    result = asyncio.run(main(cli))
    cli.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {cli.out}")
