"""The base model in the trainer's memory: loaded once, frozen, LoRA-wrapped; and the host memory
policy that keeps a long-running trainer's heap from growing (glibc's mmap threshold, trimmed
between steps)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import nn

from clora.trainer.lora import Layers, inject

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed; blocks above it (logits chunks) are mmapped


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold() -> None:
    """Activations from the heap, at a threshold glibc will not move. glibc raises its mmap
    threshold to the size of each large block freed, after which the heap fragments and keeps
    what it holds (a 20-step agent RL run was OOM-killed at 20 GB). Fixing it low (128 KB, the
    earlier policy) kept memory down but made every activation a fresh mmap, faulted in and
    zeroed page by page: 6.0M page faults and 8 s of system time in a 21 s step (SmolLM2-135M,
    bfloat16, one tenant's two agent groups). Fixed at 32 MB, with the heap trimmed after each
    step (`return_freed_host_memory`): 0.5-1.2M faults, 14-16 s, 1.5 GB resident between steps,
    peak 4.8-5.0 GB (benchmarks/trainer_memory.py). No-op where glibc is absent."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (setting it also stops glibc moving it)


def return_freed_host_memory() -> None:
    """The heap's free pages back to the system (every arena), between steps: what a step's
    activations took is not held while the trainer waits, and the next step's heap is warm only
    where it is still in use."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def load_model(model_dir: Path, device: str, dtype: str = "float32") -> tuple[nn.Module, Layers, object]:
    """The base model, loaded once and frozen, in `dtype`, with every target projection LoRA-wrapped
    (adapters stay float32: the LoRA matmuls cast them; logprobs are float32 whatever the dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fix_mmap_threshold()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    return model, inject(model), AutoTokenizer.from_pretrained(model_dir)


