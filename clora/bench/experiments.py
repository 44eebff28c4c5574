"""`clora bench experiments`: the C-LoRA report's experiment at our scale.

An *experiment* is one tenant's RL run of `steps` steps from a fresh adapter on the tool-use
environment (`arithmetic:0` by default: see clora/agents/arithmetic.py). Three ways to run N of them:

- **concurrent**: N experiments at once on one warm runtime, driven by `clora train`'s own loop
  (`trainer.loop.drive`, pipelined) in a trainer process of its own, as `clora serve` runs it
  (`harness.TrainerProcess`): every tenant's rollouts share the engine's decode batches and their
  groups share the trainer's passes;
- **cold serial**: one after another, each in a fresh runtime (engine start, trainer process
  start and model load, warm-up), each step sampling then training (synchronous, on-policy), as a
  single-tenant framework runs them (the report's baseline: one-at-a-time synchronous runs);
- **warm serial**: the same, one after another on the already-warm runtime.

So the ratios count what multiplexing *and* the rollout/train pipeline win (the issue's
definition).

The serial baselines are built from `serial_runs` measured single experiments of each kind times
N, which the output says (`serial_measured_runs`); every concurrent run is measured (seeds
0..N-1). A seed fixes an experiment's problems and initial adapter, so the serial runs take
distinct seeds: cold 0..k-1, warm k..2k-1 (`serial_seeds`). Their rewards are then 2k independent
experiments, the spread the no-regression criterion divides by (a seed run twice, cold and warm,
shares its problems: two such runs sit closer together than two experiments do, and an sd over
them says less than it seems), and with the default k = 4 they draw exactly the problems of the
N = 8 concurrent runs (seeds 0..7). Experiment times:
First, Mean and Final (when the first, the average and the last experiment of the N finished;
Final is `concurrent_s`). Rewards are each step's sampled reward: step k's rollouts come from the
version after k-1 updates (`reward_first` is the base model's), serial and concurrent alike:
at N >= 4 the concurrent tenants take turns in halves, one half's rollouts sampled while the other
half trains (`trainer.loop.halves`); at N = 1 and 2 each step samples every tenant's rollouts
together, then trains them (sampled ahead they would come from the version the step replaces), so
the N = 1 row runs as a warm single does.

**Freshness** (on the warm runtime, last): N feedback-only customers each send an operator
correction of a served answer every `freshness_interval_s` on average (Poisson) for
`freshness_s`; `clora train`'s loop runs as `clora train` runs it (its own candidates: a customer
trains at `min_records` new records or when its oldest has waited `max_record_wait_s`). An
event's freshness is the time from its 202 to when the replay buffer shows a version that trained
on it (published, and served: nothing is gated here), polled every 0.25 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import statistics
import sys
import time
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx
from pydantic import BaseModel, Field

from clora.bench.harness import BenchRuntime, TrainerProcess, bench_runtime, trainer_process
from clora.core.settings import Settings
from clora.demo.report import machine
from clora.trainer.loop import StepReport, Timeline, Trainer, drive
from clora.trainer.scheduler import Candidate, Scheduler
from clora.wire.trainer_config import TenantConfig


class SweepOptions(BaseModel):
    ns: list[int] = Field(default=[1, 2, 4, 8], description="Concurrent experiments per run.")
    steps: int = Field(default=10, ge=1)
    tasks: int = Field(default=2, ge=1, description="Problems per experiment per step.")
    group: int = Field(default=8, ge=2, description="Episodes per problem (the GRPO group).")
    environment: str = "arithmetic:0"
    lr: float = Field(default=5e-4, gt=0)  # at 1e-3 rewards saturate by step 5 (BENCHMARKS.md)
    temperature: float = Field(default=0.7, gt=0)
    serial_runs: int = Field(default=4, ge=1, description="Measured single experiments of each serial kind "
                                                          "(cold seeds 0..k-1, warm k..2k-1).")
    model: str | None = Field(default=None, description="None: CLORA_MODEL or the default; `tiny`: a random Llama.")
    freshness_ns: list[int] = Field(default=[1, 8], description="Active feedback-only customers per freshness run.")
    freshness_s: float = Field(default=180.0, gt=0, description="Seconds of feedback per freshness run.")
    freshness_interval_s: float = Field(default=10.0, gt=0, description="Mean seconds between a customer's events.")

    def tenant(self, seed: int) -> TenantConfig:
        return TenantConfig(environment=self.environment, lr=self.lr, rank=16, alpha=32, group_size=self.group,
                            prompts_per_step=self.tasks, max_new_tokens=48, temperature=self.temperature, seed=seed)

    def serial_seeds(self) -> dict[str, list[int]]:
        """Distinct seeds for the serial runs: cold 0..k-1, warm k..2k-1."""
        k = self.serial_runs
        return {"cold": list(range(k)), "warm": list(range(k, 2 * k))}


@dataclass
class Experiment:
    customer: str
    seed: int
    started: float  # perf_counter
    finished: float = 0.0
    rewards: list[float] = field(default_factory=list)  # sampled reward per step
    steps: list[dict] = field(default_factory=list)  # where each step's time went

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def step_times(report: StepReport) -> dict:
    return {"cycle_s": report.cycle_s, "rollout_s": report.gather_s, "training_s": report.backward_s,
            "publish_s": max(0.0, report.seconds - report.gather_s - report.backward_s),
            "engine_busy": report.engine_busy, "trainer_busy": report.trainer_busy}


async def run_experiments(trainer: Trainer, advance: Callable[[int], None], stop: asyncio.Event,
                          customers: list[str], seeds: list[int], steps: int, pipeline: bool = True) -> list[Experiment]:
    """`customers` (created, configured, fresh) run `steps` steps each, all at once (a job of the
    trainer process); `pipeline`: the next step's rollouts sampled while a step computes."""
    trainer.timeline = Timeline()
    started = time.perf_counter()
    runs = {c: Experiment(c, seed, started) for c, seed in zip(customers, seeds)}

    async def candidates() -> list[Candidate]:
        # Every step left samples rollouts: four or more tenants take turns (trainer.loop.halves),
        # fewer sample together in each of their steps.
        return [Candidate(c, 1.0, samples=True) for c, e in runs.items() if len(e.rewards) < steps]

    fruitless = 0
    async with aclosing(drive(trainer, Scheduler(len(customers)), candidates, stop, pipeline=pipeline,
                              idle_s=0.1)) as driven:
        async for reports in driven:
            fruitless = 0 if reports else fruitless + 1
            if fruitless == 3:  # a step with nothing to train on, or failing: it would never finish
                raise RuntimeError(f"three steps in a row trained none of {customers} (see the log)")
            for report in reports:
                run = runs[report.customer]
                run.rewards.append(report.mean_reward or 0.0)
                run.steps.append(step_times(report))
                run.finished = time.perf_counter()
                advance(1)
            if all(len(e.rewards) >= steps for e in runs.values()):
                break
    return list(runs.values())


LORA_RUNNING = re.compile(r'vllm:lora_requests_info\{[^}]*running_lora_adapters="([^"]*)"')


def shared_batches(metrics: str, customers: list[str]) -> int:
    """The most of `customers`' adapters vLLM ever ran in one batch (its running-LoRA metric keeps a
    series per set of adapters seen running together)."""
    most = 0
    for running in LORA_RUNNING.findall(metrics):
        tenants = {name.rsplit(".v", 1)[0] for name in running.split(",") if name}
        most = max(most, len(tenants & set(customers)))
    return most


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def per_step(experiments: list[Experiment]) -> list[tuple[float, float]]:
    """(mean, sd) of the sampled reward at each step, across experiments."""
    return [mean_sd([e.rewards[k] for e in experiments]) for k in range(min(len(e.rewards) for e in experiments))]


def reward_gap_sd(serial: list[tuple[float, float]], concurrent: list[tuple[float, float]]) -> float:
    """The largest (serial mean - concurrent mean) / serial sd over steps; a zero sd counts as
    1e-3 (a flat reward: any shortfall is large)."""
    return max((s - c) / max(sd, 1e-3) for (s, sd), (c, _) in zip(serial, concurrent))


def command() -> str:
    """The command line as run, with the settings (CLORA_ variables) it ran under: a re-run needs
    them. Only Settings' own: an in-process engine exports plumbing of its own (CLORA_ENGINE_LOG)."""
    names = {f"CLORA_{name.upper()}" for name in Settings.model_fields}
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k in names]
    return " ".join([*env, "clora", *sys.argv[1:]])


def row(n: int, runs: list[Experiment], cold: list[Experiment], cold_s: list[float], warm: list[Experiment],
        baseline_step_s: float | None, shared: int) -> dict:
    # Rounded first, so that the file's ratios are its own columns' (serial_s / concurrent_s).
    serial_s = round(statistics.fmean(cold_s) * n, 2)
    warm_serial_s = round(statistics.fmean(e.seconds for e in warm) * n, 2)
    concurrent_s = round(max(e.seconds for e in runs), 2)
    steps = [s for e in runs for s in e.steps]
    mean_step_s = statistics.fmean(s["cycle_s"] for s in steps)
    concurrent_curve, serial_curve = per_step(runs), per_step(cold + warm)
    return {
        "n": n, "serial_s": serial_s, "warm_serial_s": warm_serial_s, "concurrent_s": concurrent_s,
        "first_experiment_s": round(min(e.seconds for e in runs), 2),
        "mean_experiment_s": round(statistics.fmean(e.seconds for e in runs), 2),
        "throughput_ratio": round(serial_s / concurrent_s, 3), "warm_throughput_ratio": round(warm_serial_s / concurrent_s, 3),
        "mean_step_s": round(mean_step_s, 2),
        **{f"mean_{k}": round(statistics.fmean(s[k] for s in steps), 3)
           for k in ("rollout_s", "training_s", "publish_s", "engine_busy", "trainer_busy")},
        "step_time_ratio": round(mean_step_s / baseline_step_s, 3) if baseline_step_s else 1.0,
        "reward_first": round(statistics.fmean(e.rewards[0] for e in runs), 4),
        "reward_last": round(statistics.fmean(statistics.fmean(e.rewards[-3:]) for e in runs), 4),
        "reward_per_step": [[round(m, 4), round(sd, 4)] for m, sd in concurrent_curve],
        "serial_reward_per_step": [[round(m, 4), round(sd, 4)] for m, sd in serial_curve],
        "max_reward_gap_sd": round(reward_gap_sd(serial_curve, concurrent_curve), 3),
        "shared_batch_tenants": shared,
        "freshness_p50_s": None, "freshness_p99_s": None,  # filled by the freshness runs (where N is one)
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def train_until_stopped(trainer: Trainer, advance: Callable[[int], None], stop: asyncio.Event,
                              customers: list[str]) -> None:
    """`clora train`'s loop with its own candidates, for `customers` only (a job of the trainer process)."""
    async def candidates() -> list[Candidate]:
        return [c for c in await trainer.io.candidates() if c.customer in customers]

    async with aclosing(drive(trainer, Scheduler(len(customers)), candidates, stop, idle_s=0.2)) as driven:
        async for _ in driven:
            pass


async def freshness(runtime: BenchRuntime, trainer: TrainerProcess, customers: list[str], options: SweepOptions) -> dict:
    """Feedback from `customers` for `options.freshness_s`, trained by `clora train`'s loop: each
    event's seconds from its 202 to the replay buffer's first version that trained on it."""
    sent_all, rng = asyncio.Event(), random.Random(0)
    accepted: dict[tuple[str, str], float] = {}
    fresh: dict[tuple[str, str], float] = {}

    async def customer_feedback(http: httpx.AsyncClient, customer: str) -> None:
        key = {"Authorization": f"Bearer {runtime.keys[customer]}"}
        deadline = time.monotonic() + options.freshness_s
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.expovariate(1 / options.freshness_interval_s))
            if time.monotonic() >= deadline:
                return
            chat = await http.post("/v1/chat/completions", headers=key, json={
                "model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]})
            chat.raise_for_status()
            correction = {"trace_id": chat.headers["x-clora-trace-id"], "source": "operator",
                          "correction": {"role": "assistant", "content": "Hello! How can I help you today?"}}
            sent = await http.post("/v1/feedback", headers=key, json=correction)
            sent.raise_for_status()
            accepted[(customer, sent.json()["event_ids"][0])] = time.monotonic()

    async def watch() -> None:
        while not sent_all.is_set() or len(fresh) < len(accepted):
            for event in [e for e in accepted if e not in fresh]:
                if await runtime.replay.consumed_by(*event):
                    fresh[event] = time.monotonic() - accepted[event]
            await asyncio.sleep(0.25)

    training, watcher = asyncio.create_task(trainer.run(train_until_stopped, customers)), asyncio.create_task(watch())
    try:
        async with httpx.AsyncClient(base_url=runtime.stack.gateway_url, timeout=60) as http:
            await asyncio.gather(*[customer_feedback(http, c) for c in customers])
        sent_all.set()  # the last events train within `max_record_wait_s` and a step
        await asyncio.wait_for(watcher, timeout=600)
    finally:
        watcher.cancel()
        trainer.stop()
        await training
    seconds = list(fresh.values())
    if not seconds:
        raise RuntimeError(f"no feedback event was sent in {options.freshness_s} s: raise --freshness-s")
    return {"events": len(seconds), "p50_s": round(percentile(seconds, 0.5), 2),
            "p99_s": round(percentile(seconds, 0.99), 2), "max_s": round(max(seconds), 2)}


async def sweep(options: SweepOptions, progress: Callable[[int], None], status: Callable[[str], None]) -> dict:
    """Cold singles, then one warm runtime for the warm singles and every N concurrently."""
    steps, k, seeds = options.steps, options.serial_runs, options.serial_seeds()
    ran_as = command()  # before the runtime sets its own CLORA_ variables for its engine process
    capacity = {"max_loras": max(max(options.ns), 4), "max_cpu_loras": max(2 * max(options.ns), 16)}
    cold, cold_s, logs = [], [], []  # logs: each runtime's run directory (its engine's and trainer's logs)
    for i, seed in enumerate(seeds["cold"]):
        status(f"cold serial experiment {i + 1}/{k}: a fresh runtime")
        began = time.perf_counter()
        async with bench_runtime({f"cold-{seed}": options.tenant(seed)}, options.model, **capacity) as runtime, \
                trainer_process(runtime) as trainer:
            logs.append(str(runtime.stack.run_dir))
            cold += await trainer.run(run_experiments, [f"cold-{seed}"], [seed], steps, False, progress=progress)
        cold_s.append(time.perf_counter() - began)
    tenants = {f"warm-{seed}": options.tenant(seed) for seed in seeds["warm"]}
    tenants |= {f"n{n}-{i}": options.tenant(i) for n in options.ns for i in range(n)}
    tenants["warm-up"] = options.tenant(2 * k)
    tenants |= {f"fb{n}-{i}": TenantConfig(lr=options.lr, rank=16, alpha=32) for n in options.freshness_ns for i in range(n)}
    rows, curves = [], {}
    async with bench_runtime(tenants, options.model, **capacity) as runtime, trainer_process(runtime) as trainer:
        logs.append(str(runtime.stack.run_dir))
        status("warming up the runtime (one untimed step)")
        await trainer.run(run_experiments, ["warm-up"], [2 * k], 1)
        warm = []
        for i, seed in enumerate(seeds["warm"]):
            status(f"warm serial experiment {i + 1}/{k}")
            warm += await trainer.run(run_experiments, [f"warm-{seed}"], [seed], steps, False, progress=progress)
        for n in options.ns:
            status(f"{n} concurrent experiments")
            names = [f"n{n}-{i}" for i in range(n)]
            runs = await trainer.run(run_experiments, names, list(range(n)), steps, progress=progress)
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"{runtime.stack.gateway_url}/metrics", timeout=30)).text
            rows.append(row(n, runs, cold, cold_s, warm, rows[0]["mean_step_s"] if rows else None,
                            shared_batches(metrics, names)))
            curves[n] = [e.rewards for e in runs]
        fresh = {}
        for n in options.freshness_ns:
            status(f"freshness: {n} feedback-only customers, {options.freshness_s:.0f} s")
            fresh[n] = await freshness(runtime, trainer, [f"fb{n}-{i}" for i in range(n)], options)
        model = runtime.model.rsplit("/", 1)[-1]
        dtypes = {"engine": runtime.settings.dtype, "trainer": runtime.train_run().dtype}
    for r in rows:
        if r["n"] in fresh:
            r["freshness_p50_s"], r["freshness_p99_s"] = fresh[r["n"]]["p50_s"], fresh[r["n"]]["p99_s"]
    return {"benchmark": "experiment_throughput", "model": model, "environment": options.environment,
            "steps": steps, "group_size": options.group, "tasks": options.tasks, "serial_measured_runs": k,
            "serial_note": f"serial_s and warm_serial_s = N x the mean of {k} measured single experiments of each kind; "
                           f"serial rewards: all {2 * k} (distinct seeds)",
            "serial_seeds": seeds,
            "dtype": dtypes, "machine": machine(), "command": ran_as, "at": time.time(),
            "options": options.model_dump(), "logs": logs, "rows": rows,
            "serial_runs": {"cold_s": [round(s, 1) for s in cold_s], "warm_s": [round(e.seconds, 1) for e in warm],
                            "cold_rewards": [e.rewards for e in cold], "warm_rewards": [e.rewards for e in warm]},
            "concurrent_rewards": {str(n): c for n, c in curves.items()},
            "freshness": {str(n): f for n, f in fresh.items()},
            "experiments": {"cold": [asdict(e) for e in cold], "warm": [asdict(e) for e in warm]}}


COLUMNS = [("N", "n"), ("cold serial s", "serial_s"), ("warm serial s", "warm_serial_s"),
           ("concurrent s", "concurrent_s"), ("x cold", "throughput_ratio"), ("x warm", "warm_throughput_ratio"),
           ("step s", "mean_step_s"), ("rollout / train / publish s", None), ("step x N=1", "step_time_ratio"),
           ("engine / trainer busy", None), ("reward step 0 -> last 3", None), ("max gap (sd)", "max_reward_gap_sd")]


def markdown(result: dict) -> str:
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in result["rows"]:
        cells = []
        for title, key in COLUMNS:
            if key:
                cells.append(str(r[key]))
            elif title.startswith("rollout"):
                cells.append(f"{r['mean_rollout_s']:.1f} / {r['mean_training_s']:.1f} / {r['mean_publish_s']:.1f}")
            elif title.startswith("engine"):
                cells.append(f"{r['mean_engine_busy']:.0%} / {r['mean_trainer_busy']:.0%}")
            else:
                cells.append(f"{r['reward_first']:.3f} -> {r['reward_last']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ns = [r["n"] for r in rows]
    fig, (times, rewards) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("serial_s", "cold serial"), ("warm_serial_s", "warm serial"), ("concurrent_s", "concurrent")):
        times.plot(ns, [r[key] for r in rows], marker="o", label=label)
    times.set(title="Time to finish N experiments", xlabel="N experiments", ylabel="seconds", xticks=ns)
    serial = rows[0]["serial_reward_per_step"]
    rewards.plot(range(len(serial)), [m for m, _ in serial], color="black", lw=2, label="serial (measured)")
    for r in rows:
        rewards.plot(range(len(r["reward_per_step"])), [m for m, _ in r["reward_per_step"]], marker=".",
                     label=f"concurrent N={r['n']}")
    rewards.set(title="Sampled reward per step (mean over experiments)", xlabel="step", ylabel="reward")
    for ax in (times, rewards):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}, {result['environment']}, {result['steps']} steps, group {result['group_size']}: "
                 f"{result['machine'][:70]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path) -> tuple[Path, Path, Path]:
    """JSON (the claim), the markdown table and the PNG, side by side."""
    out.parent.mkdir(parents=True, exist_ok=True)
    table, png = out.with_suffix(".md"), out.with_suffix(".png")
    out.write_text(json.dumps(result, indent=2) + "\n")
    table.write_text(markdown(result) + "\n")
    plot(result, png)
    return out, table, png
