"""The outbox on a real disk: group commit, what survives a restart, confirmation, the bound."""

from __future__ import annotations

import asyncio
import time

import pytest

from clora.core.outbox import Outbox, OutboxFull, OutboxMessage


def message(i: int, size: int = 10) -> OutboxMessage:
    return OutboxMessage(id=f"ev-{i}", topic="t", key="acme", value='"' + "x" * size + '"', added_at=time.time())


async def test_added_messages_survive_a_restart_until_confirmed(tmp_path):
    outbox = Outbox(tmp_path, segment_bytes=2_000)
    added = set()
    for i in range(20):  # one at a time: each its own write
        added |= await outbox.add([message(i), message(i + 100)])
    assert added == {f"ev-{i}" for i in [*range(20), *range(100, 120)]}
    assert await outbox.add([message(3)]) == set()  # already pending: not twice
    assert len(list(tmp_path.glob("out-*.jsonl"))) > 1  # segments rolled over
    outbox.confirm([f"ev-{i}" for i in range(20)])
    outbox.close()

    # A new process on the same directory: only the unconfirmed are pending, and they count as
    # sent just now (resent only after the keeper's delay).
    reopened = Outbox(tmp_path)
    assert {m.id for m in reopened.unconfirmed(time.time() + 1)} == {f"ev-{i}" for i in range(100, 120)}
    assert reopened.unconfirmed(time.time() - 60) == []
    reopened.confirm(f"ev-{i}" for i in range(100, 120))
    assert len(reopened) == 0 and not list(tmp_path.glob("out-*"))  # finished segments deleted
    reopened.close()


async def test_a_torn_last_line_is_ignored_and_the_bound_refuses_whole_batches(tmp_path):
    outbox = Outbox(tmp_path, max_bytes=1_000)
    await outbox.add([message(1)])
    with pytest.raises(OutboxFull):
        await outbox.add([message(2, size=600), message(3, size=600)])
    assert {m.id for m in outbox.unconfirmed(time.time() + 1)} == {"ev-1"}  # nothing of the refused batch
    outbox.close()
    (segment,) = tmp_path.glob("out-*.jsonl")
    with open(segment, "ab") as f:
        f.write(b'{"id": "ev-9", "topic": "t", "ke')  # a crash mid-write (never acknowledged)
    reopened = Outbox(tmp_path)
    assert {m.id for m in reopened.unconfirmed(time.time() + 1)} == {"ev-1"}
    reopened.close()


async def test_concurrent_adds_share_fsyncs(tmp_path, monkeypatch):
    import os

    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    outbox = Outbox(tmp_path)
    await asyncio.gather(*(outbox.add([message(i)]) for i in range(200)))
    outbox.close()
    assert len(outbox) == 200 and len(calls) < 100  # one per batch of waiting adds, not one per add
