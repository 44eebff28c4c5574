"""The demo's report: per-customer eval before/after, rule leakage, gate decisions, curves; JSON + PNG."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from pydantic import BaseModel, Field

from clora.evals.gate import Decision


class CustomerReport(BaseModel):
    customer: str
    rule: str
    eval_before: float = Field(description="Report-set score of the base model (0..1): rule followed and "
                                           "question answered.")
    eval_after: float = Field(description="Report-set score of the version served at the end.")
    eval_before_ci: tuple[float, float] = Field(description="90% interval of eval_before.")
    eval_after_ci: tuple[float, float] = Field(description="90% interval of eval_after.")
    content_before: float | None = Field(description="Share of the base model's report-set answers that still "
                                                     "answer the question (name its subject).")
    content_after: float | None = Field(description="The same for the version served at the end.")
    gate_before: float = Field(description="Gate-set score of the base model (what the gate and the stopping "
                                           "rule saw; not a reported measure).")
    gate_after: float
    feedback_kinds: list[str] = Field(description="Kinds of feedback the operator sent: rating, reward, correction.")
    records_by_path: dict[str, int] = Field(description="Training records used by each loss path (importance, "
                                                        "ratio_free: rated answers; correction: SFT).")
    foreign_rule_rate: float = Field(description="Share of its report-set answers (at the end) that follow "
                                                 "another customer's rule.")
    foreign_rule_rate_before: float = Field(description="The same for the base model (some rules, like "
                                                        "one-sentence, the base model follows by itself).")
    served_version: str | None
    versions_published: int
    promoted: int
    held_back: int
    requests: int
    feedback_events: int
    live: list[tuple[float, float]] = Field(default_factory=list,
                                            description="(minute, share of live answers that are good: rule followed, "
                                                        "question answered)")
    evals: list[tuple[float, float]] = Field(default_factory=list, description="(minute, served version's score)")


class DemoReport(BaseModel):
    minutes: float
    machine: str
    command: str
    model: str
    target_gain: float
    ratings_only_gain: float
    report_set_size: int = Field(description="Report-set prompts per customer (disjoint from gate and training).")
    gate_set_size: int
    passed: bool = Field(description="Every customer gained at least its target on the report set (target_gain; "
                                     "ratings_only_gain for a customer taught by ratings or rewards alone), kept at "
                                     "least 0.8 of the base model's content, and follows other customers' rules no "
                                     "more often than the base model did.")
    customers: list[CustomerReport]
    decisions: list[Decision]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:  # bfloat16 speed on CPU depends on AMX: say whether the machine has it
        if "amx_bf16" in Path("/proc/cpuinfo").read_text():
            cpu += " (AMX)"
    except OSError:
        pass
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - the description must not fail the report
        gpu = "GPU unknown"
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} vCPU {cpu}, {memory_gib:.0f} GiB RAM, {gpu}, {platform.system()} {platform.release()}"


def plot(report: DemoReport, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (live, evals) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for c in report.customers:
        line, = live.plot(*zip(*c.live), marker=".", label=f"{c.customer} ({c.rule})") if c.live else (None,)
        if c.evals:
            evals.step(*zip(*c.evals), where="post", marker="o", label=c.customer,
                       color=line.get_color() if line else None)
    live.set(title="Reward: good live answers (rule followed, question answered)", xlabel="minutes", ylabel="share")
    evals.set(title="Held-out eval score of the served adapter", xlabel="minutes")
    for ax in (live, evals):
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    live.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"clora demo: {len(report.customers)} customers, {report.minutes:.1f} min on {report.machine[:60]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: DemoReport, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "demo.json", out_dir / "demo.png"
    json_path.write_text(report.model_dump_json(indent=2) + "\n")
    plot(report, png_path)
    return json_path, png_path
