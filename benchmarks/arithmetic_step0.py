"""Tool-use arithmetic at step 0: the base model's reward per level, through the real runtime.

Starts the runtime (embedded Kafka and Redis, vLLM with the default SmolLM2-135M-Instruct unless
CLORA_MODEL is set; trainer and periodic evals off), then scores the base model on the eval suite
`arithmetic:<level>` (held-out seed, greedy, two-turn episodes: calculator, then final_answer) with
the same code the eval job uses. Writes benchmarks/results/arithmetic.json.

    .venv/bin/python benchmarks/arithmetic_step0.py [--episodes 32] [--levels 1 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from clora.bench.harness import bench_runtime
from clora.core.provenance import command, provenance
from clora.core.state import admin_key
from clora.evals.scoring import admin_chat_client, score
from clora.evals.suites import EvalSuite
from clora.wire.trainer_config import TenantConfig

REPO = Path(__file__).resolve().parents[1]
PROGRAM = "python benchmarks/arithmetic_step0.py"


async def main(args: argparse.Namespace) -> dict:
    # The command before the runtime's in-process engine exports CLORA_ variables of its own.
    started_at, ran_as = datetime.now(timezone.utc), command(PROGRAM)
    async with bench_runtime({"bench": TenantConfig()}) as runtime:  # no adapter: the base model
        settings, model = runtime.settings, runtime.model
        client = admin_chat_client(runtime.stack.gateway_url, admin_key(settings), "bench")
        levels = []
        for level in args.levels:
            suite = EvalSuite(environment=f"arithmetic:{level}", n=args.episodes, max_tokens=48)
            result = await score(client, suite, settings.serving.served_base_name)
            completed = sum("(completed)" in a for a in result.answers)
            levels.append({"level": level, "episodes": result.n, "reward": result.score,
                           "completed_episodes": completed, "seconds": round(result.seconds, 1),
                           "examples": result.answers[:3]})
            print(f"level {level}: reward {result.score:.3f} over {result.n} episodes "
                  f"({completed} completed both tool calls), {result.seconds:.1f} s")
        await client.close()
    origin = provenance(PROGRAM, settings, started_at=started_at) | {"command": ran_as}
    return {"benchmark": "arithmetic_step0", "model": model.rsplit("/", 1)[-1], **origin, "at": time.time(),
            "seed": EvalSuite(environment="arithmetic:1").seed, "greedy": True, "levels": levels}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "arithmetic.json")
    result = asyncio.run(main(parser.parse_args()))
    parser.parse_args().out.write_text(json.dumps(result, indent=2) + "\n")
