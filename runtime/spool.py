"""A bounded on-disk queue for Kafka messages that could not be sent, and the dead letters.

Segments are JSON-lines files, fsync'd per append. Draining reads a segment, the caller sends
its messages, and each line it is done with (acknowledged, or refused for good and dead-lettered)
is recorded in a sidecar (`.acked`, fsync'd) before the segment is deleted; a crash mid-drain
therefore resends only the lines not done with.

Dead letters are messages the broker refuses whatever the retries (over its size limit, invalid):
kept with the reason in `dead-letters.jsonl` next to the segments, never blocking the ones behind.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

log = logging.getLogger("clora.spool")
SEGMENT_BYTES = 4 << 20


@dataclass(frozen=True)
class SpooledMessage:
    topic: str
    key: bytes
    value: bytes

    def encode(self) -> bytes:
        return json.dumps({"t": self.topic, "k": base64.b64encode(self.key).decode(),
                           "v": base64.b64encode(self.value).decode()}).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> "SpooledMessage":
        raw = json.loads(line)
        return cls(raw["t"], base64.b64decode(raw["k"]), base64.b64decode(raw["v"]))


# Sends messages; returns the indices (into its argument) done with: acknowledged by the broker,
# or refused for good and dead-lettered.
SendFn = Callable[[list[SpooledMessage]], set[int]]


class DeadLetter(BaseModel):
    at: float
    reason: str
    topic: str
    key_b64: str
    value_b64: str
    size: int


class DeadLetters:
    """Messages the broker refused for good, with the reason (JSON lines, fsync'd per add)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def add(self, message: SpooledMessage, reason: str) -> None:
        self.add_raw(DeadLetter(at=time.time(), reason=reason, topic=message.topic,
                                key_b64=base64.b64encode(message.key).decode(),
                                value_b64=base64.b64encode(message.value).decode(), size=len(message.value)))

    def add_raw(self, letter: DeadLetter, reason: str | None = None) -> None:
        letter = letter.model_copy(update={"reason": reason}) if reason else letter
        log.error("dead letter: %d-byte record for %s refused (%s)", letter.size, letter.topic, letter.reason)
        with self._lock, open(self.path, "ab") as f:
            f.write(letter.model_dump_json().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[DeadLetter]:
        if not self.path.exists():
            return []
        return [DeadLetter.model_validate_json(line) for line in self.path.read_bytes().splitlines() if line]


class Spool:
    def __init__(self, directory: Path, max_bytes: int):
        self.dir = directory
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._active: Path | None = None
        self.dropped = 0
        self.dead = DeadLetters(directory / "dead-letters.jsonl")

    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.jsonl"))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._segments())

    def pending(self) -> bool:
        return bool(self._segments())

    def append(self, messages: Iterable[SpooledMessage]) -> int:
        """Persist messages; returns how many were dropped because the spool is full."""
        data = [m.encode() for m in messages]
        with self._lock:
            room = self.max_bytes - self.size_bytes()
            kept = []
            for line in data:
                if len(line) > room:
                    break
                kept.append(line)
                room -= len(line)
            dropped = len(data) - len(kept)
            if dropped:
                self.dropped += dropped
                log.error("capture spool full (%d bytes): dropped %d records", self.max_bytes, dropped)
            if kept:
                self._write(b"".join(kept))
            return dropped

    def _write(self, blob: bytes) -> None:
        if self._active is None or not self._active.exists() or self._active.stat().st_size > SEGMENT_BYTES:
            existing = self._segments()
            seq = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
            self._active = self.dir / f"seg-{seq:012d}.jsonl"
        with open(self._active, "ab") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

    def drain(self, send: SendFn, max_messages: int = 2_000) -> tuple[int, bool]:
        """Send up to max_messages from the oldest segments; returns (sent, complete)."""
        sent = 0
        for segment in self._segments():
            with self._lock:
                if segment == self._active:
                    self._active = None  # seal it: new appends go to a fresh segment
            acked_file = segment.with_suffix(".acked")
            acked = _read_acked(acked_file)
            lines = segment.read_bytes().splitlines()
            todo = [i for i in range(len(lines)) if i not in acked][: max_messages - sent]
            if todo:
                ok = send([SpooledMessage.decode(lines[i]) for i in todo])
                newly = [todo[j] for j in sorted(ok)]
                _append_acked(acked_file, newly)
                sent += len(newly)
                if len(newly) < len(todo):
                    return sent, False  # broker trouble: stop, keep the rest for later
                acked.update(newly)
            if len(acked) >= len(lines):
                segment.unlink()
                acked_file.unlink(missing_ok=True)
            if sent >= max_messages:
                return sent, not self.pending()
        return sent, True


def _read_acked(path: Path) -> set[int]:
    if not path.exists():
        return set()
    return {int(x) for x in path.read_text().split()}


def _append_acked(path: Path, indices: list[int]) -> None:
    if not indices:
        return
    with open(path, "a") as f:
        f.write("".join(f"{i}\n" for i in indices))
        f.flush()
        os.fsync(f.fileno())
