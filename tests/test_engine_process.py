"""The engine's processes. Those vLLM spawns from `clora serve` (its engine core, which spawns its
worker) are started by multiprocessing's spawn, not by us: they must still log to the engine log,
keep out of Ctrl-C's process group, and exit when `clora serve` is SIGKILLed. Here a parent whose
main module imports clora.cli.main (as the `clora` console script does) spawns a child the way vLLM
does. And an engine that cannot start says why in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
PARENT = """
import multiprocessing, sys, time
import clora.cli.main  # noqa: F401  the `clora` script's main module imports it; so does every spawned child

def engine_core():
    print("engine core output", flush=True)
    time.sleep(120)

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=engine_core)
    child.start()
    print(child.pid, flush=True)
    time.sleep(120)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_spawned_engine_process_logs_to_the_engine_log_and_dies_with_clora(tmp_path):
    script = tmp_path / "serve_like.py"
    script.write_text(PARENT)
    log = tmp_path / "vllm.log"
    env = {**os.environ, "CLORA_ENGINE_LOG": str(log)}
    parent = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 60
        while "engine core output" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the child's output never reached the engine log"
            time.sleep(0.1)
        assert os.getpgid(child) == child != os.getpgid(parent.pid)  # Ctrl-C to our group does not reach it
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while not gone(child):
            assert time.monotonic() < deadline, "the engine child outlived a SIGKILLed parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, NameError):
            pass


def test_a_process_we_start_ourselves_is_not_taken_for_an_engine_child(tmp_path):
    """The trainer inherits CLORA_ENGINE_LOG from `clora serve` but is not spawned by vLLM: its
    output stays its own."""
    log = tmp_path / "vllm.log"
    env = {**os.environ, "CLORA_ENGINE_LOG": str(log)}
    out = subprocess.run([sys.executable, "-c", "import clora.cli.main; print('trainer output')"], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    assert "trainer output" in out.stdout
    assert not log.exists()


ENGINE_THAT_CANNOT_START = """
import asyncio, sys
from pathlib import Path
from clora.runtime.engine.manager import EngineManager
from clora.runtime.engine.config import EngineConfig
from clora.core.processes import ServiceStartError

async def main():
    home = Path(sys.argv[1])
    manager = EngineManager(EngineConfig(model=str(home / "model"), log_dir=home, cache_dir=home))
    try:
        await manager.start()
    except ServiceStartError as exc:
        print(exc)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_an_engine_that_cannot_start_fails_with_a_one_line_cause(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    script = tmp_path / "start.py"
    script.write_text(ENGINE_THAT_CANNOT_START)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], env={**os.environ},
                         capture_output=True, text=True, timeout=300)
    message = out.stdout.strip()
    assert message.startswith("vllm failed to start:") and "\n" not in message, out.stdout + out.stderr
    assert "no-such-architecture" in message and str(tmp_path / "vllm.log") in message
