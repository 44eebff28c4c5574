"""Where the gateway's added latency comes from, measured against the same vLLM at the same moment.

Starts `clora serve` (trainer off), then sends 1-token requests over three paths in blocks
(shuffled block order each round; a block's first request, which inherits the previous path's
leftover work, is not counted), and reports each path's p50, its difference to the direct path's
with a bootstrap 95% interval, and the CPU each process group (clora serve with vLLM's frontend,
vLLM's engine core and worker, broker, Redis) spent per request during that path's blocks:

  direct           client -> vLLM's own OpenAI server (the engine's loopback port)
  direct+capture   the same, asking for token ids and logprobs (vLLM's share of capture)
  gateway          client -> clora gateway (auth, routing, capture to Kafka + ingestion) -> vLLM's
                   app, called in the same process

Writes benchmarks/results/latency_breakdown.json.

    .venv/bin/python benchmarks/latency_breakdown.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import PROMPT, REPO, create_customer, pct, start_serve  # noqa: E402

from clora.core.provenance import provenance  # noqa: E402

BLOCK = 8


def added(values: list[float], reference: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """Difference of medians and its bootstrap 95% interval."""
    rng = random.Random(0)
    estimate = statistics.median(values) - statistics.median(reference)
    boot = sorted(statistics.median(rng.choices(values, k=len(values)))
                  - statistics.median(rng.choices(reference, k=len(reference))) for _ in range(resamples))
    return estimate, boot[int(0.025 * resamples)], boot[int(0.975 * resamples)]


def cpu_seconds(roots: list[psutil.Process]) -> dict[str, float]:
    """CPU time (user + system) so far of each process group under `roots`, by role."""
    totals: dict[str, float] = {}
    for root in roots:
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                role = process_role(root, proc)
            except psutil.Error:
                continue
            totals[role] = totals.get(role, 0.0) + times.user + times.system
    return totals


def process_role(root: psutil.Process, proc: psutil.Process) -> str:
    command = " ".join(proc.cmdline())
    for needle, role in (("VLLM", "vLLM engine core + worker"), ("tansu", "broker"), ("valkey", "redis")):
        if needle in command:
            return role
    return "clora serve" if proc.pid == root.pid else "other"


async def measure(paths: dict[str, tuple[str, str, dict, dict]], rounds: int, block: int,
                  processes: list[psutil.Process]) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Blocks of `block` consecutive requests per path, in a shuffled order each round. A block's
    first request is not counted: it inherits the work the previous path left behind (capture,
    Kafka, ingestion); the rest see their own path's steady state, as a customer would. Also the
    CPU each process group spent per request during each path's blocks."""
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, dict[str, float]] = {name: {} for name in paths}
    order = list(paths)
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=60) as client:
        for name in order:  # warm every path's connections
            await send(client, paths[name])
        for _ in range(rounds):
            rng.shuffle(order)
            for name in order:
                before = cpu_seconds(processes)
                for i in range(block + 1):
                    elapsed = await send(client, paths[name])
                    if i:
                        latencies[name].append(elapsed)
                for role, seconds in cpu_seconds(processes).items():
                    spent = (seconds - before.get(role, 0.0)) * 1000 / (rounds * (block + 1))
                    cpu[name][role] = cpu[name].get(role, 0.0) + spent
    return latencies, cpu


async def send(client: httpx.AsyncClient, path: tuple[str, str, dict, dict]) -> float:
    url, model, headers, extra = path
    started = time.perf_counter()
    resp = await client.post(f"{url}/v1/chat/completions", headers=headers, json={
        "model": model, "messages": PROMPT, "max_tokens": 1, "temperature": 0, **extra})
    resp.raise_for_status()
    return (time.perf_counter() - started) * 1000


async def main(rounds: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="clora-bench-"))
    (home / "cache").symlink_to((REPO / ".clora" / "cache").resolve(), target_is_directory=True)
    serve, state, env = start_serve(home)
    try:
        key = create_customer(env, "bench")
        paths = {
            "direct": (state["engine_url"], "base", {}, {}),
            "direct+capture": (state["engine_url"], "base", {}, {"return_token_ids": True, "logprobs": True}),
            "gateway": (state["gateway_url"], "default", {"Authorization": f"Bearer {key}"}, {}),
        }
        latencies, cpu = await measure(paths, rounds, BLOCK, [psutil.Process(serve.pid)])
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(60)
    direct = latencies["direct"]
    rows = {}
    for name, values in latencies.items():
        estimate, low, high = added(values, direct)
        rows[name] = {"requests": len(values), "p50_ms": statistics.median(values), "p99_ms": pct(values, 0.99),
                      "added_p50_ms": estimate, "added_p50_ci95_ms": [low, high],
                      "cpu_ms_per_request": {role: round(ms, 2) for role, ms in sorted(cpu[name].items())}}
    return {"rounds": rounds, "block": BLOCK, "paths": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help=f"rounds of {BLOCK}-request blocks per path")
    args = parser.parse_args()
    started_at = datetime.now(timezone.utc)
    result = asyncio.run(main(args.rounds))
    table = Table(title=f"1-token requests: {args.rounds} rounds of {BLOCK}-request blocks per path")
    for column in ("path", "requests", "p50 ms", "p99 ms", "added p50 ms", "95% interval"):
        table.add_column(column)
    for name, row in result["paths"].items():
        low, high = row["added_p50_ci95_ms"]
        table.add_row(name, str(row["requests"]), f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}",
                      f"{row['added_p50_ms']:+.2f}", f"[{low:+.2f}, {high:+.2f}]")
    console = Console()
    console.print(table)
    roles = sorted({role for row in result["paths"].values() for role in row["cpu_ms_per_request"]})
    cpu_table = Table(title="CPU ms per request, by process group, during each path's blocks")
    for column in ("path", *roles):
        cpu_table.add_column(column)
    for name, row in result["paths"].items():
        cpu_table.add_row(name, *(f"{row['cpu_ms_per_request'].get(role, 0.0):.2f}" for role in roles))
    console.print(cpu_table)
    result |= provenance("python benchmarks/latency_breakdown.py", started_at=started_at)
    out = REPO / "benchmarks" / "results" / "latency_breakdown.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
