"""Grouped LoRA matrix work on CPU: one GEMM per adapter in the batch, not one einsum per token.

vLLM 0.32's CPU ops (`vllm/lora/ops/torch_ops`) gather a per-token copy of the whole LoRA matrix
(`weights[indices]`: tokens x out x in) and run a per-token einsum, in every target module of every
layer, at every decode step. Here the batch's rows are grouped by adapter slot once per step
(`TokenGroups`, when vLLM updates its LoRA mapping), and each op does one GEMM per group:

- one adapter for every row: the slot's matrices applied to the whole batch in place;
- any other mix: the rows that have an adapter are gathered in slot order once, each slot's run of
  rows is one GEMM, and the results are added back in one scatter.

A packed layer (qkv: three slices; gate_up: two) goes further (`linear`): all slices' A matrices
stacked into one shrink GEMM per slot, and their B matrices laid out block-diagonally for one expand
GEMM per slot into the layer's whole output. On a CPU decode step each torch call costs ~10-20 us
here, as much as a rank-16 GEMM's arithmetic, so fewer calls matter as much as fewer FLOPs. Those
layouts are copies of vLLM's weights made once per slot and kept until the weights change
(`_Layer`: tensor version counters, which vLLM's in-place slot loads bump).

Rows whose slot is -1 (no adapter) get no LoRA term and are left as they are. vLLM's torch ops index
slot -1 as the *last* slot, so there a base-model row picks up whichever adapter sits in the last
slot once every slot is in use (tests/test_lora_ops.py shows it); this module does what vLLM's GPU
kernels do and skips them.

Pure torch, no vLLM: the vLLM side (`punica.py`) calls these from its punica wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenGroups:
    """The batch's rows grouped by the adapter slot that serves them.

    For a mixed batch, the rows with an adapter are laid out slot by slot in a (slots, longest run)
    grid (`grid_rows`, padded with row 0), so every slot's GEMM is one batched GEMM (`torch.bmm`);
    `grid_kept` picks the real rows back out of the grid, in the order of `order`."""

    n_rows: int
    single: int | None  # the one slot every row uses, if there is one
    order: torch.Tensor  # rows with an adapter, sorted by slot (stable)
    runs: tuple[tuple[int, int, int], ...]  # (slot, start, stop) into `order`
    present: tuple[int, ...]  # the slots in the batch, ascending
    grid_rows: torch.Tensor  # (len(present) * longest,) rows of x, slot by slot
    grid_kept: torch.Tensor | None  # positions of `order`'s rows in the grid; None: the grid is `order`

    @classmethod
    def of(cls, slots: torch.Tensor) -> "TokenGroups":
        """From a per-row slot vector (vLLM's `token_lora_indices` or `sampler_indices`; -1: none)."""
        slots = slots.reshape(-1)
        rows = torch.nonzero(slots >= 0).reshape(-1)
        by_slot, within = torch.sort(slots[rows], stable=True)
        order = rows[within]
        present, counts = torch.unique_consecutive(by_slot, return_counts=True)
        runs, start = [], 0
        for slot, count in zip(present.tolist(), counts.tolist()):
            runs.append((int(slot), start, start + count))
            start += count
        single = runs[0][0] if len(runs) == 1 and start == slots.numel() else None
        longest = max((stop - begin for _, begin, stop in runs), default=0)
        grid_rows = torch.zeros(len(runs) * longest, dtype=torch.long)
        kept = []
        for index, (_, begin, stop) in enumerate(runs):
            grid_rows[index * longest:index * longest + stop - begin] = order[begin:stop]
            kept += range(index * longest, index * longest + stop - begin)
        grid_kept = None if len(kept) == len(grid_rows) else torch.tensor(kept, dtype=torch.long)
        return cls(int(slots.numel()), single, order, tuple(runs), tuple(s for s, _, _ in runs), grid_rows, grid_kept)

    @classmethod
    def empty(cls) -> "TokenGroups":
        return cls.of(torch.empty(0, dtype=torch.long))

    @property
    def no_lora(self) -> bool:
        """No row has an adapter: every op is a no-op."""
        return not self.runs

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """x's rows with an adapter as (slots, longest run, features)."""
        return x.index_select(0, self.grid_rows).view(len(self.present), -1, x.shape[-1])

    def kept(self, grid: torch.Tensor) -> torch.Tensor:
        """The real rows of a (slots, longest run, features) result, in the order of `order`."""
        flat = grid.reshape(-1, grid.shape[-1])
        return flat if self.grid_kept is None else flat.index_select(0, self.grid_kept)


class _Layer:
    """One LoRA layer's weights laid out for our GEMMs; rebuilt when vLLM writes new ones.

    `lora_a`/`lora_b` are vLLM's stacked tensors (slots, 1, out, in), one per slice of a packed
    layer (either may be empty: a shrink or an expand alone). vLLM loads an adapter into a slot with
    in-place copies, which bump the tensors' version counters: a changed version drops every layout
    made from the old weights."""

    __slots__ = ("lora_a", "lora_b", "widths", "versions", "shrinks", "expands")

    def __init__(self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], widths: tuple[int, ...]):
        self.lora_a, self.lora_b, self.widths = lora_a, lora_b, widths
        self.versions: list[int] = []
        self.shrinks: dict[int | tuple[int, ...], torch.Tensor] = {}
        self.expands: dict[int | tuple[int, ...], torch.Tensor] = {}

    def fresh(self) -> "_Layer":
        versions = [t._version for t in self.lora_a] + [t._version for t in self.lora_b]
        if versions != self.versions:
            self.versions, self.shrinks, self.expands = versions, {}, {}
        return self

    def shrink_matrix(self, slots: int | tuple[int, ...]) -> torch.Tensor:
        """(in, slices*rank) float32: a slot's A of every slice side by side, transposed; for a
        tuple of slots, those stacked: (slots, in, slices*rank)."""
        matrix = self.shrinks.get(slots)
        if matrix is None:
            if isinstance(slots, tuple):
                matrix = torch.stack([self.shrink_matrix(slot) for slot in slots])
            else:
                matrix = torch.cat([_slot(a, slots) for a in self.lora_a], dim=0).float().t().contiguous()
            self.shrinks[slots] = matrix
        return matrix

    def expand_matrix(self, slots: int | tuple[int, ...]) -> torch.Tensor:
        """(slices*rank, sum(widths)) float32: a slot's B^T of every slice on a block diagonal; for
        a tuple of slots, those stacked: (slots, slices*rank, sum(widths))."""
        matrix = self.expands.get(slots)
        if matrix is None:
            if isinstance(slots, tuple):
                matrix = torch.stack([self.expand_matrix(slot) for slot in slots])
            else:
                rank = self.lora_b[0].shape[-1]
                matrix = torch.zeros(len(self.lora_b) * rank, sum(self.widths))
                column = 0
                for index, (b, width) in enumerate(zip(self.lora_b, self.widths)):
                    matrix[index * rank:(index + 1) * rank, column:column + width] = _slot(b, slots)[:width].t()
                    column += width
            self.expands[slots] = matrix
        return matrix


class _Layers:
    """The `_Layer` of each LoRA layer, by the identity of vLLM's (persistent) weight tensors."""

    def __init__(self) -> None:
        self._layers: dict[tuple, _Layer] = {}

    def of(self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], widths: tuple[int, ...]) -> _Layer:
        key = (*map(id, lora_a), None, *map(id, lora_b), widths)
        layer = self._layers.get(key)
        if layer is None or any(a is not b for a, b in zip(layer.lora_a + layer.lora_b, lora_a + lora_b)):
            layer = self._layers[key] = _Layer(lora_a, lora_b, widths)
        return layer.fresh()


LAYERS = _Layers()


def _slot(weights: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot's (out x in) matrix from vLLM's stacked (slots, 1, out, in) or (slots, out, in)."""
    return weights[slot, 0] if weights.dim() == 4 else weights[slot]


def _float(x: torch.Tensor, rows: int) -> torch.Tensor:
    x = x if x.shape[0] == rows else x[:rows]
    return x if x.dtype == torch.float32 else x.float()


def shrink(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, groups: TokenGroups, scale: float) -> None:
    """out[row, :rank] = scale * x[row] @ A[slot(row)]^T for rows with an adapter (vLLM's shrink).

    In float32, as vLLM's ops (its buffers are float32)."""
    if groups.no_lora:
        return
    rank = lora_a.shape[-2]
    layer = LAYERS.of((lora_a,), (), ())
    x = _float(x, groups.n_rows)
    if groups.single is not None:
        product = torch.mm(x, layer.shrink_matrix(groups.single))
    else:
        product = groups.kept(torch.bmm(groups.grid(x), layer.shrink_matrix(groups.present)))
    if scale != 1.0:
        product = product * scale
    if groups.single is not None:
        out[:groups.n_rows, :rank] = product
    else:
        out[:, :rank].index_copy_(0, groups.order, product.to(out.dtype))


def expand(out: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, groups: TokenGroups,
           offset: int, size: int, add_inputs: bool) -> None:
    """out[row, offset:offset+size] (+)= x[row] @ B[slot(row)]^T for rows with an adapter.

    `size` is clipped to what the weights and `out` have (an adapter's padded vocabulary and the
    model's may differ, as vLLM's own expand allows)."""
    if groups.no_lora:
        return
    width = min(size, lora_b.shape[-2], out.shape[1] - offset)
    target = out[:, offset:offset + width]
    layer = LAYERS.of((), (lora_b,), (width,))
    x = _float(x, groups.n_rows)[:, :lora_b.shape[-1]]
    if groups.single is not None:
        b = layer.expand_matrix(groups.single)
        if add_inputs and out.dtype == torch.float32:
            target[:groups.n_rows].addmm_(x, b)
        elif add_inputs:
            target[:groups.n_rows] += torch.mm(x, b).to(out.dtype)
        else:
            target[:groups.n_rows] = torch.mm(x, b)
        return
    delta = groups.kept(torch.bmm(groups.grid(x), layer.expand_matrix(groups.present))).to(out.dtype)
    if add_inputs:
        target.index_add_(0, groups.order, delta)
    else:
        target.index_copy_(0, groups.order, delta)


def linear(out: torch.Tensor, x: torch.Tensor, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...],
           widths: tuple[int, ...], groups: TokenGroups, scale: float) -> None:
    """out[row, slice s] += scale * x[row] A_s[slot]^T B_s[slot]^T for every slice of a layer.

    Two GEMMs for all slices together (A side by side, B block-diagonal): plain ones when one
    adapter serves every row, batched over the batch's slots otherwise. vLLM's path is a shrink and
    an expand per slice, each a per-token einsum. In float32, as vLLM's ops."""
    if groups.no_lora:
        return
    widths = tuple(widths)
    if out.shape[1] != sum(widths):  # not a packed layer's whole output: slice by slice
        shrunk = torch.zeros((groups.n_rows, lora_b[0].shape[-1]), dtype=torch.float32)
        offset = 0
        for a, b, width in zip(lora_a, lora_b, widths):
            shrink(shrunk, x, a, groups, scale)
            expand(out, shrunk, b, groups, offset, width, add_inputs=True)
            offset += width
        return
    layer = LAYERS.of(tuple(lora_a), tuple(lora_b), widths)
    x = _float(x, groups.n_rows)
    if groups.single is not None:
        shrunk = torch.mm(x, layer.shrink_matrix(groups.single))
        if scale != 1.0:
            shrunk.mul_(scale)
        if out.dtype == torch.float32:  # the expand GEMM adds into the output in place
            (out if out.shape[0] == groups.n_rows else out[:groups.n_rows]).addmm_(
                shrunk, layer.expand_matrix(groups.single))
        else:
            out[:groups.n_rows] += torch.mm(shrunk, layer.expand_matrix(groups.single)).to(out.dtype)
        return
    shrunk = torch.bmm(groups.grid(x), layer.shrink_matrix(groups.present))
    if scale != 1.0:
        shrunk.mul_(scale)
    delta = groups.kept(torch.bmm(shrunk, layer.expand_matrix(groups.present)))
    out.index_add_(0, groups.order, delta.to(out.dtype))
