"""The soak's counts (`benchmarks/soak.py`), from what its clients saw and what the customers'
buffers hold: rules fixed before a run, kept apart from the run so that tests can feed them.

Fault windows: a fault's window opens when it is injected and closes `WINDOW_MARGIN_S` after the
faulted component is healthy again, or at its kind's maximum (`MAX_WINDOW_S`: a component not
healthy by then is an unrecovered fault). A 5xx is designed only inside a window of a kind whose
error codes (`DESIGNED_CODES`) include the answer's `error.code`, and only as a 503 with
`Retry-After`; a request answered with no HTTP status at all (refused or dropped connection) is
designed only inside a `serve` window. Everything else is undesigned. A request is inside a window
when the time from its sending to its answer overlaps it.

Records: every record a customer's buffer holds (and its quarantine), against the event ids the
webhook accepted (202) for that customer. `lost_by_records`: accepted ids held nowhere.
`duplicated_by_records`: records held plus evicted minus the distinct accepted ids found (a record
stored under an id never accepted: a copy under a fresh id, or another customer's), plus, per
group of records with the same trace, kind and payload, those with accepted ids beyond the first
(the same feedback accepted twice under two ids). Evicted records cannot be told apart: the soak
gives each buffer room for every event, and reports evictions beside the counts.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import NamedTuple

import orjson
from pydantic import BaseModel

WINDOW_MARGIN_S = 10.0
CONNECTION = "connection"  # the `code` of a request that got no HTTP answer
# The longest a fault may take to heal, by kind (on the soak's 2-core machine, the tiny model):
# vLLM's engine core restarts in well under a minute, the whole of `clora serve` in about two.
MAX_WINDOW_S: dict[str, float] = {"engine": 240.0, "serve": 360.0, "broker": 120.0, "redis": 120.0,
                                  "trainer": 120.0, "ingestion": 120.0}
# The 503 codes each fault may cause; a trainer or an ingestion fault may cause none (neither serves).
DESIGNED_CODES: dict[str, frozenset[str]] = {
    "engine": frozenset({"engine_unavailable", "engine_error"}),
    "serve": frozenset({CONNECTION}),
    "broker": frozenset({"broker_unavailable"}),
    "redis": frozenset({"redis_unavailable"}),
    "trainer": frozenset(),
    "ingestion": frozenset(),
}
FAULTS = tuple(DESIGNED_CODES)


class Observation(NamedTuple):
    """One request as a client saw it (seconds since the soak started)."""

    what: str  # chat | feedback
    sent_s: float
    done_s: float
    status: int | None  # None: no HTTP answer
    code: str | None  # the body's error.code, or CONNECTION
    retry_after: bool


class FaultWindow(BaseModel):
    kind: str
    injected_s: float
    healthy_s: float | None  # when the faulted component was healthy again; None: not within its maximum

    @property
    def recovered(self) -> bool:
        return self.healthy_s is not None and self.healthy_s - self.injected_s <= MAX_WINDOW_S[self.kind]

    @property
    def end_s(self) -> float:
        cap = self.injected_s + MAX_WINDOW_S[self.kind]
        return min(self.healthy_s + WINDOW_MARGIN_S, cap) if self.healthy_s is not None else cap

    def record(self) -> dict:
        return {"kind": self.kind, "injected_s": round(self.injected_s, 1),
                "healthy_s": None if self.healthy_s is None else round(self.healthy_s, 1),
                "end_s": round(self.end_s, 1), "recovered": self.recovered}


def designed_by(seen: Observation, windows: Iterable[FaultWindow]) -> str | None:
    """The kind of the window that designs this failure, or None (undesigned)."""
    if seen.status is not None and not (seen.status == 503 and seen.retry_after):
        return None
    code = CONNECTION if seen.status is None else seen.code
    for window in windows:
        if code in DESIGNED_CODES[window.kind] and seen.sent_s <= window.end_s and seen.done_s >= window.injected_s:
            return window.kind
    return None


def described(seen: Observation) -> str:
    if seen.status is None:
        return f"{seen.what} no answer"
    return f"{seen.what} {seen.status} {seen.code}" + (" Retry-After" if seen.retry_after else "")


def failures(observations: Iterable[Observation], windows: list[FaultWindow]) -> dict:
    """The 5xx and unanswered requests, designed (by window kind and what was seen) or not."""
    designed: collections.Counter[str] = collections.Counter()
    undesigned: collections.Counter[str] = collections.Counter()
    for seen in observations:
        if seen.status is not None and seen.status < 500:
            continue
        kind = designed_by(seen, windows)
        if kind is not None:
            designed[f"{kind}: {described(seen)}"] += 1
        else:
            undesigned[described(seen)] += 1
    return {"designed_5xx": sum(designed.values()), "designed_5xx_detail": dict(designed),
            "undesigned_5xx": sum(undesigned.values()), "undesigned_5xx_detail": dict(undesigned)}


class StoredRecord(NamedTuple):
    customer: str
    event_id: str
    content: tuple  # (trace_id, kind, payload): what makes two records the same feedback


def stored_record(customer: str, raw: bytes) -> StoredRecord:
    """A replay-buffer record (TrainingRecord JSON) as the counts see it."""
    record = orjson.loads(raw)
    payload = orjson.dumps({k: record.get(k) for k in ("source", "reward", "correction", "comment")},
                           option=orjson.OPT_SORT_KEYS)
    return StoredRecord(customer, record["event_id"], (record["trace_id"], record["kind"], payload))


def record_counts(accepted: dict[str, set[str]], stored: list[StoredRecord], evicted: int) -> dict:
    """`lost_by_records` and `duplicated_by_records` (see the module's note), with their parts."""
    held_ids = {(r.customer, r.event_id) for r in stored}
    found = sum(1 for customer, ids in accepted.items() for i in ids if (customer, i) in held_ids)
    groups: collections.Counter[tuple] = collections.Counter(
        (r.customer, r.content) for r in stored if r.event_id in accepted.get(r.customer, ()))
    repeats = sum(n - 1 for n in groups.values())
    not_accepted = len(stored) + evicted - found
    total = sum(len(ids) for ids in accepted.values())
    return {"feedback_accepted": total, "records_held": len(stored), "records_evicted": evicted,
            "accepted_found": found, "lost_by_records": total - found,
            "duplicated_by_records": not_accepted + repeats,
            "duplicated_parts": {"held_not_accepted": not_accepted, "same_feedback_repeated": repeats}}


def lost_ids(accepted: dict[str, set[str]], stored: list[StoredRecord]) -> dict[str, list[str]]:
    held_ids = {(r.customer, r.event_id) for r in stored}
    return {c: sorted(i for i in ids if (c, i) not in held_ids) for c, ids in accepted.items()
            if any((c, i) not in held_ids for i in ids)}
