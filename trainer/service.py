"""The trainer as a long-running service: `clora train` (alone, or as a child of `clora serve`).

Each round: back off while serving is saturated, ask the scheduler who trains, run one step for
them. A failed multi-tenant step is retried tenant by tenant, so one failing tenant is found and
backed off while the others' steps land.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import torch

from clora.core.customers import CustomerStore
from clora.trainer.config import TenantConfig
from clora.trainer.loop import Trainer
from clora.trainer.scheduler import Candidate, Scheduler

log = logging.getLogger("clora.trainer")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_trainer_model(model_dir: Path, device: torch.device):
    """The base model, loaded once and frozen, with every target projection LoRA-wrapped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clora.trainer.lora import inject

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, inject(model), AutoTokenizer.from_pretrained(model_dir)


class TrainingService:
    def __init__(self, trainer: Trainer, scheduler: Scheduler, customers: CustomerStore, idle_s: float = 5.0,
                 max_inflight: int = 64):
        self.trainer, self.scheduler, self.customers = trainer, scheduler, customers
        self.idle_s, self.max_inflight = idle_s, max_inflight

    async def candidates(self) -> list[Candidate]:
        configs = await self.trainer.configs.all()
        out = []
        for customer in [c.name for c in await self.customers.list()]:
            config = configs.get(customer) or TenantConfig()
            if config.environment and config.weights.onpolicy:
                work = 1.0
            else:
                new = await self.trainer.pending(customer)
                work = new / config.records_per_step if new >= config.min_records else 0.0
            out.append(Candidate(customer, work, config.priority))
        return out

    async def recover(self) -> None:
        """Publish any checkpoint a previous run wrote but did not get to publish."""
        root = self.trainer.store.root
        for directory in sorted(root.iterdir()) if root.exists() else []:
            if directory.is_dir():
                await self.trainer.recover(directory.name)

    async def run(self, stop: asyncio.Event) -> None:
        await self.recover()
        while not stop.is_set():
            load = await self.trainer.client.load()
            chosen = [] if load["requests_in_flight"] > self.max_inflight or not load["engine_ready"] \
                else self.scheduler.pick(await self.candidates())
            if not chosen:
                try:
                    await asyncio.wait_for(stop.wait(), self.idle_s)
                except asyncio.TimeoutError:
                    pass
                continue
            await self.train(chosen)

    async def train(self, customers: list[str]) -> None:
        try:
            reports = await self.trainer.step(customers)
        except Exception:  # noqa: BLE001 - a tenant's failure must not stop the trainer
            if len(customers) == 1:
                delay = self.scheduler.failed(customers[0])
                log.exception("customer %s: step failed; backing off %.0f s", customers[0], delay)
                return
            log.exception("step for %d tenants failed; retrying each alone", len(customers))
            for customer in customers:
                await self.train([customer])
            return
        for report in reports:
            self.scheduler.succeeded(report.customer)
            reward = f"{report.mean_reward:.3f}" if report.mean_reward is not None else "-"
            log.info("customer %s: step %d -> %s (reward %s, %d rated, %d corrections, %.1f s)", report.customer,
                     report.step, report.version, reward, report.rated, report.corrections, report.seconds)
