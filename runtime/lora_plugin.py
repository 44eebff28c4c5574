"""The vLLM plugin that serves LoRA on CPU through the grouped ops (`lora_punica.py`).

vLLM runs every `vllm.general_plugins` entry point in each of its processes before it builds the
model, the engine core's worker included: that is where the punica wrapper is chosen. `register`
points the CPU platform at `GroupedPunicaWrapperCPU` when

- `CLORA_GROUPED_LORA` is on (`Settings.grouped_lora`; the engine sets it for vLLM from our
  settings, so a plain `vllm serve` on a machine that has clora installed is left alone),
- the platform is the CPU (GPU platforms keep vLLM's own kernels), and
- vLLM's CPU wrapper still has the methods and signatures the subclass overrides (checked here;
  on a mismatch the plugin stays off with one warning, and vLLM's own ops serve).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

log = logging.getLogger("vllm.clora")  # vLLM's logger tree: lands in the engine's log file

ENV = "CLORA_GROUPED_LORA"
WRAPPER = "clora.runtime.lora_punica.GroupedPunicaWrapperCPU"

# What GroupedPunicaWrapperCPU overrides or reads, with vLLM 0.32's parameter names.
EXPECTED = {
    "update_metadata": ["self", "mapping", "lora_index_to_id", "max_loras", "vocab_size", "kwargs"],
    "add_shrink": ["self", "y", "x", "lora_a_stacked", "scale", "kwargs"],
    "add_expand": ["self", "y", "x", "lora_b_stacked", "output_slices", "offset_start", "add_inputs", "kwargs"],
    "add_lora_linear": ["self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "output_slices",
                        "buffer", "kwargs"],
    "add_lora_embedding": ["self", "y", "x", "lora_b_stacked", "add_inputs", "kwargs"],
    "add_lora_logits": ["self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "buffer", "kwargs"],
}
PROPERTIES = ("token_lora_indices", "sampler_indices")


def wanted(environ: dict[str, str] | None = None) -> bool:
    """On only when clora's engine asked for it (the setting, passed on in the environment)."""
    value = (os.environ if environ is None else environ).get(ENV, "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


def incompatibilities(wrapper: type, platform: type) -> list[str]:
    """Why the subclass would not fit this vLLM (empty when it does)."""
    problems = []
    for name, params in EXPECTED.items():
        method = getattr(wrapper, name, None)
        if not callable(method):
            problems.append(f"{wrapper.__name__}.{name} is missing")
            continue
        found = list(inspect.signature(method).parameters)
        if found != params:
            problems.append(f"{wrapper.__name__}.{name}{tuple(found)} is not {tuple(params)}")
    problems += [f"{wrapper.__name__}.{name} is not a property" for name in PROPERTIES
                 if not isinstance(inspect.getattr_static(wrapper, name, None), property)]
    if not callable(getattr(platform, "get_punica_wrapper", None)):
        problems.append(f"{platform.__name__}.get_punica_wrapper is missing")
    return problems


def install(platform: type, wrapper: type) -> bool:
    """Point `platform` at the grouped wrapper if `wrapper` (vLLM's CPU one) is what it subclasses."""
    problems = incompatibilities(wrapper, platform)
    if problems:
        log.warning("clora grouped LoRA ops off, vLLM's own CPU LoRA ops serve: %s", "; ".join(problems))
        return False
    platform.get_punica_wrapper = classmethod(lambda cls: WRAPPER)
    log.info("clora grouped LoRA ops on (%s)", WRAPPER)
    return True


def register() -> None:
    """The `vllm.general_plugins` entry point; vLLM may call it more than once per process."""
    if not wanted():
        return
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
        from vllm.platforms import current_platform
    except ImportError as exc:
        log.warning("clora grouped LoRA ops off: vLLM's CPU LoRA wrapper is not importable (%s)", exc)
        return
    if not current_platform.is_cpu():
        return
    platform: Any = type(current_platform)
    install(platform, PunicaWrapperCPU)
