"""Faults under load, end to end (`benchmarks/soak.py`, one round): chat and feedback from four
customers while `clora serve` (a child process) has its engine core, trainer and ingestion pass
killed, the broker and valkey are SIGKILLed and restarted, and the whole of `clora serve` is
SIGKILLed and started again. Serving answers only 200s and the designed 503s inside their fault's
window; every accepted feedback event is held in a buffer once. And the counts can fail: a record
copied under a fresh id and an engine 503 outside every window, planted before counting, are each
reported. The 10-minute run is the benchmark."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest

from clora.bench.soak_tally import FAULTS, Observation
from clora.feedback.replay import ReplayBuffer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def plant(soak) -> None:
    """What the counts must catch: a copy of a held record under an id never accepted, and an
    engine failure answered as the designed 503 but after every window had closed."""
    records = ReplayBuffer._keys("soak-0")["records"]
    copy = json.loads(next(iter((await soak.redis.hgetall(records)).values())))
    copy["event_id"] = "planted-copy"
    await soak.redis.hset(records, copy["event_id"], json.dumps(copy))
    assert all(w.end_s < soak.now() for w in soak.windows)
    soak.seen.append(Observation("chat", soak.now(), soak.now() + 0.1, 503, "engine_error", True))


def test_every_fault_under_load_loses_nothing_accepted_and_the_counts_catch_what_is_planted(tmp_path):
    soak = load_soak()
    args = soak.parser().parse_args(["--minutes", "0", "--fault-every-s", "15", "--drain-s", "180"])
    result = asyncio.run(soak.Soak(args, tmp_path).run(before_counting=plant))
    assert result["faults"] == dict.fromkeys(FAULTS, 1), result["windows"]
    assert result["unrecovered_faults"] == 0, result["windows"]
    assert result["undesigned_5xx_detail"] == {"chat 503 engine_error Retry-After": 1}  # the planted one only
    assert any(k.startswith("engine: chat 503") for k in result["designed_5xx_detail"]), result["designed_5xx_detail"]
    assert any(k.startswith("serve: ") for k in result["designed_5xx_detail"]), result["designed_5xx_detail"]
    assert result["feedback_accepted"] > 20
    assert result["lost_by_records"] == 0, result["lost_fates"]
    assert result["duplicated_parts"] == {"held_not_accepted": 1, "same_feedback_repeated": 0}  # the planted copy
    assert result["records_evicted"] == 0
