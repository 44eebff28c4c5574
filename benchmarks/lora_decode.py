"""Decode speed on customers' adapters vs the base model, with and without clora's grouped LoRA ops.

Three vLLM servers, one after another, each started as vLLM's API server (`vllm serve`) with exactly the arguments and
environment `clora serve` gives its engine (runtime/engine/config.py; thread binding
VLLM_CPU_OMP_THREADS_BIND=auto for all three):
  grouped   LoRA on, clora's plugin on (CLORA_GROUPED_LORA=1, the default)
  vllm_ops  LoRA on, plugin off: vLLM 0.32's own CPU ops
  no_lora   a server without --enable-lora (what a user pays for enabling LoRA at all)
On each LoRA server, 16 random adapters of the trainer's default shape (rank 16, all seven
projections; max rank 16, 4 slots) are loaded, and at concurrency 1, 8 and 32 it measures decode
tokens/s (64-token answers, ignore_eos, temperature 0) for: the base model; one adapter for every
request; 4 distinct adapters round-robin (4 in every batch); 16 adapters round-robin (rotating over
the 4 slots). Cases alternate in each of two rounds; a case's tok/s is its tokens over its wall time,
summed over the rounds. ratio = adapter_tok_s / base_tok_s, both from the same server and run.
Then greedy answers (48 tokens) for 8 prompts on the base model and 4 adapters, all in flight at
once (mixed batches), compared across servers: identical text and the largest logprob gap on the
tokens both servers chose. Then a decode-step profile on the grouped server (vLLM's torch profiler,
4 adapters at concurrency 32): time by operator.
Writes benchmarks/results/lora_decode.json (not with --quick).

    .venv/bin/python benchmarks/lora_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import REPO, make_adapters  # noqa: E402

from clora.core.models import ensure_default_model  # noqa: E402
from clora.core.processes import free_port  # noqa: E402
from clora.core.provenance import provenance  # noqa: E402
from clora.core.settings import Settings  # noqa: E402
from clora.runtime.engine.config import EngineConfig  # noqa: E402

console = Console(width=150)
OUT = REPO / "benchmarks" / "results" / "lora_decode.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
TOKENS = 64
ROUNDS = 2
SLOTS = 4
CONCURRENCY = [1, 8, 32]
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
GREEDY_PROMPTS = ["What is a rainbow?", "Give me three tips for sleeping well.", "Why is the sea salty?",
                  "Explain photosynthesis to a child.", "What does a compiler do?", "Describe a cat.",
                  "How do vaccines work?", "Name two uses of copper."]
LORA_FLAGS = {"--enable-lora": 0, "--max-lora-rank": 1, "--max-loras": 1, "--max-cpu-loras": 1}


def server_argv(config: EngineConfig, lora: bool) -> list[str]:
    """`clora serve`'s engine arguments; without the LoRA flags for the no-LoRA server."""
    argv, out, skip = config.argv(), [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        if not lora and arg in LORA_FLAGS:
            skip = LORA_FLAGS[arg]
            continue
        out.append(arg)
    return out


class Server:
    """One vLLM API server process (as `vllm serve`) with clora's engine arguments and environment."""

    def __init__(self, name: str, model: Path, home: Path, lora: bool, grouped: bool, profile_dir: Path | None):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = Settings(home=home)
        config = EngineConfig.from_settings(settings.serving, str(model), home / name, settings.cache_dir)
        config.grouped_lora = grouped
        config.max_cpu_loras = 16
        argv = server_argv(config, lora) + ["--host", "127.0.0.1", "--port", str(self.port)]
        if profile_dir:
            argv += ["--profiler-config", json.dumps({"profiler": "torch", "torch_profiler_dir": str(profile_dir),
                                                      "torch_profiler_with_stack": False})]
        env = {**os.environ, **config.env()}
        env.pop("VLLM_LOGGING_CONFIG_PATH")  # its log goes to the file below instead
        self.log = home / f"{name}.log"
        # vLLM's API server module: the `vllm` script asks for the `vllm` distribution, ours is vllm-cpu.
        self.proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv], env=env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"{self.name} did not become healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def plugin_on(self) -> bool:
        return "clora grouped LoRA ops on" in self.log.read_text(errors="replace")


async def load_adapters(url: str, adapters: list[Path]) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        for path in adapters:
            resp = await client.post(f"{url}/v1/load_lora_adapter", json={"lora_name": path.name, "lora_path": str(path)})
            resp.raise_for_status()


async def decode(url: str, models: list[str], concurrency: int, requests: int) -> tuple[int, float]:
    """`requests` 64-token answers, `concurrency` in flight, models round-robin: (tokens, seconds)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    tokens = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        async def worker() -> None:
            nonlocal tokens
            while not queue.empty():
                i = queue.get_nowait()
                resp = await client.post(f"{url}/v1/chat/completions", json={
                    "model": models[i % len(models)], "messages": PROMPT, "max_tokens": TOKENS,
                    "temperature": 0, "ignore_eos": True})
                resp.raise_for_status()
                tokens += resp.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens, time.perf_counter() - started


def cases(adapters: list[Path]) -> dict[str, list[str]]:
    names = [p.name for p in adapters]
    return {"base": ["base"], "1": names[:1], "4": names[:SLOTS], "16": names}


def requests_at(concurrency: int, quick: bool) -> int:
    return max(4, concurrency) if quick else max(4, concurrency * (1 if concurrency >= 32 else 2))


async def measure_lora_server(url: str, adapters: list[Path], concurrencies: list[int], quick: bool) -> dict:
    """tok/s per (concurrency, case), cases alternating within each round."""
    plan = cases(adapters)
    await decode(url, list(plan["16"]) + ["base"], 8, 17)  # warm-up: every adapter seen once
    totals: dict[tuple[int, str], list[float]] = {}
    for round_ in range(1 if quick else ROUNDS):
        for concurrency in concurrencies:
            order = list(plan) if round_ % 2 == 0 else list(reversed(plan))
            for case in order:
                tokens, seconds = await decode(url, plan[case], concurrency, requests_at(concurrency, quick))
                acc = totals.setdefault((concurrency, case), [0, 0.0])
                acc[0] += tokens
                acc[1] += seconds
                console.print(f"  c={concurrency:<3} {case:>4}: {tokens / seconds:6.1f} tok/s")
    return {key: tokens / seconds for key, (tokens, seconds) in totals.items()}


async def measure_no_lora_server(url: str, concurrencies: list[int], quick: bool) -> dict[int, float]:
    await decode(url, ["base"], 8, 8)
    out = {}
    for concurrency in concurrencies:
        tokens, seconds = 0, 0.0
        for _ in range(1 if quick else ROUNDS):
            t, s = await decode(url, ["base"], concurrency, requests_at(concurrency, quick))
            tokens, seconds = tokens + t, seconds + s
        out[concurrency] = tokens / seconds
        console.print(f"  c={concurrency:<3} base: {out[concurrency]:6.1f} tok/s")
    return out


async def greedy_answers(url: str, models: list[str]) -> dict[str, dict]:
    """Every (model, prompt) greedy answer with its token logprobs, all requests in flight at once."""
    async with httpx.AsyncClient(timeout=900) as client:
        async def ask(model: str, prompt: str) -> tuple[str, dict]:
            resp = await client.post(f"{url}/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 48,
                "temperature": 0, "logprobs": True})
            resp.raise_for_status()
            choice = resp.json()["choices"][0]
            content = choice["logprobs"]["content"]
            return f"{model}|{prompt}", {"text": choice["message"]["content"],
                                         "tokens": [c["token"] for c in content],
                                         "logprobs": [c["logprob"] for c in content]}

        pairs = await asyncio.gather(*(ask(m, p) for m in models for p in GREEDY_PROMPTS))
    return dict(pairs)


def compare(ours: dict[str, dict], theirs: dict[str, dict], prefix: str = "") -> dict:
    """Identical greedy texts, and the largest logprob gap on the common token prefix."""
    keys = [k for k in ours if k.startswith(prefix)]
    same, gap = 0, 0.0
    for key in keys:
        a, b = ours[key], theirs[key]
        same += a["text"] == b["text"]
        for ta, tb, la, lb in zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"]):
            if ta != tb:
                break
            gap = max(gap, abs(la - lb))
    return {"answers": len(keys), "identical_text": same, "max_logprob_gap_common_prefix": gap}


async def profile_step(url: str, adapters: list[Path], profile_dir: Path) -> dict:
    """vLLM's torch profiler over a few decode steps, 4 adapters at concurrency 32: time by operator."""
    names = [p.name for p in adapters[:SLOTS]]
    async with httpx.AsyncClient(timeout=300) as client:
        (await client.post(f"{url}/start_profile")).raise_for_status()
        await decode(url, names, 32, 32)
        (await client.post(f"{url}/stop_profile")).raise_for_status()
    deadline = time.monotonic() + 120
    tables: list[str] = []
    while time.monotonic() < deadline and not tables:  # the worker's table (rank0), not the frontend's
        tables = glob.glob(str(profile_dir / "**" / "rank0*profiler_out*.txt"), recursive=True)
        time.sleep(1)
    if not tables:
        return {"error": f"no profiler table under {profile_dir}"}
    return summarise_profile(Path(sorted(tables)[-1]).read_text())


CATEGORIES = {  # operator -> where its time goes (self CPU time; the table's own column)
    "base linear layers (vLLM's oneDNN GEMMs)": ("_C::onednn_mm",),
    "LoRA GEMMs (ours)": ("aten::bmm", "aten::mm", "aten::addmm_", "aten::addmm"),
    "LoRA gathers/scatters (ours)": ("aten::index_select", "aten::index_add_", "aten::scatter_add_",
                                     "aten::index_copy_"),
    "attention and KV cache": ("_C::cpu_attention_with_kv_cache", "_C::cpu_attn_reshape_and_cache",
                               "vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"),
    "Python between ops (step annotations' self time)": ("execute_context",),
}


def summarise_profile(table: str) -> dict:
    """Self CPU time by operator from torch's key_averages table: categories and the top operators."""
    rows = []
    for line in table.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) < 7 or cells[0].startswith(("Name", "-")):
            continue
        seconds = _seconds(cells[2])
        if seconds is not None:
            rows.append((cells[0], seconds))
    total = sum(s for _, s in rows) or 1.0
    categories = {name: sum(s for op, s in rows if op.startswith(prefixes)) for name, prefixes in CATEGORIES.items()}
    categories["everything else"] = total - sum(categories.values())
    top = sorted(rows, key=lambda r: -r[1])[:15]
    return {"self_cpu_s_total": total,
            "categories": {name: {"self_cpu_s": s, "share": s / total} for name, s in categories.items()},
            "top_ops": [{"op": op, "self_cpu_s": s, "share": s / total} for op, s in top]}


def _seconds(cell: str) -> float | None:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", cell)
    if not match:
        return None
    return float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[match.group(2)]


SERVERS = {"grouped": (True, True), "vllm_ops": (True, False), "no_lora": (False, False)}  # name: (lora, plugin)


async def measure_servers(names: list[str], quick: bool, concurrencies: list[int]) -> tuple[dict, dict, dict, Path]:
    """Every named server in turn: tok/s, greedy answers, whether the plugin was on."""
    home = Path(tempfile.mkdtemp(prefix="clora-lora-decode-"))
    model = ensure_default_model((REPO / ".clora" / "cache").resolve())
    adapters = make_adapters(str(model), 16, home / "adapters")
    speeds, answers, loaded = {}, {}, {}
    for name in names:
        lora, grouped = SERVERS[name]
        profile_dir = home / "profile" if name == "grouped" and not quick else None
        server = Server(name, model, home, lora, grouped, profile_dir)
        console.print(f"[bold]{name}[/]: starting vllm serve ...")
        try:
            server.wait_ready()
            loaded[name] = server.plugin_on()
            if lora:
                await load_adapters(server.url, adapters)
                speeds[name] = await measure_lora_server(server.url, adapters, concurrencies, quick)
                answers[name] = await greedy_answers(server.url, ["base", *[p.name for p in adapters[:SLOTS]]])
                if profile_dir:
                    speeds["profile"] = await profile_step(server.url, adapters, profile_dir)
            else:
                speeds[name] = await measure_no_lora_server(server.url, concurrencies, quick)
                answers[name] = await greedy_answers(server.url, ["base"])
        finally:
            server.stop()
    return speeds, answers, loaded, model


async def run(quick: bool, started_at: datetime) -> dict:
    concurrencies = CONCURRENCY
    speeds, answers, loaded, model = await measure_servers(list(SERVERS), quick, concurrencies)
    assert loaded["grouped"] and not loaded["vllm_ops"], f"plugin state per server: {loaded}"
    rows = []
    for concurrency in concurrencies:
        for case in ("1", "4", "16"):
            base, ours, theirs = (speeds["grouped"][(concurrency, "base")], speeds["grouped"][(concurrency, case)],
                                  speeds["vllm_ops"][(concurrency, case)] / speeds["vllm_ops"][(concurrency, "base")])
            rows.append({"concurrency": concurrency, "adapters": int(case), "rotating": case == "16", "rank": RANK,
                         "targets": TARGETS, "base_tok_s": base, "adapter_tok_s": ours, "ratio": ours / base,
                         "ratio_vllm_ops": theirs, "vllm_ops_base_tok_s": speeds["vllm_ops"][(concurrency, "base")],
                         "vllm_ops_adapter_tok_s": speeds["vllm_ops"][(concurrency, case)],
                         "no_lora_server_tok_s": speeds["no_lora"][concurrency],
                         "base_vs_no_lora_server": base / speeds["no_lora"][concurrency]})
    return {
        # The Settings every `Server` runs under, but for its temporary home.
        **provenance("python benchmarks/lora_decode.py", Settings(), started_at=started_at),
        "thread_binding": "VLLM_CPU_OMP_THREADS_BIND=auto (every server)",
        "model": str(model), "tokens_per_answer": TOKENS, "rounds": 1 if quick else ROUNDS, "slots": SLOTS,
        "rows": rows,
        "greedy": {
            "grouped_vs_vllm_ops_adapters": compare(answers["grouped"], answers["vllm_ops"], prefix="a"),
            "grouped_base_vs_no_lora_server": compare({k: v for k, v in answers["grouped"].items()
                                                       if k.startswith("base|")}, answers["no_lora"]),
            "vllm_ops_base_vs_no_lora_server": compare({k: v for k, v in answers["vllm_ops"].items()
                                                        if k.startswith("base|")}, answers["no_lora"]),
        },
        "profile_grouped_c32_4_adapters": speeds.get("profile"),
    }


def show(result: dict) -> None:
    table = Table(title="decode tok/s: adapter vs base, same server")
    for col in ("c", "adapters", "base", "adapter", "ratio", "ratio vLLM ops", "no-LoRA server", "base/no-LoRA"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        table.add_row(str(row["concurrency"]), f"{row['adapters']}{' rot' if row['rotating'] else ''}",
                      f"{row['base_tok_s']:.1f}", f"{row['adapter_tok_s']:.1f}", f"{row['ratio']:.2f}",
                      f"{row['ratio_vllm_ops']:.2f}", f"{row['no_lora_server_tok_s']:.1f}",
                      f"{row['base_vs_no_lora_server']:.2f}")
    console.print(table)
    console.print_json(data=result["greedy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, fewer requests; writes nothing")
    parser.add_argument("--servers", nargs="+", choices=list(SERVERS), help="only these servers' tok/s; writes nothing")
    parser.add_argument("--concurrency", nargs="+", type=int, default=CONCURRENCY, help="with --servers")
    args = parser.parse_args()
    started, started_at = time.monotonic(), datetime.now(timezone.utc)
    if args.servers:
        speeds = asyncio.run(measure_servers(args.servers, args.quick, args.concurrency))[0]
        console.print({name: {f"c={c} {case}": round(v, 1) for (c, case), v in by.items()}
                       for name, by in speeds.items() if name != "no_lora" and name != "profile"})
        return
    result = asyncio.run(run(args.quick, started_at))
    result["minutes"] = round((time.monotonic() - started) / 60, 1)
    show(result)
    if not args.quick:
        OUT.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
