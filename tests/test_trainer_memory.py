"""The trainer's host-memory policy (trainer/loop.py): activations come from the heap (no fresh,
zero-filled mmap per allocation), and what a step freed goes back to the system between steps.
Each check runs in a fresh interpreter: mallopt changes the whole process's allocator."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("glibc's allocator only", allow_module_level=True)

# A step: 48 blocks of 8 MB (activations, below the 32 MB threshold) touched and freed, while a
# 1 MB block allocated after each lives on (the trainer's heap always has survivors between freed
# activations, so glibc cannot hand the space back by shrinking the heap's top). Reports the page
# faults of a second step, and resident memory before and after the trim.
PROBE = """
import ctypes, json, resource, sys
import psutil
from clora.trainer.model import fix_mmap_threshold, return_freed_host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "policy":
    fix_mmap_threshold()
elif sys.argv[1] == "fixed-128k":
    libc.mallopt(-3, 128 * 1024)
survivors = []
def step():
    blocks = []
    for _ in range(48):
        blocks.append(libc.malloc(8 << 20))
        survivors.append(libc.malloc(1 << 20))
    for b in blocks:
        ctypes.memset(b, 1, 8 << 20)  # touched, as activations are
    for b in reversed(blocks):
        libc.free(b)
step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
held = psutil.Process().memory_info().rss
return_freed_host_memory()
print(json.dumps({"faults": faults, "held_mb": held / 2**20, "after_trim_mb": psutil.Process().memory_info().rss / 2**20}))
"""


def probe(setting: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_steps_activations_reuse_the_heap_instead_of_faulting_in_fresh_pages():
    # The earlier policy (a 128 KB threshold: every block mmapped, faulted in again each step)
    # against the trainer's: the second step reuses the heap's pages.
    earlier, policy = probe("fixed-128k"), probe("policy")
    step_pages = 48 * (8 << 20) // 4096
    assert earlier["faults"] > step_pages / 2, earlier
    assert policy["faults"] < step_pages / 4, policy  # the survivors' own pages only


def test_what_a_step_freed_is_returned_between_steps():
    policy = probe("policy")
    assert policy["held_mb"] - policy["after_trim_mb"] > 300, policy
