"""`clora demo` end to end on the tiny model: the whole loop runs and the report says what happened.

The tiny random model cannot learn the rules in two rounds (the reference run with SmolLM2 is in
benchmarks/results/demo.json); this checks the plumbing (traffic, feedback, training, the gate and
the report, through the real CLI) and that the verdict, its exit code and its printed line agree
with the report's numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest

from clora.agents.preference import DEMO_RULES, SCORED_ONLY
from tests.test_serve_e2e import CLORA

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_demo_runs_rounds_trains_gates_and_reports(tiny_model: Path, tmp_path: Path):
    env = {**os.environ, "CLORA_HOME": str(tmp_path / "home"), "CLORA_MODEL": str(tiny_model),
           "CLORA_KV_CACHE_GIB": "1", "CLORA_MAX_MODEL_LEN": "1024", "COLUMNS": "200"}
    reference = REPO / "benchmarks" / "results" / "demo.json"
    reference_before = reference.read_bytes() if reference.exists() else None
    done = subprocess.run([*CLORA, "demo", "--minutes", "8", "--max-rounds", "2", "--requests-per-round", "4"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode != 2, done.stdout[-3000:] + done.stderr[-3000:]  # 2: a usage error
    # Without --out-dir the report goes to a fresh folder under the data dir, never into the checkout.
    (out,) = (tmp_path / "home" / "demo").iterdir()
    assert len(out.name) == len("20261130-120000") and out.name[8] == "-"
    assert (reference.read_bytes() if reference.exists() else None) == reference_before
    report = json.loads((out / "demo.json").read_text())
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vCPU" in report["machine"]
    # Provenance: the command with the CLORA_ variables it ran under, the code, when; and every setting
    # the run changed from the product's defaults (the demo's own, and the environment's).
    assert report["command"].endswith("clora demo --minutes 8 --max-rounds 2 --requests-per-round 4")
    assert f"CLORA_HOME={tmp_path / 'home'} " in report["command"]
    assert report["git_revision"] is None or len(report["git_revision"]) == 40
    assert dt.datetime.fromisoformat(report["started_at"]).tzinfo is not None
    changed = report["settings_changed"]
    assert changed["CLORA_TRAINER_MAX_INFLIGHT"] == 0 and changed["CLORA_EVAL_INTERVAL_S"] == 0.0
    assert changed["lr"] == 2e-3 and changed["gated"] is True and "records_per_step" not in changed
    assert changed["CLORA_KV_CACHE_GIB"] == 1.0 and changed["CLORA_MAX_MODEL_LEN"] == 1024
    assert report["rounds"] == 2 and report["requests_per_round"] == 4
    assert report["report_set_size"] == 64 and report["gate_set_size"] == 16
    customers = {c["customer"]: c for c in report["customers"]}
    assert set(customers) == set(DEMO_RULES)
    for name, c in customers.items():
        assert c["requests"] == 8 and c["feedback_events"] == 8
        assert len(c["live"]) == 2 and all(0 <= share <= 1 for _, share in c["live"])
        assert c["versions_published"] >= 2  # the trainer learnt from each round's feedback
        assert c["promoted"] + c["held_back"] >= 1  # and the gate decided on a candidate
        assert 0 <= c["eval_before"] <= 1 and 0 <= c["eval_after"] <= 1 and 0 <= c["foreign_rule_rate"] <= 1
        for score, (low, high) in ((c["eval_before"], c["eval_before_ci"]), (c["eval_after"], c["eval_after_ci"])):
            assert 0 <= low <= score <= high <= 1 and high - low > 0  # a 90% interval around the score
            assert round(score * report["report_set_size"], 6).is_integer()  # a share of the report set
        assert 0 <= c["content_before"] <= 1 and 0 <= c["content_after"] <= 1
        # The scored customer gets rewards only, never a correction (the others get ratings, and a
        # correction when an answer is not good).
        assert set(c["feedback_kinds"]) == {"reward"} if name in SCORED_ONLY else \
            set(c["feedback_kinds"]) <= {"rating", "correction"} and "rating" in c["feedback_kinds"]
        if name in SCORED_ONLY:
            assert "correction" not in c["records_by_path"]
        # The trainer's metrics (scraped from the child's endpoint) say which loss paths the records took.
        assert set(c["records_by_path"]) <= {"importance", "ratio_free", "correction"}
        assert sum(c["records_by_path"].values()) >= 4
        if c["promoted"]:
            assert c["served_version"].startswith(f"{name}.v")
    decided = {(d["customer"], d["candidate"]) for d in report["decisions"]}
    assert len(decided) == len(report["decisions"])  # a candidate is decided once
    # The verdict: recomputed from the report's own numbers, it is the report's, the exit code's and
    # the printed one's. The tiny random model cannot learn a rule in two rounds: not passed.
    learnt = all(c["eval_after"] - c["eval_before"] >= report["ratings_only_gain" if name in SCORED_ONLY else
                                                            "target_gain"]
                 and c["foreign_rule_rate"] <= c["foreign_rule_rate_before"]
                 and c["content_after"] >= 0.8 * c["content_before"] for name, c in customers.items())
    assert learnt is False and report["passed"] is False
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    verdicts = [line for line in done.stdout.splitlines() if "on its report set" in line]
    assert len(verdicts) == 1 and verdicts[0].startswith("not passed: every customer +0.4"), verdicts


def test_a_round_starts_only_if_it_and_the_final_report_fit():
    from clora.demo.options import Budget

    budget = Budget(minutes=14.5, report=2.0)
    assert budget.fits_a_round(12.5)  # before any round: only the report must fit
    assert not budget.fits_a_round(12.6)
    budget.ran(started=2.0, ended=4.0)
    assert budget.fits_a_round(10.5)  # 10.5 + 2.0 + 2.0 = 14.5
    assert not budget.fits_a_round(10.6)
    budget.ran(started=4.0, ended=5.5)  # a shorter round: the longest still counts
    assert budget.longest_round == 2.0 and not budget.fits_a_round(10.6)
