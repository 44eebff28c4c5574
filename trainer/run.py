"""What `clora train` runs with: one frozen `TrainRun`, resolved once from the settings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from clora.core.settings import Settings, TrainerSettings


@dataclass(frozen=True)
class TrainRun:
    """What `clora train` runs with, resolved once: its settings section (`CLORA_TRAINER_*`), where
    the runtime is, and what the section's `auto` values resolved to on this machine."""

    section: TrainerSettings
    gateway_url: str
    redis_url: str
    admin_key: str
    model_dir: Path
    trainer_dir: Path  # tenants' states and checkpoints
    device: str  # cpu, cuda, cuda:N
    dtype: str  # of the base model: float32, bfloat16
    pass_tokens: int  # tokens per batched pass
    threads: int  # torch threads; 0: torch's default
    replay_capacity: int = 10_000
    served_base: str = "base"  # the base model's name on the server

    @classmethod
    def from_settings(cls, settings: Settings, *, gateway_url: str, redis_url: str, model_dir: str | Path,
                      admin_key: str) -> TrainRun:
        section = settings.trainer
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") \
            if section.device == "auto" else torch.device(section.device)
        dtype = section.dtype if section.dtype != "auto" else \
            "bfloat16" if device.type == "cuda" else settings.serving.dtype
        return cls(section, gateway_url, redis_url, admin_key, Path(model_dir), settings.trainer_dir, str(device),
                   dtype, pass_tokens=section.pass_tokens or (65536 if device.type == "cuda" else 512),
                   threads=section.threads or trainer_threads(device.type),
                   replay_capacity=settings.feedback.replay_capacity, served_base=settings.serving.served_base_name)


def trainer_threads(device_type: str) -> int:
    """CLORA_TRAINER_THREADS=0's choice: on CPU every core but the engine's (it computes on one);
    on 2 cores a second torch thread slowed the engine and the trainer alike (engine 62.8 -> 93.2 s,
    trainer 94.8 -> 124.3 s on a fixed co-located workload: benchmarks/results/trainer_threads.json).
    On a GPU the trainer's CPU threads hardly compute: torch's default (0)."""
    return max(1, (os.cpu_count() or 2) - 1) if device_type == "cpu" else 0


