"""What one tenant's step did: its report, its metrics, and its log line."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from clora.trainer.results import TenantResult

log = logging.getLogger("clora.trainer")
STEPS = Counter("clora_trainer_steps_total", "Tenant steps by outcome", ["customer", "outcome"])
RECORDS = Counter("clora_trainer_records_total", "Production records trained on, by loss path (importance, "
                  "ratio_free: rated answers; correction: SFT)", ["customer", "path"])
GAP = Gauge("clora_trainer_logprob_gap_nats", "|trainer - vLLM| logprob on tokens the trained weights sampled, "
            "last step", ["customer", "stat"])
QUARANTINED = Counter("clora_trainer_quarantined_records_total", "Records moved to the replay buffer's quarantine: "
                      "their logprob gap was over the tenant's bound", ["customer"])
HALTED = Gauge("clora_trainer_halted", "1 while the tenant's training is halted (skipped steps in a row)",
               ["customer"])


@dataclass
class StepReport:
    customer: str
    step: int
    version: str | None  # None: skipped
    mean_reward: float | None  # on-policy samples of this step (before the update)
    rated: int
    corrections: int
    result: TenantResult  # losses, records per loss path, logprob gap
    seconds: float
    skipped: str | None = None  # why the step was not applied
    quarantined: int = 0  # records of a skipped step moved to the buffer's quarantine
    # Where the step's time went (the same for every tenant of a step): sampling and reading data
    # (the engine's part), the backward (the trainer's), then optimizer, checkpoint and publish.
    gather_s: float = 0.0
    backward_s: float = 0.0
    # Since the previous step ended: wall seconds, and the share of them the engine spent sampling
    # rollouts for the trainer and the trainer computing (both near 1: the pipeline keeps both busy).
    cycle_s: float = 0.0
    engine_busy: float = 0.0
    trainer_busy: float = 0.0


def observe(report: StepReport) -> None:
    """The step's outcome, records per loss path and logprob gap, as metrics."""
    STEPS.labels(report.customer, "skipped" if report.skipped else "published").inc()
    if report.quarantined:
        QUARANTINED.labels(report.customer).inc(report.quarantined)
    for path, count in report.result.paths.items():
        RECORDS.labels(report.customer, path).inc(count)
    gap = report.result.gap
    if gap.mean is not None:
        GAP.labels(report.customer, "mean").set(gap.mean)
        GAP.labels(report.customer, "max").set(gap.max)


def log_step(report: StepReport) -> None:
    """A published step in one line: what it learnt from and where its time went."""
    reward = f"{report.mean_reward:.3f}" if report.mean_reward is not None else "-"
    gap = report.result.gap
    lagged = f", {report.result.lagged_groups} groups off-policy by one version" if report.result.lagged_groups else ""
    log.info("customer %s: step %d -> %s (reward %s, %d rated %s, %d corrections, logprob gap %s%s, %.1f s: "
             "data %.1f, backward %.1f; engine busy %.0f%%, trainer busy %.0f%% of %.1f s)", report.customer,
             report.step, report.version, reward, report.rated, report.result.paths or "", report.corrections,
             f"{gap.mean:.4f}/{gap.max:.4f}" if gap.mean is not None else "-", lagged, report.seconds,
             report.gather_s, report.backward_s, 100 * report.engine_busy, 100 * report.trainer_busy,
             report.cycle_s)
