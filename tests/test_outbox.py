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


JOURNAL_AND_DIE = """
import asyncio, os, signal, sys, time
from pathlib import Path
from clora.core.outbox import Outbox, OutboxMessage

async def main():
    outbox = Outbox(Path(sys.argv[1]), sync_every_s=3600)  # no fsync before the kill: the OS has it
    for i in range(50):
        message = OutboxMessage(id=f"ev-{i}", topic="t", key="acme", value='"x"', added_at=time.time())
        assert await outbox.journal([message], wait_s=5)
    os.kill(os.getpid(), signal.SIGKILL)  # right after the last answer would have gone out

asyncio.run(main())
"""


@pytest.mark.integration  # starts a process
def test_journaled_messages_survive_a_sigkill_of_their_process(tmp_path):
    """`journal` returns once write(2) has the message: a process killed right after keeps every
    one (the fsync it never ran only matters to a machine crash)."""
    import signal
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", JOURNAL_AND_DIE, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    reopened = Outbox(tmp_path)
    assert {m.id for m in reopened.unconfirmed(time.time() + 1)} == {f"ev-{i}" for i in range(50)}
    reopened.close()


async def test_a_stalled_disk_lets_the_journal_caller_go_on_and_the_write_still_lands(tmp_path, monkeypatch):
    """A journal write that takes longer than `wait_s` answers False (the gateway serves and
    counts it) and lands later; the writer fsyncs journal writes off the caller's path."""
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    outbox = Outbox(tmp_path, sync_every_s=0.05)
    assert await outbox.journal([message(1)], wait_s=5)
    await asyncio.sleep(0.3)
    assert synced  # fsync'd in the background, within about sync_every_s

    stall = asyncio.Event()
    real_append = outbox._append

    def stalled_append(*args, **kwargs):
        time.sleep(0.5)  # the disk stalls
        result = real_append(*args, **kwargs)
        stall.set()
        return result
    monkeypatch.setattr(outbox, "_append", stalled_append)
    started = time.perf_counter()
    assert await outbox.journal([message(2)], wait_s=0.05) is False
    assert time.perf_counter() - started < 0.3
    await asyncio.to_thread(lambda: time.sleep(0.8))
    assert {m.id for m in outbox.unconfirmed(time.time() + 1)} == {"ev-1", "ev-2"}
    outbox.close()
