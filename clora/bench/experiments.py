"""`clora bench experiments`: the C-LoRA report's experiment at our scale, at the product's defaults.

An *experiment* is one tenant's RL run of `steps` steps from a fresh adapter on the tool-use
environment (`arithmetic:0`: see clora/agents/arithmetic.py). Its shape is fixed and recorded
(2 problems per step, group 8, 10 steps, 48 new tokens); every learning hyper-parameter is the
trainer config's default (`TenantConfig`), and the trainer computes with `clora serve`'s torch
threads. Three ways to run N of them:

- **concurrent**: N experiments at once on one warm runtime, driven by `clora train`'s own loop
  (`trainer.loop.drive`, pipelined) in a trainer process of its own, as `clora serve` runs it
  (`harness.TrainerProcess`): every tenant's rollouts share the engine's decode batches and their
  groups share the trainer's passes;
- **cold serial**: one after another, each in a fresh runtime, each step sampling then training
  (synchronous, on-policy), as a single-tenant framework runs them (the report's baseline). Its
  time is start (engine, trainer process and model load) + run; the stop (teardown) is reported
  apart (`stop_s`), since the next experiment's start need not wait for it;
- **warm serial**: the same, one after another on the already-warm runtime.

So the ratios count what multiplexing *and* the rollout/train pipeline win. The serial
baselines are N x the mean of `serial_runs` measured singles of each kind (`serial_measured_runs`);
every concurrent run is measured (seeds 0..N-1). A seed fixes an experiment's problems and
initial adapter; the serial runs take distinct seeds (cold 0..k-1, warm k..2k-1), so with the
default k = 4 concurrent experiment i and serial experiment i share a seed: the pairs the verdict
(`verdict.py`, written down before the sweep) compares. Each row also counts the backward passes
each arm ran (groups that took a gradient pass: a group whose episodes all scored alike takes
none), so an arm that learns faster, and so skips more passes, is seen doing less work. Rewards
are each step's sampled reward: step k's rollouts come from the version after k-1 updates
(`reward_first` is the base model's); at N >= 4 the concurrent tenants take turns in halves
(`trainer.loop.halves`), at N = 1 and 2 each step samples every tenant's rollouts together.

**Freshness** (`freshness.py`, on the warm runtime, last): feedback-only customers alone, and as
many customers again while as many RL experiments train in the same loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from contextlib import aclosing
from dataclasses import asdict
from typing import Callable

import httpx
from pydantic import BaseModel, Field

from clora.bench import verdict as rule
from clora.bench.freshness import measure, train_until_stopped
from clora.bench.harness import BenchRuntime, TrainerProcess, bench_runtime, trainer_process
from clora.bench.rows import ColdRun, Experiment, row, shared_batches, step_times
from clora.core.provenance import command, provenance
from clora.trainer.loop import Trainer, drive
from clora.trainer.scheduler import Candidate, Scheduler
from clora.trainer.timeline import Timeline
from clora.wire.trainer_config import TenantConfig


class SweepOptions(BaseModel):
    ns: list[int] = Field(default=[1, 2, 4, 8], description="Concurrent experiments per run.")
    steps: int = Field(default=10, ge=1)
    tasks: int = Field(default=2, ge=1, description="Problems per experiment per step.")
    group: int = Field(default=8, ge=2, description="Episodes per problem (the GRPO group).")
    environment: str = "arithmetic:0"
    serial_runs: int = Field(default=4, ge=1, description="Measured single experiments of each serial kind "
                                                          "(cold seeds 0..k-1, warm k..2k-1).")
    model: str | None = Field(default=None, description="None: CLORA_MODEL or the default; `tiny`: a random Llama.")
    freshness_ns: list[int] = Field(default=[1], description="Feedback-only customers per freshness run alone.")
    freshness_load: int = Field(default=8, ge=0, description="Feedback-only customers in the run under load, "
                                                             "beside as many RL experiments (0: no such run).")
    freshness_s: float = Field(default=180.0, gt=0, description="Seconds of feedback per freshness run alone.")
    freshness_interval_s: float = Field(default=10.0, gt=0, description="Mean seconds between a customer's events.")

    def tenant(self, seed: int) -> TenantConfig:
        """The experiment's shape; everything else the trainer config's defaults."""
        return TenantConfig(environment=self.environment, group_size=self.group, prompts_per_step=self.tasks,
                            max_new_tokens=48, seed=seed)

    def serial_seeds(self) -> dict[str, list[int]]:
        """Distinct seeds for the serial runs: cold 0..k-1, warm k..2k-1."""
        k = self.serial_runs
        return {"cold": list(range(k)), "warm": list(range(k, 2 * k))}


async def run_experiments(trainer: Trainer, advance: Callable[[int], None], stop: asyncio.Event,
                          customers: list[str], seeds: list[int], steps: int, pipeline: bool = True,
                          feedback: tuple[str, ...] = (), max_tenants: int = 0, idle_s: float = 0.1) -> list[Experiment]:
    """`customers` (created, configured, fresh) run `steps` steps each, all at once (a job of the
    trainer process); `pipeline`: the next step's rollouts sampled while a step computes.
    `feedback`: customers trained beside them by `clora train`'s own candidates (their new
    records), until `stop`; `max_tenants` (0: all the experiments) and `idle_s` as `clora train`'s."""
    trainer.timeline = Timeline()
    started = time.perf_counter()
    runs = {c: Experiment(c, seed, started) for c, seed in zip(customers, seeds)}

    async def candidates() -> list[Candidate]:
        # Every step left samples rollouts: four or more tenants take turns (trainer.loop.halves),
        # fewer sample together in each of their steps.
        left = [Candidate(c, 1.0, samples=True) for c, e in runs.items() if len(e.rewards) < steps]
        return left + ([c for c in await trainer.io.candidates() if c.customer in feedback] if feedback else [])

    fruitless = 0
    scheduler = Scheduler(max_tenants or len(customers))
    async with aclosing(drive(trainer, scheduler, candidates, stop, pipeline=pipeline, idle_s=idle_s)) as driven:
        async for reports in driven:
            mine = [r for r in reports if r.customer in runs]
            fruitless = 0 if mine or feedback else fruitless + 1
            if fruitless == 3:  # a step with nothing to train on, or failing: it would never finish
                raise RuntimeError(f"three steps in a row trained none of {customers} (see the log)")
            for report in mine:
                run = runs[report.customer]
                run.rewards.append(report.mean_reward or 0.0)
                run.backward_passes += report.result.taught_groups
                run.steps.append(step_times(report))
                run.finished = time.perf_counter()
                advance(1)
            if not feedback and all(len(e.rewards) >= steps for e in runs.values()):
                break
    return list(runs.values())


async def cold_experiment(options: SweepOptions, seed: int, progress: Callable[[int], None], capacity: dict,
                          logs: list[str]) -> ColdRun:
    """One experiment in a fresh runtime: start (up to a loaded trainer), run, stop, each timed."""
    began = time.perf_counter()
    async with bench_runtime({f"cold-{seed}": options.tenant(seed)}, options.model, **capacity) as runtime, \
            trainer_process(runtime) as trainer:
        logs.append(str(runtime.stack.run_dir))
        await trainer.ready()
        up = time.perf_counter()
        [experiment] = await trainer.run(run_experiments, [f"cold-{seed}"], [seed], options.steps, False,
                                         progress=progress)
        ran = time.perf_counter()
    return ColdRun(experiment, up - began, ran - up, time.perf_counter() - ran)


async def freshness_runs(runtime: BenchRuntime, trainer: TrainerProcess, options: SweepOptions,
                         status: Callable[[str], None]) -> dict[str, dict]:
    """Feedback-only customers alone, then (`freshness_load`) beside as many RL experiments."""
    settings, fresh = runtime.settings, {}
    for n in options.freshness_ns:
        status(f"freshness: {n} feedback-only customers alone, {options.freshness_s:.0f} s")
        customers = [f"fb{n}-{i}" for i in range(n)]
        fresh[str(n)], _ = await measure(
            runtime, trainer, customers, interval_s=options.freshness_interval_s, seconds=options.freshness_s,
            training=lambda p, c=customers: trainer.run(train_until_stopped, c, settings.trainer.max_tenants,
                                                        settings.trainer.idle_s, progress=p))
        fresh[str(n)]["rl_experiments"] = 0
    if n := options.freshness_load:
        status(f"freshness: {n} feedback-only customers while {n} RL experiments train")
        customers, load = [f"fbl{n}-{i}" for i in range(n)], [f"load{n}-{i}" for i in range(n)]
        result, runs = await measure(
            runtime, trainer, customers, interval_s=options.freshness_interval_s, seconds=options.freshness_s,
            load_steps=n * options.steps,
            training=lambda p: trainer.run(run_experiments, load, list(range(100, 100 + n)), options.steps, True,
                                           tuple(customers), settings.trainer.max_tenants, settings.trainer.idle_s,
                                           progress=p))
        fresh[str(n)] = result | {"rl_experiments": n, "rl_steps": sum(len(e.rewards) for e in runs)}
    return fresh


def load_tenants(options: SweepOptions) -> dict[str, TenantConfig]:
    """Every customer of the warm runtime: warm singles, concurrent runs, warm-up, freshness."""
    k, n = options.serial_runs, options.freshness_load
    tenants = {f"warm-{seed}": options.tenant(seed) for seed in options.serial_seeds()["warm"]}
    tenants |= {f"n{m}-{i}": options.tenant(i) for m in options.ns for i in range(m)}
    tenants["warm-up"] = options.tenant(2 * k)
    tenants |= {f"fb{m}-{i}": TenantConfig() for m in options.freshness_ns for i in range(m)}
    tenants |= {f"fbl{n}-{i}": TenantConfig() for i in range(n)}
    return tenants | {f"load{n}-{i}": options.tenant(100 + i) for i in range(n)}


async def sweep(options: SweepOptions, progress: Callable[[int], None], status: Callable[[str], None],
                checkpoint: Callable[[dict], None] = lambda result: None) -> dict:
    """Cold singles, then one warm runtime for the warm singles, every N concurrently, freshness.
    `checkpoint` gets the result without freshness before that phase starts (written at once: two
    sweeps died in it and lost everything)."""
    steps, k, seeds = options.steps, options.serial_runs, options.serial_seeds()
    started_at, command_line = dt.datetime.now(dt.timezone.utc), command("clora")  # before any engine starts
    capacity = {"max_loras": max(max(options.ns), 4), "max_cpu_loras": max(2 * max(options.ns), 16)}
    cold, logs = [], []  # logs: each runtime's run directory (its engine's and trainer's logs)
    for i, seed in enumerate(seeds["cold"]):
        status(f"cold serial experiment {i + 1}/{k}: a fresh runtime")
        cold.append(await cold_experiment(options, seed, progress, capacity, logs))
    rows, curves = [], {}
    async with bench_runtime(load_tenants(options), options.model, **capacity) as runtime, \
            trainer_process(runtime) as trainer:
        logs.append(str(runtime.stack.run_dir))
        ran_as = provenance("clora", runtime.settings, options.tenant(0), ignore=("seed",), started_at=started_at,
                            command_line=command_line)
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
            rows.append(row(n, runs, cold, warm, rows[0]["mean_step_s"] if rows else None,
                            shared_batches(metrics, names)))
            curves[n] = [e.rewards for e in runs]
        model = runtime.model.rsplit("/", 1)[-1]
        dtypes = {"engine": runtime.settings.serving.dtype, "trainer": runtime.train_run().dtype}

        def result(fresh: dict) -> dict:
            return {
                "benchmark": "experiment_throughput", **ran_as, "model": model, "environment": options.environment,
                "steps": steps, "group_size": options.group, "tasks": options.tasks, "max_new_tokens": 48,
                "serial_measured_runs": k, "pairs": rule.PAIRS, "margin": rule.MARGIN,
                "serial_note": f"serial_s = N x the mean of {k} cold singles' start + run (stop_s apart); "
                               f"warm_serial_s = N x the mean of {k} warm singles; serial rewards: all {2 * k} "
                               "(distinct seeds)",
                "serial_seeds": seeds, "dtype": dtypes, "options": options.model_dump(), "logs": logs, "rows": rows,
                "serial_runs": {"cold_s": [round(c.seconds, 1) for c in cold],
                                "warm_s": [round(e.seconds, 1) for e in warm],
                                "cold_start_s": [round(c.start_s, 1) for c in cold],
                                "cold_stop_s": [round(c.stop_s, 1) for c in cold],
                                "cold_rewards": [c.experiment.rewards for c in cold],
                                "warm_rewards": [e.rewards for e in warm]},
                "concurrent_rewards": {str(n): c for n, c in curves.items()},
                "freshness": fresh,
                "experiments": {"cold": [asdict(c.experiment) for c in cold], "warm": [asdict(e) for e in warm]}}

        checkpoint(result({}))
        fresh = await freshness_runs(runtime, trainer, options, status)
    for r in rows:
        if str(r["n"]) in fresh:
            r["freshness_p50_s"], r["freshness_p99_s"] = fresh[str(r["n"])]["p50_s"], fresh[str(r["n"])]["p99_s"]
    return result(fresh)
