"""In each process vLLM spawns from a process hosting the engine (its engine core, its workers).

multiprocessing's spawn imports the parent's main module before it runs the target, so the
CLI's main module calls `become_engine_child` first thing when `spawned_for_engine()`; the code
lives here, with the rest of the engine. Standard library only: it runs before anything else.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time


def spawned_for_engine() -> bool:
    """Whether this process is one vLLM spawned from a process hosting the engine, now importing
    its parent's main module (multiprocessing's spawn does that before running the target)."""
    return bool(os.environ.get("CLORA_ENGINE_LOG")) and getattr(multiprocessing.current_process(), "_inheriting", False)


def become_engine_child() -> None:
    """In a process vLLM spawned from us (its engine core, its workers): output to the engine log,
    own process group (Ctrl-C reaches us, we stop the engine in order), and exit when the process
    that spawned it is gone, even by SIGKILL. A thread watches the parent rather than
    PR_SET_PDEATHSIG, which fires when the spawning *thread* ends (we spawn from a worker thread)."""
    log_path = os.environ.get("CLORA_ENGINE_LOG")
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    os.setpgid(0, 0)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # vLLM's handler shuts down its own children
        time.sleep(10)
        os._exit(1)

    threading.Thread(target=watch, name="clora-parent-watch", daemon=True).start()
