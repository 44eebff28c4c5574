"""An outbox: messages this process accepted, kept on disk until their consumer confirms them.

A message is written and fsync'd before the caller acknowledges it to its client. One writer
thread makes one write and one fsync for every message waiting (group commit), so the event loop
never touches the disk and a burst of requests shares one fsync. A message stays until `confirm`
names its id (its consumer has it stored); the keeper (outbox_keeper.py) sends again whatever is left unconfirmed too
long (at-least-once: consumers are idempotent by id), so a broker that restarted empty is refilled.

A journal (`journal`) is the same with the fsync taken off the caller's path: the writer thread
hands the messages to the operating system (write(2)) and answers; it fsyncs what it wrote at most
`sync_every_s` later. What a SIGKILL of the process can lose: nothing; a machine crash: at most
that last interval's writes.

Files: `out-<seq>.jsonl` (messages) and `out-<seq>.done` (confirmed ids), both append-only; a
sealed segment whose messages are all confirmed is deleted. Pending bytes are bounded: past
`max_bytes`, `add` raises OutboxFull (the caller answers 503: its consumer is not keeping up).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

log = logging.getLogger("clora.outbox")
SEGMENT_BYTES = 4 << 20


class OutboxMessage(BaseModel):
    id: str
    topic: str
    key: str
    value: str  # the message as JSON text
    added_at: float


class OutboxFull(Exception):
    pass


@dataclass
class _Segment:
    path: Path
    ids: set[str] = field(default_factory=set)  # its messages not yet confirmed
    bytes: int = 0

    @property
    def done_path(self) -> Path:
        return self.path.with_suffix(".done")


class Outbox:
    def __init__(self, directory: Path, max_bytes: int = 256 << 20, segment_bytes: int = SEGMENT_BYTES,
                 sync_every_s: float = 0.2):
        self.dir = directory
        self.sync_every_s = sync_every_s
        self._unsynced: set[Path] = set()  # segments written by `journal` and not fsync'd since
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[OutboxMessage, _Segment, int]] = {}  # id -> (message, segment, bytes)
        self._pending_bytes = 0  # their sum: summing per add was O(pending) under load
        self.last_sent: dict[str, float] = {}  # id -> when it was last handed to the broker
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._load()
        self._writes: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="outbox-writer", daemon=True)
        self._writer.start()

    # -- state on disk ----------------------------------------------------------------------------
    def _load(self) -> None:
        """What a previous process left unconfirmed: pending again, last sent now."""
        now = time.time()
        for path in sorted(self.dir.glob("out-*.jsonl")):
            segment = _Segment(path)
            done = set(segment.done_path.read_text().split()) if segment.done_path.exists() else set()
            for line in path.read_bytes().splitlines():
                try:
                    message = OutboxMessage.model_validate_json(line)
                except ValueError:  # a line torn by a crash mid-write was never acknowledged
                    continue
                if message.id not in done and message.id not in self._pending:
                    segment.ids.add(message.id)
                    self._pending[message.id] = (message, segment, len(line))
                    self._pending_bytes += len(line)
                    self.last_sent[message.id] = now
            self._segments.append(segment)
        self._delete_finished(include_active=True)
        if self._pending:
            log.warning("outbox: %d messages from before the restart are not confirmed yet", len(self._pending))

    def _delete_finished(self, include_active: bool = False) -> None:
        for segment in [s for s in self._segments if not s.ids and (include_active or s is not self._active)]:
            segment.path.unlink(missing_ok=True)
            segment.done_path.unlink(missing_ok=True)
            self._segments.remove(segment)

    def pending_bytes(self) -> int:
        return self._pending_bytes

    def __len__(self) -> int:
        return len(self._pending)

    # -- add (group commit) -----------------------------------------------------------------------
    async def add(self, messages: list[OutboxMessage]) -> set[str]:
        """Durable once this returns; returns the ids it added (an id already pending is not
        added again). Raises OutboxFull past `max_bytes`."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._writes.put((messages, done, loop, True))
        return await done

    async def journal(self, messages: list[OutboxMessage], wait_s: float) -> bool:
        """Handed to the operating system (write(2), fsync'd within `sync_every_s`), as `add`
        otherwise. False when the write took longer than `wait_s` (a stalled disk): the caller goes
        on, the write still lands. Raises OutboxFull past `max_bytes`."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._writes.put((messages, done, loop, False))
        try:
            await asyncio.wait_for(asyncio.shield(done), wait_s)
        except asyncio.TimeoutError:
            done.add_done_callback(_quietly)
            return False
        return True

    def _write_loop(self) -> None:
        last_sync = time.monotonic()
        while not self._stop.is_set() or not self._writes.empty():
            if self._unsynced and time.monotonic() - last_sync >= self.sync_every_s:
                self._sync_journal()
                last_sync = time.monotonic()
            try:
                work = [self._writes.get(timeout=min(0.1, self.sync_every_s))]
            except queue.Empty:
                continue
            while True:
                try:
                    work.append(self._writes.get_nowait())
                except queue.Empty:
                    break
            durable = any(sync for *_, sync in work)
            try:
                results = self._append([messages for messages, *_ in work], fsync=durable)
            except Exception as exc:  # noqa: BLE001 - every waiting caller learns of it
                results = [exc] * len(work)
            for (_, done, loop, _), result in zip(work, results):
                loop.call_soon_threadsafe(_settle, done, result)
        self._sync_journal()

    def _sync_journal(self) -> None:
        """fsync what `journal` wrote (the segments' files, opened again: the inode is what counts)."""
        with self._lock:
            paths, self._unsynced = self._unsynced, set()
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:  # every message confirmed and the segment deleted
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def _append(self, batches: list[list[OutboxMessage]], fsync: bool = True) -> list[set[str] | Exception]:
        """One write (and one fsync, unless a journal's) for all the batches; each batch all in, or
        OutboxFull."""
        results: list[set[str] | Exception] = []
        lines: list[bytes] = []
        with self._lock:
            room = self.max_bytes - self._pending_bytes
            segment = self._segment_for_writing()
            for batch in batches:
                new = [m for m in dict((m.id, m) for m in batch).values() if m.id not in self._pending]
                encoded = [m.model_dump_json().encode() + b"\n" for m in new]
                size = sum(len(e) for e in encoded)
                if size > room:
                    results.append(OutboxFull(f"outbox holds {self.max_bytes - room} of {self.max_bytes} bytes "
                                              "not yet confirmed by its consumer"))
                    continue
                room -= size
                for message, line in zip(new, encoded):
                    self._pending[message.id] = (message, segment, len(line))
                    self._pending_bytes += len(line)
                    self.last_sent[message.id] = message.added_at
                    segment.ids.add(message.id)
                lines += encoded
                results.append({m.id for m in new})
            if lines:
                blob = b"".join(lines)
                with open(segment.path, "ab") as f:
                    f.write(blob)
                    f.flush()
                    if fsync:
                        os.fsync(f.fileno())
                        self._unsynced.discard(segment.path)
                    else:
                        self._unsynced.add(segment.path)
                segment.bytes += len(blob)
        return results

    def _segment_for_writing(self) -> _Segment:
        if self._active is None or self._active.bytes > self.segment_bytes:
            seq = int(self._segments[-1].path.stem.split("-")[1]) + 1 if self._segments else 0
            self._active = _Segment(self.dir / f"out-{seq:012d}.jsonl")
            self._segments.append(self._active)
        return self._active

    # -- confirm, inspect ------------------------------------------------------------------------
    def confirm(self, ids: Iterable[str]) -> int:
        """The consumer has these stored: forget them (on disk first). Returns how many were pending."""
        with self._lock:
            by_segment: dict[int, list[str]] = {}
            for id_ in ids:
                entry = self._pending.get(id_)
                if entry is not None:
                    by_segment.setdefault(id(entry[1]), []).append(id_)
            segments = {id(s): s for s in self._segments}
            for key, confirmed in by_segment.items():
                segment = segments[key]
                with open(segment.done_path, "a") as f:
                    f.write("".join(f"{i}\n" for i in confirmed))
                    f.flush()
                    os.fsync(f.fileno())
                for id_ in confirmed:
                    segment.ids.discard(id_)
                    self._pending_bytes -= self._pending.pop(id_)[2]
                    self.last_sent.pop(id_, None)
            self._delete_finished()
            return sum(len(c) for c in by_segment.values())

    def withdraw(self, ids: Iterable[str]) -> int:
        """Not accepted after all (the caller answered an error): forgotten like confirmed ones."""
        return self.confirm(ids)

    def unconfirmed(self, sent_before: float) -> list[OutboxMessage]:
        """Pending messages last sent before `sent_before` (unix time), oldest first."""
        with self._lock:
            return sorted((m for m, _, _ in self._pending.values() if self.last_sent.get(m.id, 0) < sent_before),
                          key=lambda m: m.added_at)

    def mark_sent(self, ids: Iterable[str], at: float) -> None:
        with self._lock:
            for id_ in ids:
                if id_ in self._pending:
                    self.last_sent[id_] = at

    def close(self) -> None:
        self._stop.set()
        self._writer.join(10)


def _quietly(future: asyncio.Future) -> None:
    """A journal write nobody waits for any more: its error is logged, not left unretrieved."""
    if not future.cancelled() and future.exception() is not None:
        log.error("journal write failed after its caller went on: %s", future.exception())


def _settle(future: asyncio.Future, result: object) -> None:
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
