"""The demo's report: per-customer eval before/after, rule leakage, gate decisions, curves; JSON + PNG,
and the tables printed at the end (legible in an 80-column terminal or log: no number is cut)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field
from rich import box
from rich.console import Console
from rich.table import Table

from clora.core.provenance import machine  # noqa: F401 - re-exported: scripts once imported it from here
from clora.evals.gate import Decision
from clora.evals.scoring import EvalScore


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
    # Provenance (clora.core.provenance): what a re-run needs to compare with this one.
    git_revision: str | None
    git_dirty: bool | None = Field(description="Tracked files differed from git_revision.")
    machine: str
    started_at: str
    command: str
    settings_changed: dict[str, Any] = Field(
        description="Every CLORA_ setting the demo's runtime ran with, and every field of the trainer config all "
                    "customers got, that is not the product's default (docs/operations.md's demo section says why).")
    minutes: float
    rounds: int
    requests_per_round: int
    training_wait_s: float = Field(description="After a round's feedback, the demo waits up to this long for every "
                                               "customer's next trained version, then runs the promotion gate "
                                               "(the product trains and gates on its own clocks).")
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


def compact_table(*headers: str, text: int = 1, title: str | None = None) -> Table:
    """A table that fits 80 columns: no borders, a rule under the header, two spaces between columns.
    The first `text` columns (names, rules) fold into the width the others leave; the others never
    wrap, so no number is cut (rich would otherwise shrink every column and end numbers with "…")."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for i, header in enumerate(headers):
        table.add_column(header, no_wrap=i >= text, overflow="fold")
    return table


def with_ci(value: float, ci: tuple[float, float]) -> str:
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def before_after(before: float | None, after: float | None) -> str:
    return f"{before:.2f}->{after:.2f}" if before is not None and after is not None else "-"


def short_version(version: str | None) -> str:
    """`acme.v3` as `v3` (the row names the customer); None: the base model."""
    return "v" + version.rsplit(".v", 1)[1] if version and ".v" in version else version or "base"


def scores_table(report: DemoReport) -> Table:
    table = compact_table("customer", "before [90%]", "after [90%]", "gain", "content\nkept", "foreign\nrule",
                          title=f"clora demo: {report.minutes:.1f} minutes, {report.rounds} rounds; report set of "
                                f"{report.report_set_size} questions per customer: score [90% interval], and "
                                f"base model->served version")
    for c in report.customers:
        table.add_row(c.customer, with_ci(c.eval_before, c.eval_before_ci), with_ci(c.eval_after, c.eval_after_ci),
                      f"{c.eval_after - c.eval_before:+.2f}", before_after(c.content_before, c.content_after),
                      before_after(c.foreign_rule_rate_before, c.foreign_rule_rate))
    return table


def learning_table(report: DemoReport) -> Table:
    table = compact_table("customer", "rule", "feedback", "records per\nloss path", "served", "promoted", "held\nback",
                          text=3, title="how each customer learnt")
    for c in report.customers:
        records = "\n".join(f"{path} {n}" for path, n in sorted(c.records_by_path.items())) or "-"
        rule = c.rule.replace(":", ": ", 1)  # `greeting: Ahoy from Acme!` wraps at its words
        table.add_row(c.customer, rule, ", ".join(c.feedback_kinds), records, short_version(c.served_version),
                      str(c.promoted), str(c.held_back))
    return table


def print_report(report: DemoReport, console: Console, paths: tuple[Path, Path]) -> None:
    console.print(scores_table(report))
    console.print(learning_table(report))
    verdict = "[bold green]passed[/]" if report.passed else "[bold red]not passed[/]"
    console.print(f"{verdict}: every customer +{report.target_gain} on its report set (+{report.ratings_only_gain} "
                  f"taught by ratings or rewards alone), content kept (at least 0.8 of the base model's), no rule "
                  f"adopted from another customer.")
    console.print(f"Report: {paths[0]}\nPlot: {paths[1]}", markup=False, highlight=False)  # paths, verbatim


def interval_of(score: EvalScore) -> tuple[float, float]:
    """A score's 90% interval (scores cached before intervals were kept: none, so the whole range)."""
    return (score.low, score.high) if score.low is not None and score.high is not None else (0.0, 1.0)


def trainer_records(port: int) -> dict[str, dict[str, int]]:
    """Per customer, the records the trainer used by loss path, from its metrics endpoint."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "clora_trainer_records_total":
                out.setdefault(sample.labels["customer"], {})[sample.labels["path"]] = int(sample.value)
    return out
