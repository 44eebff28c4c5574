"""clora's vLLM plugin: LoRA on CPU through the grouped ops (`punica.py`), and engine
processes that do not busy-poll each other for long (`limit_spin`).

vLLM runs every `vllm.general_plugins` entry point in each of its processes before it builds the
model, the engine core's worker included: that is where the punica wrapper is chosen. `register`
points the CPU platform at `GroupedPunicaWrapperCPU` when

- `CLORA_GROUPED_LORA` is on (`settings.serving.grouped_lora`; the engine sets it for vLLM from our
  settings, so a plain `vllm serve` on a machine that has clora installed is left alone),
- the platform is the CPU (GPU platforms keep vLLM's own kernels), and
- vLLM's CPU wrapper still has the methods and signatures the subclass overrides (checked here;
  on a mismatch the plugin stays off with one warning, and vLLM's own ops serve).

vLLM's engine core and its worker pass each step through shared memory and, after each message,
spin (`sched_yield`) for 1 s waiting for the next one: while the engine runs, the core process
spins on the second core for as long as the worker computes a step. Co-located with a trainer on
two cores, that is the trainer's core; `CLORA_ENGINE_SPIN_S` (`settings.serving.engine_spin_s`, 5 ms by
default) caps the spin, after which a reader blocks on vLLM's own notification socket (its idle
mode), waking within a fraction of a millisecond of a step that takes a hundred. Steps shorter
than the window (a tiny model's) keep spinning: a wake-up per millisecond step would be felt.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

log = logging.getLogger("vllm.clora")  # vLLM's logger tree: lands in the engine's log file

ENV = "CLORA_GROUPED_LORA"
SPIN_ENV = "CLORA_ENGINE_SPIN_S"
WRAPPER = "clora.runtime.engine.punica.GroupedPunicaWrapperCPU"

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


def limit_spin(environ: dict[str, str] | None = None, cpu: bool | None = None) -> bool:
    """Readers of vLLM's shared-memory queues made after this spin at most `CLORA_ENGINE_SPIN_S`
    seconds (unset: vLLM's own behaviour); False, with a warning, if vLLM's reader has changed.
    CPU engines only (`cpu`: this process's platform unless given): a GPU machine's spare cores
    are what vLLM's spin is for, and a GPU step's few milliseconds would pay a wake-up each."""
    value = (os.environ if environ is None else environ).get(SPIN_ENV)
    if value is None:
        return False
    if cpu is None:
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
    if not cpu:
        return False
    try:
        spin_s = max(0.0, float(value))
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except (ValueError, ImportError) as exc:
        log.warning("clora engine spin limit off (%s)", exc)
        return False
    if not hasattr(SpinCondition, "clora_vllm_init"):  # wrapped once per process, whatever the calls
        if "busy_loop_s" not in inspect.signature(SpinCondition.__init__).parameters:
            log.warning("clora engine spin limit off: vLLM's SpinCondition has no busy_loop_s")
            return False
        original = SpinCondition.__init__

        def capped(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            cap = getattr(type(self), "clora_spin_s", None)
            if self.is_reader and cap is not None:
                self.busy_loop_s = min(self.busy_loop_s, cap)

        SpinCondition.clora_vllm_init = original
        SpinCondition.__init__ = capped
    SpinCondition.clora_spin_s = spin_s
    return True


def register() -> None:
    """The `vllm.general_plugins` entry point; vLLM may call it more than once per process."""
    limit_spin()
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
