"""The engine and the trainer on two cores, under vLLM's own busy-polling and with it capped.

vLLM's engine core and its worker pass each step through shared memory and busy-poll
(`sched_yield`) for up to 1 s after each message, i.e. all the time the engine runs: a third
process that wants a core, which on two cores is the co-located trainer's. `CLORA_ENGINE_SPIN_S`
caps that poll (`clora.runtime.engine.plugin.limit_spin`); after it a reader blocks on vLLM's own
notification socket.

One fresh engine per run, in a process of its own (the setting is read when vLLM's processes
start): SmolLM2-135M-Instruct (CLORA_MODEL) in `--dtype`, four random rank-16 adapters loaded.
Timed together, from the same instant:
- the engine: `--rounds` rounds of 16 chats at once (4 per adapter), 48 tokens each (ignore_eos);
- the trainer, in a process of its own with `--trainer-threads` torch threads (default: as
  `clora train` resolves CLORA_TRAINER_THREADS; 0 here = torch's default): `--steps` backwards of
  four tenants' agent-shaped GRPO data (2 groups of 8 episodes each: a 280-token prompt, 25-45
  token first answers, most episodes with a later turn after a tool result).
Each run reports both wall times and the CPU seconds of vLLM's engine core and worker. Settings
run in turn, `--repeats` times. Writes benchmarks/results/engine_spin.json.

`--latency`: what the cap costs when nothing else runs: per setting a fresh engine and 30 chats one
at a time (16 tokens, ignore_eos, the base model), median and mean of the last 25 (the first 5
warm up). Writes benchmarks/results/engine_spin_latency.json.

    .venv/bin/python benchmarks/engine_spin.py [--settings vllm,0.005,0] [--trainer-threads 1,0] [--repeats 2]
        [--latency]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = 4


def model_dir() -> Path:
    from clora.core.models import resolve_model
    from clora.core.settings import Settings

    settings = Settings()
    return Path(resolve_model(settings.serving.model, settings.cache_dir))


def trainer(dtype: str, steps: int, threads: int) -> dict:
    """`steps` backwards of four tenants' agent-shaped groups; seconds and CPU seconds."""
    import torch

    from clora.trainer.adapter_store import TenantState
    from clora.trainer.data import TenantData
    from clora.trainer.lora import LoRASpec, new_weights
    from clora.trainer.model import load_model
    from clora.trainer.rollouts import Group, Turn
    from clora.trainer.step import backward
    from clora.wire.interactions import Sampler
    from clora.wire.trainer_config import TenantConfig

    if threads:
        torch.set_num_threads(threads)
    model, layers, _ = load_model(model_dir(), "cpu", dtype)
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    system, sampler = tokens(250), Sampler(temperature=0.7, constrained=True)
    tenants, states = [], {}
    for t in range(ADAPTERS):
        data = TenantData(f"t{t}", TenantConfig(rank=16, alpha=32))
        for _ in range(2):
            prompt, answers = system + tokens(30), [tokens(rng.randrange(25, 45)) for _ in range(8)]
            later = [[Turn(prompt + a + tokens(rng.randrange(10, 20)), (c := tokens(rng.randrange(8, 20))),
                           [-1.0] * len(c))] if rng.random() < 0.8 else [] for a in answers]
            data.groups.append(Group(prompt, answers, [[-1.0] * len(a) for a in answers],
                                     [float(rng.random() < 0.4) for _ in answers], sampler, later))
        tenants.append(data)
        weights = new_weights(layers, LoRASpec(rank=16, alpha=32), torch.Generator().manual_seed(t),
                              init_b_zero=False)
        for w in weights.tensors():
            w.requires_grad_(True)
        states[data.customer] = TenantState(data.customer, weights, [], [])
    print("ready", flush=True)
    sys.stdin.readline()  # go
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        backward(model, layers, tenants, states, 512)
    return {"trainer_s": round(time.perf_counter() - started, 1), "trainer_cpu_s": round(time.process_time() - cpu, 1)}


def adapters(out: Path) -> list[Path]:
    """Random rank-16 adapters (small B, so answers stay text-like), PEFT format."""
    import torch

    from clora.trainer.lora import LoRASpec, new_weights, save_peft
    from clora.trainer.model import load_model

    _, layers, _ = load_model(model_dir(), "cpu", "float32")
    paths = []
    for i in range(ADAPTERS):
        weights = new_weights(layers, LoRASpec(rank=16, alpha=32), torch.Generator().manual_seed(i), init_b_zero=False)
        for w in weights.tensors():
            w.data.mul_(0.05)
        save_peft(weights, out / f"adapter{i}", str(model_dir()))
        paths.append(out / f"adapter{i}")
    return paths


async def latency(setting: str, dtype: str, work: Path) -> dict:
    """One engine alone (spin `setting`), chats one at a time: seconds each."""
    from clora.runtime.engine.config import EngineConfig
    from clora.runtime.engine.manager import EngineManager

    config = EngineConfig(model=str(model_dir()), log_dir=work / "logs", cache_dir=REPO / ".clora" / "cache",
                          dtype=dtype, spin_s=None if setting == "vllm" else float(setting))
    engine = EngineManager(config)
    await engine.start()
    try:
        seconds = []
        for i in range(30):
            started = time.perf_counter()
            resp = await engine.client.chat({"model": config.served_base_name, "max_tokens": 16, "ignore_eos": True,
                                             "messages": [{"role": "user", "content": f"Say hello ({i})."}]})
            await resp.read()
            resp.release()
            seconds.append(time.perf_counter() - started)
        timed = seconds[5:]
        return {"setting": setting, "median_ms": round(1000 * statistics.median(timed), 1),
                "mean_ms": round(1000 * statistics.fmean(timed), 1)}
    finally:
        await engine.stop()


async def run(setting: str, dtype: str, rounds: int, steps: int, threads: int, work: Path) -> dict:
    """One engine (spin `setting`: `vllm` = vLLM's own) and one trainer process, timed together."""
    import psutil

    from clora.runtime.engine.config import EngineConfig
    from clora.runtime.engine.manager import EngineManager

    paths = adapters(work)
    config = EngineConfig(model=str(model_dir()), log_dir=work / "logs", cache_dir=REPO / ".clora" / "cache",
                          dtype=dtype, max_loras=ADAPTERS, spin_s=None if setting == "vllm" else float(setting))
    engine = EngineManager(config)
    await engine.start()
    try:
        for i, path in enumerate(paths):
            await engine.load_adapter(f"a{i}", path)

        async def chat(i: int, tag: int) -> None:
            resp = await engine.client.chat({"model": f"a{i % ADAPTERS}", "max_tokens": 48, "ignore_eos": True,
                                             "temperature": 0.7, "messages": [
                                                 {"role": "user", "content": f"Count to fifty ({tag}, {i})."}]})
            await resp.read()
            resp.release()

        await asyncio.gather(*[chat(i, -1) for i in range(2 * ADAPTERS)])  # warm every adapter
        child = subprocess.Popen([sys.executable, __file__, "--trainer", "--dtype", dtype, "--steps", str(steps),
                                  "--trainer-threads", str(threads)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready", "the trainer process did not start"
        procs = [psutil.Process(pid) for pid in engine.engine_core_pids()]
        procs += [c for p in procs for c in p.children(recursive=True)]
        cpu = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
        child.stdin.write("go\n")
        child.stdin.flush()
        started = time.perf_counter()
        for r in range(rounds):
            await asyncio.gather(*[chat(i, r) for i in range(16)])
        engine_s = time.perf_counter() - started
        used = {p.name(): round(sum(p.cpu_times()[:2]) - cpu[p.pid], 1) for p in procs}
        out, _ = await asyncio.to_thread(child.communicate)
        if child.returncode:
            raise RuntimeError(f"the trainer process failed ({child.returncode})")
        return {"setting": setting, "engine_s": round(engine_s, 1), **json.loads(out.strip().splitlines()[-1]),
                "engine_core_cpu_s": used.get("VLLM::EngineCore"), "worker_cpu_s": used.get("VLLM::Worker")}
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="vllm,0.005,0",
                        help="CLORA_ENGINE_SPIN_S values to compare, comma-separated; `vllm`: unset (vLLM's 1 s).")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="Engine and trainer dtype (default: CLORA_DTYPE).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "engine_spin.json")
    parser.add_argument("--latency", action="store_true", help="Lone chats' latency per setting instead.")
    parser.add_argument("--trainer-threads", default=None,
                        help="The trainer's torch threads, comma-separated values to compare (0: torch's default; "
                             "default: as `clora train` resolves CLORA_TRAINER_THREADS).")
    parser.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    started_at = datetime.now(timezone.utc)
    from clora.core.settings import Settings

    settings = Settings()
    dtype = args.dtype or settings.serving.dtype
    from clora.trainer.run import trainer_threads

    default_threads = str(settings.trainer.threads or trainer_threads("cpu"))
    threads = [int(t) for t in (args.trainer_threads or default_threads).split(",")]
    if args.trainer:
        print(json.dumps(trainer(dtype, args.steps, threads[0])), flush=True)
        return
    if args.one is not None:
        with tempfile.TemporaryDirectory(prefix="clora-spin-") as work:
            job = latency(args.one, dtype, Path(work)) if args.latency else \
                run(args.one, dtype, args.rounds, args.steps, threads[0], Path(work))
            print(json.dumps(asyncio.run(job) | {"trainer_threads": threads[0]}), flush=True)
        return
    from rich.progress import track

    from clora.core.provenance import provenance

    runs = []
    # Interleaved: drift hits all alike.
    order = [(s, t) for _ in range(args.repeats) for s in args.settings.split(",") for t in threads]
    for setting, count in track(order, description="latency runs" if args.latency else "engine + trainer runs"):
        done = subprocess.run([sys.executable, __file__, "--one", setting, "--dtype", dtype, "--rounds",
                               str(args.rounds), "--steps", str(args.steps), "--trainer-threads", str(count),
                               *(["--latency"] if args.latency else [])],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"run {setting} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(runs[-1], file=sys.stderr, flush=True)
    keys = ("median_ms", "mean_ms") if args.latency else ("engine_s", "trainer_s", "engine_core_cpu_s")
    def name(setting: str, count: int) -> str:  # one thread count: the spin setting alone, as before
        return setting if len(threads) == 1 else f"{setting} threads {count}"

    summary = {name(s, t): {k: round(statistics.fmean(r[k] for r in runs if (r["setting"], r["trainer_threads"])
                                                      == (s, t)), 1) for k in keys}
               for s in args.settings.split(",") for t in threads}
    workload = ("30 chats one at a time, 16 tokens each (ignore_eos), base model, nothing else running; the "
                "last 25 timed" if args.latency else
                "engine: rounds x 16 chats (4 adapters) x 48 tokens; trainer: steps x a 4-tenant agent-shaped GRPO "
                "backward with `trainer_threads` torch threads (0: torch's default); both started together")
    report = {"benchmark": "engine_spin_latency" if args.latency else "engine_spin",
              **provenance("python benchmarks/engine_spin.py", settings, started_at=started_at),
              "at": time.time(), "dtype": dtype,
              **({} if args.latency else {"rounds": args.rounds, "steps": args.steps, "trainer_threads": threads}),
              "workload": workload, "mean": summary, "runs": runs}
    out = args.out.with_name("engine_spin_latency.json") if args.latency and args.out.name == "engine_spin.json" \
        else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for setting, values in summary.items():
        print(f"{setting:>6}: " + ", ".join(f"{k} {v}" for k, v in values.items()))


if __name__ == "__main__":
    main()
