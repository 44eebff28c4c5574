"""The soak's counting rules (`clora.bench.soak_tally`) on hand-made observations and records: a
failure is designed only inside its fault's window, with that fault's code and a Retry-After; a
record is lost or duplicated by what the buffers hold, not by a counter of the pipeline's own."""

from __future__ import annotations

import orjson

from clora.bench.soak_tally import (
    CONNECTION,
    MAX_WINDOW_S,
    WINDOW_MARGIN_S,
    FaultWindow,
    Observation,
    failures,
    lost_ids,
    record_counts,
    stored_record,
)

ENGINE = FaultWindow(kind="engine", injected_s=100.0, healthy_s=130.0)  # closes at 140 s
SERVE = FaultWindow(kind="serve", injected_s=200.0, healthy_s=290.0)  # closes at 300 s


def seen(status: int | None, code: str | None, at: float, retry_after: bool = True, what: str = "chat") -> Observation:
    return Observation(what, at, at + 0.5, status, code, retry_after)


def test_a_window_closes_a_margin_after_healthy_or_at_its_maximum():
    assert ENGINE.end_s == 130.0 + WINDOW_MARGIN_S and ENGINE.recovered
    stuck = FaultWindow(kind="engine", injected_s=100.0, healthy_s=None)
    assert stuck.end_s == 100.0 + MAX_WINDOW_S["engine"] and not stuck.recovered
    late = FaultWindow(kind="redis", injected_s=0.0, healthy_s=MAX_WINDOW_S["redis"] + 5)
    assert late.end_s == MAX_WINDOW_S["redis"] and not late.recovered


def test_only_the_faulted_components_503_with_retry_after_inside_its_window_is_designed():
    observations = [
        seen(503, "engine_unavailable", 110.0),  # designed: engine window, engine code
        seen(503, "engine_error", 99.8),  # sent before the injection, answered after it: designed
        seen(503, "engine_unavailable", 150.0),  # after the window closed
        seen(503, "engine_unavailable", 110.0, retry_after=False),  # no Retry-After
        seen(500, "internal_error", 110.0, retry_after=False),  # a 500 is never designed
        seen(503, "redis_unavailable", 110.0),  # another component's code
        seen(None, CONNECTION, 120.0, retry_after=False),  # no answer while only the engine was down
        seen(None, CONNECTION, 250.0, False, "feedback"),  # no answer while serve restarted: designed
        seen(200, None, 110.0), seen(429, "rate_limit_exceeded", 500.0),  # not failures
    ]
    counted = failures(observations, [ENGINE, SERVE])
    assert counted["designed_5xx_detail"] == {"engine: chat 503 engine_unavailable Retry-After": 1,
                                              "engine: chat 503 engine_error Retry-After": 1,
                                              "serve: feedback no answer": 1}
    assert counted["undesigned_5xx_detail"] == {"chat 503 engine_unavailable Retry-After": 1,
                                                "chat 503 engine_unavailable": 1, "chat 500 internal_error": 1,
                                                "chat 503 redis_unavailable Retry-After": 1, "chat no answer": 1}
    assert (counted["designed_5xx"], counted["undesigned_5xx"]) == (3, 5)


def record(event_id: str, trace_id: str, rating: str = "up") -> bytes:
    return orjson.dumps({"event_id": event_id, "customer": "a", "trace_id": trace_id, "kind": "rating",
                         "source": "user", "reward": 1.0 if rating == "up" else -1.0, "interaction": {}})


def test_records_count_a_copy_under_a_fresh_id_a_repeat_under_two_ids_and_a_missing_one():
    accepted = {"a": {"e1", "e2", "e3", "e4"}, "b": {"e9"}}
    held = [stored_record("a", record("e1", "t1")), stored_record("a", record("e2", "t2")),
            stored_record("a", record("e3", "t3"))]
    clean = record_counts({"a": {"e1", "e2", "e3"}}, held, evicted=0)
    assert (clean["lost_by_records"], clean["duplicated_by_records"]) == (0, 0)

    planted = held + [stored_record("a", record("fresh", "t1"))]  # e1's record under an id never accepted
    repeated = planted + [stored_record("a", record("e4", "t2"))]  # e2's feedback accepted again as e4
    counted = record_counts(accepted, repeated, evicted=0)
    assert counted["duplicated_parts"] == {"held_not_accepted": 1, "same_feedback_repeated": 1}
    assert counted["duplicated_by_records"] == 2
    assert counted["lost_by_records"] == 1 and lost_ids(accepted, repeated) == {"b": ["e9"]}
    # Another customer's record is not this one's: b's id held in a's buffer is lost for b, extra in a.
    leaked = held + [stored_record("a", record("e9", "t9"))]
    crossed = record_counts({"a": {"e1", "e2", "e3"}, "b": {"e9"}}, leaked, evicted=0)
    assert (crossed["lost_by_records"], crossed["duplicated_by_records"]) == (1, 1)
    # Two kinds of feedback on one trace are two feedbacks, not a repeat.
    correction = orjson.loads(record("e5", "t1")) | {"kind": "correction", "correction": {"content": "Better."}}
    both = held + [stored_record("a", orjson.dumps(correction))]
    assert record_counts({"a": {"e1", "e2", "e3", "e5"}}, both, evicted=0)["duplicated_by_records"] == 0
    # Evicted records cannot be told apart: every accepted id found, two more records were stored.
    assert record_counts({"a": {"e1", "e2", "e3"}}, held, evicted=2)["duplicated_by_records"] == 2
