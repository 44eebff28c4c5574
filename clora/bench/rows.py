"""A sweep's numbers: each experiment's record, and one row per N (wall times, the throughput
ratios, where each step's time went, reward curves, the paired comparison and its verdict)."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

import numpy as np

from clora.bench import verdict as rule
from clora.trainer.report import StepReport


@dataclass
class Experiment:
    customer: str
    seed: int
    started: float  # perf_counter
    finished: float = 0.0
    rewards: list[float] = field(default_factory=list)  # sampled reward per step
    backward_passes: int = 0  # groups that took a gradient pass
    steps: list[dict] = field(default_factory=list)  # where each step's time went

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def step_times(report: StepReport) -> dict:
    return {"cycle_s": report.cycle_s, "rollout_s": report.gather_s, "training_s": report.backward_s,
            "publish_s": max(0.0, report.seconds - report.gather_s - report.backward_s),
            "engine_busy": report.engine_busy, "trainer_busy": report.trainer_busy}


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
    """Descriptive only (the verdict is `verdict.py`'s): the largest (serial mean - concurrent
    mean) / serial sd over steps; a zero sd counts as 1e-3."""
    return max((s - c) / max(sd, 1e-3) for (s, sd), (c, _) in zip(serial, concurrent))


@dataclass
class ColdRun:
    """A cold serial experiment's wall time, cut where the runtime was up and where it ended."""

    experiment: Experiment
    start_s: float  # engine, services, trainer process and model load
    run_s: float
    stop_s: float  # teardown: not part of the experiment's time

    @property
    def seconds(self) -> float:
        return self.start_s + self.run_s


def paired(n: int, runs: list[Experiment], serial: list[Experiment]) -> dict:
    """Concurrent experiment i against serial experiment i (the same seed): the paired
    differences of both summaries at every N, and at N = `rule.PAIRS` the verdict."""
    by_seed = {e.seed: e for e in serial}
    pairs = [(by_seed[e.seed], e) for e in runs if e.seed in by_seed]
    if len(pairs) < n:
        return {"paired_experiments": len(pairs)}
    s, c = np.array([p[0].rewards for p in pairs]), np.array([p[1].rewards for p in pairs])
    differences = {name: round(float((c_ - s_).mean()), 4)
                   for (name, s_), c_ in zip(rule.summaries(s).items(), rule.summaries(c).values())}
    out: dict = {"paired_experiments": n, "mean_paired_differences": differences}
    if n == rule.PAIRS:
        out |= rule.verdict(s, c).as_dict() | {"false_fail_rate": round(rule.false_fail_rate(s, c), 4)}
    return out


def row(n: int, runs: list[Experiment], cold: list[ColdRun], warm: list[Experiment],
        baseline_step_s: float | None, shared: int) -> dict:
    # Rounded first, so that the file's ratios are its own columns' (serial_s / concurrent_s).
    serial_s = round(statistics.fmean(c.seconds for c in cold) * n, 2)
    warm_serial_s = round(statistics.fmean(e.seconds for e in warm) * n, 2)
    concurrent_s = round(max(e.seconds for e in runs), 2)
    steps = [s for e in runs for s in e.steps]
    mean_step_s = statistics.fmean(s["cycle_s"] for s in steps)
    singles = [c.experiment for c in cold] + warm
    concurrent_curve, serial_curve = per_step(runs), per_step(singles)
    return {
        "n": n, "serial_s": serial_s, "warm_serial_s": warm_serial_s, "concurrent_s": concurrent_s,
        "start_s": round(statistics.fmean(c.start_s for c in cold), 2),
        "stop_s": round(statistics.fmean(c.stop_s for c in cold), 2),
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
        "backward_passes": {"concurrent": sum(e.backward_passes for e in runs),
                            "serial": round(statistics.fmean(e.backward_passes for e in singles) * n, 1)},
        "noninferior": None, "noninferiority_lower_bounds": None, "per_step_z": None, "false_fail_rate": None,
        **paired(n, runs, singles),
        "max_reward_gap_sd": round(reward_gap_sd(serial_curve, concurrent_curve), 3),
        "shared_batch_tenants": shared,
        "freshness_p50_s": None, "freshness_p99_s": None,  # filled by the freshness runs (where N is one)
    }
