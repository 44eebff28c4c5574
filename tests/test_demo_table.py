"""The demo's tables in an 80-column log: `clora demo | tee log` (or a terminal 80 columns wide)
shows every number whole. No server: a report (and a live view) built by hand, rendered as the
CLI renders them, by a console that writes to a pipe."""

from __future__ import annotations

import io
import os
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console
from rich.live import Live

from clora.agents.preference import PreferenceEnv
from clora.core.settings import Settings
from clora.demo.options import DemoOptions
from clora.demo.report import CustomerReport, DemoReport
from clora.demo.run import Demo, Tenant, print_report
from clora.evals.gate import Decision
from clora.evals.suites import EvalSuite

NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")

# Long names, two-digit versions, scores with more decimals than shown, a negative gain.
CUSTOMERS = [
    ("acme", "greeting:Ahoy from Acme!", 0.0, (0.0, 0.040559), 1.0, (0.959441, 1.0), 0.984375, 1.0, 0.203125, 0.0,
     {"correction": 24, "importance": 8}, "acme.v3", 3, 1),
    ("globex-international-holdings", "sign-off:-- The Globex Team", 0.015625, (0.0021, 0.0633), 0.96875,
     (0.9124, 0.9911), 0.96875, 0.953125, 0.21875, 0.015625, {"correction": 130, "importance": 27},
     "globex-international-holdings.v12", 11, 3),
    ("initech", "bullets", 0.0625, (0.0271, 0.1362), 0.71875, (0.6234, 0.8012), 0.90625, 0.84375, 0.171875, 0.046875,
     {"correction": 25, "ratio_free": 7}, "initech.v4", 4, 0),
    ("umbrella-corporation-research", "json", 0.03125, (0.0087, 0.0912), 0.984375, (0.9311, 0.9972), 0.9375, 0.96875,
     0.1875, 0.0, {"correction": 21, "importance": 11}, None, 0, 5),
    ("hooli", "one-sentence", 0.203125, (0.1311, 0.3009), 0.15625, (0.0922, 0.2401), 1.0, 0.890625, 0.0, 0.0,
     {"importance": 32}, "hooli.v7", 2, 4),
]


def report() -> DemoReport:
    customers = [CustomerReport(
        customer=name, rule=rule, eval_before=before, eval_before_ci=before_ci, eval_after=after,
        eval_after_ci=after_ci, content_before=content_before, content_after=content_after, gate_before=before,
        gate_after=after, feedback_kinds=["reward"] if name == "hooli" else ["correction", "rating"],
        records_by_path=paths, foreign_rule_rate_before=foreign_before, foreign_rule_rate=foreign,
        served_version=served, versions_published=promoted + held, promoted=promoted, held_back=held, requests=56,
        feedback_events=56) for (name, rule, before, before_ci, after, after_ci, content_before, content_after,
                                  foreign_before, foreign, paths, served, promoted, held) in CUSTOMERS]
    return DemoReport(git_revision="42c6264" * 5 + "abcde", git_dirty=True, machine="2 vCPU AMD EPYC, 24 GiB RAM",
                      started_at="2026-11-30T12:00:00+00:00", command="clora demo",
                      settings_changed={"CLORA_TRAINER_MAX_INFLIGHT": 0, "lr": 0.002, "gated": True},
                      minutes=13.24, rounds=7, requests_per_round=8, training_wait_s=240.0, model="SmolLM2",
                      target_gain=0.4, ratings_only_gain=0.3, report_set_size=64, gate_set_size=16, passed=False,
                      customers=customers, decisions=[])


def render(renderable_or_report) -> str:
    """As the CLI renders it with stdout a pipe (a log): 80 columns, no terminal."""
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=False, color_system=None)
    if isinstance(renderable_or_report, DemoReport):
        print_report(renderable_or_report, console, (Path("/tmp/out/demo.json"), Path("/tmp/out/demo.png")))
    else:
        console.print(renderable_or_report)
    return out.getvalue()


def assert_legible(text: str, expected: list[str]) -> None:
    lines = text.splitlines()
    assert "…" not in text, text
    assert max(len(line) for line in lines) <= 80, text
    missing = Counter(expected) - Counter(NUMBER.findall(text))  # a cut number is missing whole
    assert not missing, f"numbers cut or missing: {dict(missing)}\n{text}"


def test_the_final_table_shows_every_number_whole_at_80_columns():
    r = report()
    text = render(r)
    expected = [f"{r.minutes:.1f}", str(r.report_set_size), f"+{r.target_gain}", f"+{r.ratings_only_gain}"]
    for c in r.customers:
        expected += [f"{c.eval_before:.2f}", *(f"{x:.2f}" for x in c.eval_before_ci), f"{c.eval_after:.2f}",
                     *(f"{x:.2f}" for x in c.eval_after_ci), f"{c.eval_after - c.eval_before:+.2f}",
                     f"{c.content_before:.2f}", f"{c.content_after:.2f}", f"{c.foreign_rule_rate_before:.2f}",
                     f"{c.foreign_rule_rate:.2f}", str(c.promoted), str(c.held_back),
                     *(str(n) for n in c.records_by_path.values())]
        if c.served_version:
            expected.append(c.served_version.rsplit(".v", 1)[1])
    assert_legible(text, expected)
    for c in r.customers:  # a score and its interval read together, on one line
        for score, (low, high) in ((c.eval_before, c.eval_before_ci), (c.eval_after, c.eval_after_ci)):
            assert any(f"{score:.2f} [{low:.2f}, {high:.2f}]" in line for line in text.splitlines()), text
    assert "Report: /tmp/out/demo.json" in text and "Plot: /tmp/out/demo.png" in text


def test_the_live_table_shows_every_number_whole_at_80_columns(tmp_path):
    demo = Demo(Settings(home=tmp_path), DemoOptions(), Console(file=io.StringIO()))
    expected = []
    for i, (name, spec) in enumerate([("acme", "greeting:Ahoy from Acme!"), ("globex-international-holdings",
                                      "sign-off:-- The Globex Team"), ("initech", "bullets"),
                                     ("umbrella-corporation-research", "json"), ("hooli", "one-sentence")]):
        suite = EvalSuite(environment=f"preference:{spec}")
        tenant = Tenant(SimpleNamespace(rule=PreferenceEnv(spec).rule), suite, suite,  # type: ignore[arg-type]
                        before=SimpleNamespace(score=0.015625 * i), served=f"{name}.v{10 + i}",
                        score=0.953125 - 0.1 * i,
                        published=11 + i, requests=1016 + i, feedback=1016 + i, live=[(12.5, 0.875 - 0.125 * i)],
                        decisions=[Decision(customer=name, action="held-back", current=f"{name}.v{10 + i}",
                                            candidate=f"{name}.v{11 + i}", reason="lower")])
        demo.tenants[name] = tenant
        expected += [str(tenant.requests), f"{tenant.live[-1][1]:.2f}", str(tenant.published), str(10 + i),
                     f"{tenant.before.score:.2f}", f"{tenant.score:.2f}", str(11 + i)]
    demo.round, demo.phase = 12, "promotion gate: scoring candidates"
    assert_legible(render(demo.view()), expected + ["12"])


def test_the_live_view_in_a_log_ends_its_line_before_the_report(tmp_path):
    """`clora demo | tee log`: the last live frame's status line and the report's first line are two lines."""
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=False, color_system=None)
    demo = Demo(Settings(home=tmp_path), DemoOptions(), console)
    demo.phase = "stopping"
    with Live(demo.view(), console=console, transient=False):
        pass
    console.print("clora demo: the report")
    assert any(line.startswith("clora demo: the report") for line in out.getvalue().splitlines()), out.getvalue()


def test_the_report_lists_the_demo_settings_that_differ_from_the_products(tmp_path, monkeypatch):
    from clora.core.provenance import settings_changed
    from clora.demo.options import demo_settings, trainer_config

    for name in [n for n in os.environ if n.startswith("CLORA_")]:
        monkeypatch.delenv(name)
    settings = demo_settings(Settings(home=tmp_path, model=str(tmp_path)))
    changed = settings_changed(settings, trainer_config(DemoOptions()), ignore=("seed",))
    # Where the run lives (a fresh home, the model's path, free ports), and the demo's own choices.
    assert set(changed) == {"CLORA_HOME", "CLORA_MODEL", "CLORA_PORT", "CLORA_TRAINER_METRICS_PORT",
                            "CLORA_EVAL_INTERVAL_S", "CLORA_TRAINER_IDLE_S", "CLORA_TRAINER_MAX_INFLIGHT",
                            "lr", "gated"}, changed
    assert changed["CLORA_TRAINER_MAX_INFLIGHT"] == 0 and changed["CLORA_EVAL_INTERVAL_S"] == 0.0
    assert changed["lr"] == 2e-3 and changed["gated"] is True
