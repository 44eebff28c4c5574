"""Embedded services and child processes: persistence, clean stops, one-line start errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from clora.core.processes import ChildProcess, ServiceStartError, free_port
from clora.core.services import start_redis


def test_embedded_redis_keeps_data_across_restarts(tmp_path):
    first = start_redis(tmp_path / "data", tmp_path / "logs")
    redis.Redis.from_url(first.url).set("k", "v")
    first.stop()
    second = start_redis(tmp_path / "data", tmp_path / "logs")
    try:
        assert redis.Redis.from_url(second.url).get("k") == b"v"
    finally:
        second.stop()


def test_a_child_that_cannot_start_fails_with_a_one_line_cause(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServiceStartError) as info:
            start_redis(tmp_path / "data", tmp_path / "logs", port=port)
    message = str(info.value)
    assert "\n" not in message and "redis" in message and f"Failed listening on port {port}" in message


def test_stop_ends_the_whole_process_group(tmp_path):
    port = free_port()
    child = ChildProcess("sleeper", ["bash", "-c", f"sleep 300 & python3 -m http.server {port}"],
                         tmp_path / "sleeper.log").start()
    child.wait_for_port("127.0.0.1", port, timeout_s=20)
    pgid = child.pid
    child.stop(timeout_s=5)
    assert live_members(pgid) == []


def live_members(pgid: int) -> list[int]:
    """Processes of a group that are still running (zombies awaiting their reaper do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members
