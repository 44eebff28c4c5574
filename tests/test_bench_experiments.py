"""`clora bench experiments` end to end, the quick sweep CI runs: the real command (its own
runtimes: a cold one per serial experiment, one warm one), the tiny model, N in {1, 2}."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from clora.bench.rows import shared_batches

pytestmark = pytest.mark.slow

ENGINE_EXPORTS = ("CLORA_ENGINE_LOG", "CLORA_GROUPED_LORA")  # runtime/engine/config.py's env(), for vLLM's children


def test_the_running_lora_metric_tells_which_tenants_shared_a_batch():
    metrics = "\n".join([
        'vllm:lora_requests_info{max_lora="8",running_lora_adapters="",waiting_lora_adapters=""} 1.0',
        'vllm:lora_requests_info{max_lora="8",running_lora_adapters="n2-0.v2",waiting_lora_adapters=""} 2.0',
        'vllm:lora_requests_info{max_lora="8",running_lora_adapters="n2-1.v2,n2-0.v2,x.v1",waiting_lora_adapters=""} 3.0'])
    assert shared_batches(metrics, ["n2-0", "n2-1"]) == 2
    assert shared_batches(metrics, ["n2-0", "n2-9"]) == 1 and shared_batches(metrics, ["n4-0"]) == 0


def test_the_quick_sweep_measures_every_mode_and_the_tenants_share_engine_batches(tmp_path: Path):
    # Three steps: step 3's rollouts, sampled while step 2 computes, are the first under the
    # tenants' own adapters (steps 1 and 2 sample the base model), so the batches can mix adapters.
    out = tmp_path / "results" / "sweep.json"
    # A user's shell: not what an engine this test session started in-process exported for its children.
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_EXPORTS} | {"CLORA_HOME": str(tmp_path / "home")}
    done = subprocess.run([str(Path(sys.executable).parent / "clora"), "bench", "experiments", "--model", "tiny",
                           "--ns", "2,1", "--steps", "3", "--tasks", "1", "--group", "4", "--serial-runs", "1",
                           "--freshness-ns", "1", "--freshness-load", "2", "--freshness-s", "15",
                           "--freshness-interval-s", "2",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The throughput result is written before the freshness phase starts (two sweeps died in it).
    assert "throughput measured; wrote" in done.stdout
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000 and "| N |" in out.with_suffix(".md").read_text()
    assert (result["model"], result["steps"], result["group_size"], result["serial_measured_runs"]) == \
        ("tiny-llama-2x256", 3, 4, 1)
    assert result["dtype"] == {"engine": "float32", "trainer": "float32"}  # the trainer follows the engine
    # Distinct seeds for the serial runs: their rewards are independent experiments, not one seed twice.
    assert result["serial_seeds"] == {"cold": [0], "warm": [1]}
    assert [e["seed"] for e in result["experiments"]["cold"] + result["experiments"]["warm"]] == [0, 1]
    logs = [Path(p) for p in result["logs"]]  # each runtime's run directory: one per cold run, one warm
    assert len(logs) == 2 and all((p / "trainer.log").stat().st_size > 0 for p in logs)
    assert all([p.name for p in log.parent.parent.iterdir()] == ["runs"] for log in logs)  # the GBs go
    settings, args = result["command"].split(" clora bench experiments ")  # what a re-run needs, settings too
    assert f"CLORA_HOME={tmp_path / 'home'}" in settings.split() and args.startswith("--model tiny --ns 2,1 ")
    # Neither the runtime's own plumbing nor what its engine exports for its children.
    assert "CLORA_ENGINE_LOG" not in settings and "CLORA_GROUPED_LORA" not in settings
    assert len(result["git_revision"]) == 40 and isinstance(result["git_dirty"], bool) and "vCPU" in result["machine"]
    # The experiment's shape as asked (1 problem, group 4); no learning hyper-parameter off its default.
    changed = result["settings_changed"]
    assert (changed["prompts_per_step"], changed["group_size"], changed["environment"]) == (1, 4, "arithmetic:0")
    assert not {"lr", "temperature", "clip", "kl_coef", "rank", "alpha"} & set(changed)
    assert changed["CLORA_TRAINER_ENABLED"] is False and "CLORA_TRAINER_THREADS" not in changed  # serve's threads
    assert (result["pairs"], result["margin"]) == (8, 0.1)
    one, two = result["rows"]
    assert [one["n"], two["n"]] == [1, 2]
    for row in (one, two):
        assert 0 < row["concurrent_s"] and 0 < row["warm_serial_s"] < row["serial_s"]  # a cold start costs
        assert row["throughput_ratio"] == pytest.approx(row["serial_s"] / row["concurrent_s"], rel=0.01)
        assert row["warm_throughput_ratio"] == pytest.approx(row["warm_serial_s"] / row["concurrent_s"], rel=0.01)
        assert len(row["reward_per_step"]) == 3 and len(row["serial_reward_per_step"]) == 3
        assert row["first_experiment_s"] <= row["mean_experiment_s"] <= row["concurrent_s"]
        assert 0 < row["mean_engine_busy"] <= 1 and 0 < row["mean_trainer_busy"] <= 1
        # Cold = start + run; the teardown is reported apart.
        assert row["start_s"] > 0 and row["stop_s"] > 0
        assert row["serial_s"] == pytest.approx(row["n"] * (row["start_s"] + statistics.fmean(
            e["finished"] - e["started"] for e in result["experiments"]["cold"])), rel=0.05)
        # Backward passes: groups that took one, at most every group of every step.
        passes = row["backward_passes"]
        assert 0 <= passes["concurrent"] <= row["n"] * 3 and 0 <= passes["serial"] <= row["n"] * 3
        # Paired by seed (serial seeds 0 and 1); no verdict below N = 8.
        assert row["paired_experiments"] == row["n"] and set(row["mean_paired_differences"]) == {"steps_1_on", "last_3"}
        assert row["noninferior"] is None and row["false_fail_rate"] is None
    assert one["step_time_ratio"] == 1.0 and two["step_time_ratio"] > 0
    assert two["serial_s"] == pytest.approx(2 * one["serial_s"], rel=0.01)  # N x the measured singles
    assert two["shared_batch_tenants"] == 2, "the two experiments' rollouts never shared an engine batch"
    assert len(result["concurrent_rewards"]["2"]) == 2
    # Freshness with one feedback-only customer alone: a lone correction trains within max_record_wait_s
    # (5 s) and the trainer's idle pause (5 s).
    fresh = result["freshness"]["1"]
    assert fresh["events"] >= 1 and fresh["rl_experiments"] == 0 and fresh["not_fresh"] == 0
    assert 0 < one["freshness_p50_s"] <= one["freshness_p99_s"] < 60
    # Two customers while two RL experiments train in the same loop.
    loaded = result["freshness"]["2"]
    assert loaded["events"] >= 2 and loaded["rl_experiments"] == 2 and loaded["rl_steps"] >= 1
    assert loaded["not_fresh"] == 0
    assert 0 < two["freshness_p50_s"] <= two["freshness_p99_s"] < 120
    # The live answers behind the events: how long they took under the load, and any that never came.
    assert loaded["chat_answered"] >= loaded["events"] and loaded["chat_failed"] == len(loaded["chat_failures"]) == 0
    assert 0 < loaded["chat_p50_s"] <= loaded["chat_max_s"] < 60
