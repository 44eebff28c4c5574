"""Per-tenant training state: LoRA master weights (FP32), AdamW moments, step count, RNG state.

Idle tenants live in CPU memory (pinned when CUDA is present, so copies overlap); the tenant being
trained is copied onto the device for its step and copied back after it. Copies, never casts: a
round trip is bit-exact, and a step that fails on the device leaves the tenant's master state as it
was (the device copy is dropped).

The store is the one owner of every tenant's state, and of the lock that serialises changes to it.

State is checkpointed per training step (temp dir + rename: a checkpoint is whole or absent) with the
adapter in PEFT format beside it, and the latest checkpoint is restored after a restart.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clora.trainer.lora import LoRASpec, LoRAWeights, MultiLoRALinear, mismatch, new_weights, save_peft


@dataclass
class TenantState:
    customer: str
    weights: LoRAWeights
    exp_avg: list[torch.Tensor]  # AdamW first moments, in weights.tensors() order
    exp_avg_sq: list[torch.Tensor]
    step: int = 0
    rng: random.Random = field(default_factory=random.Random)
    published_version: int | None = None  # registry version this step's adapter was published as
    reward_baseline: float = 0.0  # running mean of rated answers' rewards (their advantages' baseline)
    adam_steps: int = 0  # AdamW updates (steps that carried a gradient): its bias correction's count

    def tensors(self) -> list[torch.Tensor]:
        return [*self.weights.tensors(), *self.exp_avg, *self.exp_avg_sq]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _copy_state(state: TenantState, device: torch.device, pin: bool) -> TenantState:
    def move(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(device, copy=True, non_blocking=True)
        return out.pin_memory() if pin else out

    weights = LoRAWeights(state.weights.spec, {n: move(t) for n, t in state.weights.a.items()},
                          {n: move(t) for n, t in state.weights.b.items()})
    return TenantState(state.customer, weights, [move(t) for t in state.exp_avg], [move(t) for t in state.exp_avg_sq],
                       state.step, state.rng, state.published_version, state.reward_baseline, state.adam_steps)


class AdapterStore:
    def __init__(self, root: Path, device: torch.device | str = "cpu", keep_checkpoints: int = 5):
        self.root = root
        self.device = torch.device(device)
        self.keep_checkpoints = keep_checkpoints
        self.pin = self.device.type == "cuda"
        self.tenants: dict[str, TenantState] = {}
        # Held while a tenant's weights change (optimizer step until published) and while a rollout
        # reads which version to sample: a rollout never pairs one version's name with other weights.
        self.locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def lock(self, customer: str) -> asyncio.Lock:
        return self.locks[customer]

    # -- life of a tenant ---------------------------------------------------------------------
    def create(self, customer: str, layers: dict[str, MultiLoRALinear], spec: LoRASpec, seed: int = 0) -> TenantState:
        """A new tenant: a fresh adapter (zero B: the base model)."""
        generator = torch.Generator().manual_seed(seed)
        weights = new_weights(layers, spec, generator)
        zeros = [torch.zeros_like(t) for t in weights.tensors()]
        state = TenantState(customer, weights, zeros, [torch.zeros_like(t) for t in zeros], rng=random.Random(seed))
        state = _copy_state(state, torch.device("cpu"), self.pin) if self.pin else state
        self.tenants[customer] = state
        return state

    def adopt(self, customer: str, start: LoRAWeights, version: int) -> str | None:
        """A new tenant's weights become `start`'s, the adapter published as `version`; why not, if
        its shape differs (the tenant then stays as it is)."""
        state = self.tenants[customer]
        reason = mismatch(state.weights, start)
        if reason is None:
            with torch.no_grad():
                for name in state.weights.a:
                    state.weights.a[name].copy_(start.a[name])
                    state.weights.b[name].copy_(start.b[name])
            state.published_version = version
        return reason

    def get(self, customer: str) -> TenantState | None:
        """In memory, else the latest checkpoint on disk, else None."""
        if customer not in self.tenants:
            restored = self.restore(customer)
            if restored is None:
                return None
            self.tenants[customer] = restored
        return self.tenants[customer]

    def swap_in(self, customer: str) -> TenantState:
        """A device copy of the tenant's state, its weights ready for gradients."""
        device_state = _copy_state(self.tenants[customer], self.device, pin=False)
        for t in device_state.weights.tensors():
            t.requires_grad_(True)
        return device_state

    def swap_out(self, device_state: TenantState) -> None:
        """Copy a device state back into the tenant's CPU tensors (after a successful step)."""
        host = self.tenants[device_state.customer]
        with torch.no_grad():
            for dst, src in zip(host.tensors(), device_state.tensors()):
                dst.copy_(src, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        host.step, host.rng, host.adam_steps = device_state.step, device_state.rng, device_state.adam_steps
        host.published_version, host.reward_baseline = device_state.published_version, device_state.reward_baseline

    # -- checkpoints --------------------------------------------------------------------------
    def _dir(self, customer: str) -> Path:
        return self.root / customer

    def checkpoint(self, customer: str, base_model: str) -> Path:
        """Write the tenant's state and its PEFT adapter as `step-<N>`: whole or not at all."""
        state = self.tenants[customer]
        parent = self._dir(customer)
        parent.mkdir(parents=True, exist_ok=True)
        target = parent / f"step-{state.step:08d}"
        if target.exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-"))
        tensors = {f"w.{k}": v for k, v in state.weights.state_dict().items()}
        tensors |= {f"m1.{i}": t for i, t in enumerate(state.exp_avg)}
        tensors |= {f"m2.{i}": t for i, t in enumerate(state.exp_avg_sq)}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        save_peft(state.weights, tmp / "adapter", base_model)
        self._write_meta(tmp, state)
        tmp.rename(target)
        self._prune(parent)
        return target

    def mark_published(self, customer: str, checkpoint: Path, version: int) -> None:
        """Record which registry version a checkpoint became (meta rewritten atomically)."""
        self.tenants[customer].published_version = version
        meta = json.loads((checkpoint / "meta.json").read_text())
        meta["published_version"] = version
        tmp = checkpoint / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.rename(checkpoint / "meta.json")

    @staticmethod
    def _write_meta(directory: Path, state: TenantState) -> None:
        spec = state.weights.spec
        rng_version, rng_internal, rng_gauss = state.rng.getstate()
        (directory / "meta.json").write_text(json.dumps({
            "customer": state.customer, "step": state.step, "published_version": state.published_version,
            "reward_baseline": state.reward_baseline, "adam_steps": state.adam_steps,
            "spec": {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)},
            "rng": [rng_version, list(rng_internal), rng_gauss]}))

    def _prune(self, parent: Path) -> None:
        for old in sorted(parent.glob("step-*"))[:-self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def discard_partial(self, customer: str) -> int:
        """Remove checkpoints a killed process left half-written (never renamed into place)."""
        partial = list(self._dir(customer).glob(".tmp-*"))
        for directory in partial:
            shutil.rmtree(directory, ignore_errors=True)
        return len(partial)

    def latest_checkpoint(self, customer: str) -> Path | None:
        found = sorted(self._dir(customer).glob("step-*"))
        return found[-1] if found else None

    def restore(self, customer: str) -> TenantState | None:
        checkpoint = self.latest_checkpoint(customer)
        if checkpoint is None:
            return None
        meta = json.loads((checkpoint / "meta.json").read_text())
        tensors = load_file(str(checkpoint / "state.safetensors"))
        spec = LoRASpec(rank=meta["spec"]["rank"], alpha=meta["spec"]["alpha"], targets=tuple(meta["spec"]["targets"]))
        weights = LoRAWeights(spec)
        for key, tensor in tensors.items():
            if key.startswith("w."):
                name, _, kind = key[2:].rpartition(".lora_")
                (weights.a if kind == "A" else weights.b)[name] = tensor
        count = len(weights.tensors())
        rng = random.Random()
        rng.setstate((meta["rng"][0], tuple(meta["rng"][1]), meta["rng"][2]))
        state = TenantState(customer, weights, [tensors[f"m1.{i}"] for i in range(count)],
                            [tensors[f"m2.{i}"] for i in range(count)], meta["step"], rng, meta["published_version"],
                            meta.get("reward_baseline", 0.0), meta.get("adam_steps", meta["step"]))
        return _copy_state(state, torch.device("cpu"), self.pin) if self.pin else state
