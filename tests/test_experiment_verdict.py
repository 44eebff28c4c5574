"""The experiment's measurement itself, without a server: the pre-registered verdict on synthetic
sweeps drawn from the committed N=8 pairs, exact false-fail counting, cold timing that leaves the
teardown out, and the provenance every results file records."""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from clora.bench import experiments
from clora.bench import verdict as rule
from clora.core.provenance import command, provenance, settings_changed
from clora.core.settings import Settings
from clora.wire.trainer_config import TenantConfig

# The synthetic sweeps draw from sweep 7's N = 8 pairs, the data the rule was designed on before
# sweep 8 ran. On sweep 8's own pairs (the defaults' lr 1e-3 spreads seeds more) the pass rate at
# no difference is 73.6%, not 90%: reported in BENCHMARKS.md as a miss, not hidden by this choice.
REFERENCE = Path(__file__).resolve().parent / "data" / "verdict_reference_sweep7.json"
DRAWS = 1000


def committed_pairs() -> tuple[np.ndarray, np.ndarray]:
    return rule.paired_rewards(json.loads(REFERENCE.read_text()), rule.PAIRS)


def pass_rate(true_difference: float, seed: int = 0) -> float:
    """Synthetic sweeps: `PAIRS` pairs drawn with replacement from the committed N=8 pairs, each
    pair's runs swapped with probability 1/2 (no arm effect left), the true difference added to
    the concurrent run (clipped to [0, 1]); the share the verdict passes."""
    serial, concurrent = committed_pairs()
    rng, passed = np.random.default_rng(seed), 0
    for _ in range(DRAWS):
        picked = rng.integers(0, len(serial), rule.PAIRS)
        s, c = serial[picked], concurrent[picked]
        swap = (rng.random(rule.PAIRS) < 0.5)[:, None]
        s, c = np.where(swap, c, s), np.where(swap, s, c)
        passed += rule.verdict(s, np.clip(c + true_difference, 0, 1)).noninferior
    return passed / DRAWS


def test_the_verdict_passes_when_the_arms_are_alike():
    assert pass_rate(0.0) >= 0.90


def test_the_verdict_fails_when_concurrent_is_worse_by_more_than_the_margin():
    assert pass_rate(-(rule.MARGIN + 0.05)) <= 0.10


def test_the_old_rule_could_not_tell_noise_from_regression():
    """The rule this verdict replaces (worst step's gap over the serial sd > 1) fails far more
    often than 10% with no difference at all: the reason for the new one."""
    serial, concurrent = committed_pairs()
    rng, failed = np.random.default_rng(1), 0
    for _ in range(200):
        swap = (rng.random(rule.PAIRS) < 0.5)[:, None]
        s, c = np.where(swap, concurrent, serial), np.where(swap, serial, concurrent)
        gap = ((s.mean(0) - c.mean(0)) / np.maximum(s.std(0, ddof=1), 1e-3)).max()
        failed += gap > 1.0
    assert failed / 200 > 0.2


def test_a_saturated_step_is_judged_by_its_binomial_error_not_a_zero_spread():
    serial = np.ones((8, 10))
    concurrent = np.ones((8, 10))
    concurrent[0, 9] = 0.9375  # one miss of 128 answers at the last step, where every serial run was perfect
    result = rule.verdict(serial, concurrent)
    assert result.noninferior and 0 < result.per_step_z[9] < 1


def test_each_summary_and_the_per_step_test_can_fail_the_verdict_alone():
    rng = np.random.default_rng(2)
    serial = np.clip(rng.normal(0.6, 0.1, (8, 10)), 0, 1)
    assert rule.verdict(serial, serial.copy()).noninferior
    late = serial.copy()
    late[:, -3:] -= 0.3  # only the last steps worse: the last-3 summary's bound fails
    failed = rule.verdict(serial, late)
    assert not failed.noninferior and failed.lower_bounds["last_3"] < -rule.MARGIN
    assert failed.lower_bounds["steps_1_on"] < failed.lower_bounds["last_3"] + 0.3
    one_step = serial.copy()
    one_step[:, 4] = 0.0  # one step far behind, means over steps barely moved
    failed = rule.verdict(serial, one_step)
    assert not failed.noninferior and max(failed.per_step_z) > rule.Z_LIMIT


def test_false_fail_rate_counts_every_sign_flip_exactly():
    serial = np.full((8, 10), 0.5)
    concurrent = serial.copy()
    concurrent[0] = 0.0  # pair 0 alone: the verdict fails exactly when pair 0 is not flipped
    assert not rule.verdict(serial, concurrent).noninferior
    flipped = serial.copy(), concurrent.copy()
    flipped[0][0], flipped[1][0] = concurrent[0], serial[0]
    assert rule.verdict(*flipped).noninferior
    assert rule.false_fail_rate(serial, concurrent) == 0.5
    assert rule.false_fail_rate(serial, serial.copy()) == 0.0


def test_pairs_come_from_the_serial_run_of_the_same_seed():
    result = {"experiments": {"cold": [{"seed": 1, "rewards": [0.1] * 10}, {"seed": 0, "rewards": [0.0] * 10}],
                              "warm": []}, "concurrent_rewards": {"2": [[0.5] * 10, [0.6] * 10]}}
    serial, concurrent = rule.paired_rewards(result, 2)
    assert serial[:, 0].tolist() == [0.0, 0.1] and concurrent[:, 0].tolist() == [0.5, 0.6]
    with pytest.raises(ValueError, match="seeds \\[2\\]"):
        rule.paired_rewards(result | {"concurrent_rewards": {"3": []}}, 3)


class SlowRuntime:
    """A runtime whose start takes 0.3 s and whose teardown takes 0.6 s (a stack stop)."""

    @asynccontextmanager
    async def runtime(self, customers, model=None, **settings):
        await asyncio.sleep(0.3)
        yield type("Runtime", (), {"stack": type("Stack", (), {"run_dir": Path("/nowhere")})()})()
        await asyncio.sleep(0.6)

    @asynccontextmanager
    async def trainer_process(self, runtime):
        class Trainer:
            async def ready(self):
                await asyncio.sleep(0.1)  # process start and model load: part of the start

            async def run(self, job, customers, seeds, steps, pipeline, progress):
                began = time.perf_counter()
                await asyncio.sleep(0.2)
                return [experiments.Experiment(customers[0], seeds[0], began, time.perf_counter(), [0.5] * steps)]
        yield Trainer()


async def test_a_cold_experiment_counts_start_and_run_and_reports_the_stop_apart(monkeypatch):
    fake = SlowRuntime()
    monkeypatch.setattr(experiments, "bench_runtime", fake.runtime)
    monkeypatch.setattr(experiments, "trainer_process", fake.trainer_process)
    logs: list[str] = []
    cold = await experiments.cold_experiment(experiments.SweepOptions(steps=2), 3, lambda n: None, {}, logs)
    assert cold.start_s == pytest.approx(0.4, abs=0.08) and cold.run_s == pytest.approx(0.2, abs=0.08)
    assert cold.stop_s == pytest.approx(0.6, abs=0.08)
    assert cold.seconds == pytest.approx(cold.start_s + cold.run_s) and cold.seconds < 0.8  # no teardown in it
    assert cold.experiment.seed == 3 and logs == ["/nowhere"]


def test_the_experiment_runs_the_trainer_configs_defaults_but_its_shape():
    options = experiments.SweepOptions()
    assert settings_changed(config=options.tenant(5), ignore=("seed",)) == \
        {"environment": "arithmetic:0", "prompts_per_step": 2}  # group 8 and 48 new tokens are the defaults


def test_settings_changed_lists_overridden_settings_and_trainer_config_fields(monkeypatch, tmp_path):
    for name in [k for k in os.environ if k.startswith("CLORA_")]:  # the shell's, or the test worker's
        monkeypatch.delenv(name)
    monkeypatch.setenv("CLORA_DTYPE", "bfloat16")
    monkeypatch.setenv("CLORA_ADMIN_KEY", "sk-secret")
    monkeypatch.setenv("CLORA_REDIS_URL", "redis://user:pw@127.0.0.1:6379/0")
    changed = settings_changed(Settings(), TenantConfig(lr=2e-3, weights={"correction": 0.5}, seed=7), ignore=("seed",))
    assert changed == {"CLORA_DTYPE": "bfloat16", "CLORA_ADMIN_KEY": "<redacted>",
                       "CLORA_REDIS_URL": "redis://<redacted>@127.0.0.1:6379/0", "lr": 0.002,
                       "weights.correction": 0.5}
    for name in [k for k in os.environ if k.startswith("CLORA_")]:
        monkeypatch.delenv(name)
    assert settings_changed(Settings(), TenantConfig()) == {}
    assert "sk-secret" not in command() and "pw@" not in command()


@pytest.mark.integration  # starts a process
def test_provenance_names_the_revision_the_machine_and_the_start():
    record = provenance("python benchmarks/x.py", config=TenantConfig(rank=8))
    assert len(record["git_revision"]) == 40 and isinstance(record["git_dirty"], bool)
    assert "vCPU" in record["machine"] and record["started_at"].endswith("+00:00")
    assert record["command"].split()[-1].startswith("python") or "python benchmarks/x.py" in record["command"]
    assert record["settings_changed"] == {"rank": 8}
