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
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from clora.core.customers import CustomerStore  # noqa: E402
from clora.core.models import resolve_model  # noqa: E402
from clora.core.settings import Settings  # noqa: E402
from clora.core.state import admin_key  # noqa: E402
from clora.demo.report import machine  # noqa: E402
from clora.evals.scoring import admin_chat_client, score  # noqa: E402
from clora.evals.suites import EvalSuite  # noqa: E402
from clora.stack import Stack  # noqa: E402


async def main(args: argparse.Namespace) -> dict:
    base = Settings()
    model = str(resolve_model(base.model, base.cache_dir))
    home = Path(tempfile.mkdtemp(prefix="clora-arith-"))
    settings = base.model_copy(update={"home": home, "model": model, "port": 0, "trainer_enabled": False,
                                       "eval_interval_s": 0.0})
    stack = Stack(settings)
    await stack.start()
    serving = asyncio.create_task(stack.serve())
    try:
        while not stack.server.started:
            await asyncio.sleep(0.05)
        await CustomerStore(stack.redis).create("bench")  # scopes the admin endpoint; no adapter: base model
        client = admin_chat_client(stack.gateway_url, admin_key(settings), "bench")
        levels = []
        for level in args.levels:
            suite = EvalSuite(environment=f"arithmetic:{level}", n=args.episodes, max_tokens=48)
            result = await score(client, suite, settings.served_base_name)
            completed = sum("(completed)" in a for a in result.answers)
            levels.append({"level": level, "episodes": result.n, "reward": result.score,
                           "completed_episodes": completed, "seconds": round(result.seconds, 1),
                           "examples": result.answers[:3]})
            print(f"level {level}: reward {result.score:.3f} over {result.n} episodes "
                  f"({completed} completed both tool calls), {result.seconds:.1f} s")
        await client.close()
    finally:
        await stack.stop()
        await asyncio.wait([serving], timeout=10)
    return {"benchmark": "arithmetic_step0", "model": model.rsplit("/", 1)[-1], "machine": machine(),
            "command": "python benchmarks/arithmetic_step0.py " + " ".join(sys.argv[1:]), "at": time.time(),
            "seed": EvalSuite(environment="arithmetic:1").seed, "greedy": True, "levels": levels}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "arithmetic.json")
    result = asyncio.run(main(parser.parse_args()))
    parser.parse_args().out.write_text(json.dumps(result, indent=2) + "\n")
