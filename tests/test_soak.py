"""Faults under load, end to end (`benchmarks/soak.py`, short): chat and feedback from four
customers while the engine core, the ingestion, the trainer and the broker are each killed once
(the broker restarted empty); serving answers only 200s and the designed 503s, and every accepted
feedback event reaches a replay buffer, none twice. The 10-minute run is the benchmark."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_fault_under_load_loses_nothing_accepted_and_answers_no_undesigned_5xx(tmp_path):
    soak = load_soak()
    args = argparse.Namespace(minutes=1.6, customers=4, interval_s=1.0, fault_every_s=20.0, drain_s=180.0,
                              model="tiny", seed=0)
    result = asyncio.run(soak.Soak(args, tmp_path).run())
    assert set(result["faults"]) == set(soak.FAULTS), result["fault_log"]  # each kind injected
    assert result["errors_5xx"] == 0, result["errors_5xx_detail"]
    assert result["designed_503s"] > 0  # the engine kill was felt, and answered as designed
    assert result["feedback_accepted"] > 20
    assert (result["feedback_lost"], result["feedback_duplicated"]) == (0, 0)
    assert result["feedback_in_buffers"] == result["feedback_accepted"]
