"""LoRA for many tenants on one frozen base model.

Every targeted `nn.Linear` of the base model is wrapped by a `MultiLoRALinear`: one base matmul over
all rows of the batch, then each tenant's rows through that tenant's own A and B. The tenants'
tensors live outside the model (in the AdapterStore); before a pass, `bind` says which tenant's
tensors serve which rows. Same rows through the same tensors give the same numbers whether a tenant
runs alone or batched with others, so one pass yields every tenant's gradients.

Adapters are saved in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), which
is what vLLM loads.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from clora.wire.trainer_config import DEFAULT_TARGETS, TenantConfig

PEFT_PREFIX = "base_model.model."
STACKED_DEVICES = {"cuda"}  # where equal tenant segments use batched matmuls (see _stacked_delta)


@dataclass(frozen=True)
class LoRASpec:
    """Shape of one tenant's adapter."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec_of(config: TenantConfig) -> LoRASpec:
    """The adapter shape a tenant's configuration asks for."""
    return LoRASpec(rank=config.rank, alpha=config.alpha, targets=tuple(config.targets))


@dataclass
class LoRAWeights:
    """One tenant's adapter tensors: for each wrapped module name, A [rank, in] and B [out, rank]."""

    spec: LoRASpec
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        """A stable order (module name, then A before B): optimizer state lists follow it."""
        return [t for name in sorted(self.a) for t in (self.a[name], self.b[name])]

    def copy(self, device: torch.device | str | None = None) -> LoRAWeights:
        """Detached copies of the tensors (on `device`, else where they are)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device or t.device, copy=True)

        return LoRAWeights(self.spec, {n: move(t) for n, t in self.a.items()}, {n: move(t) for n, t in self.b.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"{n}.lora_A": t for n, t in self.a.items()}, **{f"{n}.lora_B": t for n, t in self.b.items()}}


@dataclass
class Segment:
    """Rows [start, stop) of the batch go through `weights` (None: the base model alone)."""

    start: int
    stop: int
    weights: LoRAWeights | None


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.segments: list[Segment] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.segments:
            return y
        if len(self.segments) == 1 and self.segments[0].start == 0 and self.segments[0].stop >= x.shape[0]:
            return y + self._delta(x, self.segments[0].weights)  # one tenant: no slicing
        stacked = self._stacked_delta(x) if x.device.type in STACKED_DEVICES else None
        if stacked is not None:
            return y + stacked
        # split/cat, not slicing: a slice's backward writes into a zero tensor the size of x, per
        # segment; split's backward is one cat.
        pieces = self._cover(x.shape[0])
        parts = x.split([stop - start for start, stop, _ in pieces], dim=0)
        return y + torch.cat([self._delta(part, weights) for part, (_, _, weights) in zip(parts, pieces)], dim=0)

    def _cover(self, rows: int) -> list[tuple[int, int, LoRAWeights | None]]:
        """The bound segments plus base-model pieces for any rows between or after them."""
        pieces, at = [], 0
        for s in sorted(self.segments, key=lambda s: s.start):
            start, stop = max(s.start, at), min(s.stop, rows)
            if start > at:
                pieces.append((at, start, None))
            if stop > start:
                pieces.append((start, stop, s.weights))
                at = stop
        if at < rows:
            pieces.append((at, rows, None))
        return pieces

    def _delta(self, x: torch.Tensor, weights: LoRAWeights | None) -> torch.Tensor:
        if weights is None:
            return x.new_zeros(*x.shape[:-1], self.base.out_features)
        a, b = weights.a[self.name], weights.b[self.name]
        return (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t() * weights.spec.scale

    def _stacked_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """Equal segments of same-rank tenants: two batched matmuls instead of two per tenant (fewer
        kernel launches on a GPU; on this CPU it measured slower than per-segment matmuls)."""
        segs = self.segments
        size = segs[0].stop - segs[0].start
        if any(s.weights is None or s.stop - s.start != size or s.weights.spec.rank != segs[0].weights.spec.rank
               for s in segs) or segs[-1].stop != x.shape[0]:
            return None
        a = torch.stack([s.weights.a[self.name] for s in segs]).to(x.dtype)  # [N, r, in]
        b = torch.stack([s.weights.b[self.name] for s in segs]).to(x.dtype)  # [N, out, r]
        scale = torch.tensor([s.weights.spec.scale for s in segs], dtype=x.dtype, device=x.device)
        xs = x.reshape(len(segs), -1, x.shape[-1])  # [N, rows*tokens, in]
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * scale[:, None, None]
        return delta.reshape(*x.shape[:-1], self.base.out_features)


Layers = dict[str, "MultiLoRALinear"]  # the model's LoRA-wrapped projections, by module name


def inject(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, MultiLoRALinear]:
    """Wrap every targeted Linear (frozen base weights); returns the wrappers by module name."""
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped: dict[str, MultiLoRALinear] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                wrapper = MultiLoRALinear(child, full)
                setattr(module, child_name, wrapper)
                wrapped[full] = wrapper
    if not wrapped:
        raise ValueError(f"no Linear modules named {targets} in the model")
    return wrapped


@contextlib.contextmanager
def bind(layers: dict[str, MultiLoRALinear], segments: list[Segment]) -> Iterator[None]:
    """Rows -> tenants for the passes inside the block (forward and the backward of its graph)."""
    for layer in layers.values():
        layer.segments = [s for s in segments if s.weights is None or layer.name in s.weights.a] or []
    try:
        yield
    finally:
        for layer in layers.values():
            layer.segments = []


def new_weights(layers: dict[str, MultiLoRALinear], spec: LoRASpec, generator: torch.Generator,
                init_b_zero: bool = True) -> LoRAWeights:
    """Kaiming-uniform A and zero B (the adapter starts as the base model), as PEFT does."""
    weights = LoRAWeights(spec)
    for name, layer in layers.items():
        if name.rsplit(".", 1)[-1] not in spec.targets:
            continue
        base = layer.base
        bound = 1.0 / (base.in_features ** 0.5)
        weights.a[name] = (torch.rand(spec.rank, base.in_features, generator=generator) * 2 - 1) * bound
        weights.b[name] = (torch.zeros(base.out_features, spec.rank) if init_b_zero
                           else (torch.rand(base.out_features, spec.rank, generator=generator) * 2 - 1) * bound)
    return weights


def save_peft(weights: LoRAWeights, out_dir: Path, base_model: str) -> None:
    """PEFT's on-disk format, as vLLM's `load_lora_adapter` expects."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in weights.a:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = weights.a[name].detach().float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = weights.b[name].detach().float().cpu().contiguous()
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = LoraConfig(r=weights.spec.rank, lora_alpha=weights.spec.alpha, target_modules=list(weights.spec.targets),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    config.save_pretrained(str(out_dir))


def load_peft(adapter_dir: Path) -> LoRAWeights:
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    targets = config["target_modules"]
    spec = LoRASpec(rank=config["r"], alpha=float(config["lora_alpha"]),
                    targets=tuple(sorted(targets)) if isinstance(targets, list) else (targets,))
    weights = LoRAWeights(spec)
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        name, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        (weights.a if kind.startswith("A") else weights.b)[name] = tensor.float()
    return weights


def mismatch(weights: LoRAWeights, other: LoRAWeights) -> str | None:
    """Why `other` cannot stand in for `weights` (shape, scale, modules), or None if it can."""
    a, b = weights.spec, other.spec
    if (a.rank, a.alpha, sorted(a.targets)) != (b.rank, b.alpha, sorted(b.targets)):
        return (f"rank {b.rank}, alpha {b.alpha}, targets {sorted(b.targets)} where the config asks for rank "
                f"{a.rank}, alpha {a.alpha}, targets {sorted(a.targets)}")
    if set(weights.a) != set(other.a) or set(weights.b) != set(other.b):
        return "different modules"
    for name in weights.a:
        if weights.a[name].shape != other.a[name].shape or weights.b[name].shape != other.b[name].shape:
            return f"module {name} has another shape"
    return None
