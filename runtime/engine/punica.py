"""vLLM's CPU punica wrapper with the grouped LoRA ops of `lora_ops.py`.

vLLM builds one punica wrapper per model and calls it from every LoRA layer: `update_metadata` once
per step with the batch's adapter mapping, then `add_lora_linear` (shrink then expand, per packed
slice), `add_lora_embedding` and `add_lora_logits`. We group the batch's rows by adapter slot in
`update_metadata` and run every op on those groups; a batch without adapters skips the LoRA work in
decode too (vLLM's CPU wrapper checks that in prefill only). Installed by `plugin.register`.

Imports vLLM: loaded only inside vLLM's processes, by the plugin, after its version check.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from clora.runtime.engine import lora_ops
from clora.runtime.engine.lora_ops import TokenGroups


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """Same interface and results as vLLM's `PunicaWrapperCPU`; one GEMM per adapter group."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self.tokens = TokenGroups.empty()  # rows of the step's tokens (linear and embedding layers)
        self.requests = TokenGroups.empty()  # rows of the sampled positions (the logits layer)

    def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], max_loras: int,
                        vocab_size: int, **kwargs: Any) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self.tokens = TokenGroups.of(self.token_lora_indices)
        self.requests = TokenGroups.of(self.sampler_indices)

    def add_shrink(self, y: Any, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...], scale: float,
                   **kwargs: Any) -> None:
        if self.tokens.no_lora:
            return
        x = x.view(-1, x.shape[-1])
        for index, lora_a in enumerate(lora_a_stacked):
            out = y[index]
            lora_ops.shrink(out.view(-1, out.shape[-1]), x, lora_a, self.tokens, scale)

    def add_expand(self, y: torch.Tensor, x: Any, lora_b_stacked: tuple[torch.Tensor, ...],
                   output_slices: tuple[int, ...], offset_start: int = 0, add_inputs: bool = True,
                   **kwargs: Any) -> None:
        if self.tokens.no_lora:
            return
        out = y.view(-1, y.shape[-1])
        offset = offset_start
        for index, lora_b in enumerate(lora_b_stacked):
            lora_ops.expand(out, x[index], lora_b, self.tokens, offset, output_slices[index], add_inputs)
            offset += output_slices[index]

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                        *, buffer: tuple[torch.Tensor, ...] | None = None, **kwargs: Any) -> None:
        if self.tokens.no_lora:  # not even the buffer
            return
        lora_ops.linear(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), lora_a_stacked, lora_b_stacked,
                        output_slices, self.tokens, scale)

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs: Any) -> None:
        if self.tokens.no_lora:
            return
        lora_ops.expand(y, x, lora_b_stacked, self.tokens, 0, y.shape[-1], add_inputs)

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale: float, *, buffer: torch.Tensor | None = None,
                        **kwargs: Any) -> None:
        if self.requests.no_lora:
            return
        out = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        if buffer is None:  # float32, as vLLM's own wrapper
            buffer = torch.zeros((x.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        lora_ops.shrink(buffer, x, lora_a_stacked, self.requests, scale)
        lora_ops.expand(out, buffer, lora_b_stacked, self.requests, 0, out.shape[-1], add_inputs=True)
