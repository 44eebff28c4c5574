"""What the engine is started with, and which adapters it can serve.

The `vllm serve` arguments and the environment vLLM reads are plain data, built here from our
settings; vLLM's own argument parser reads them (in `engine.py`, the only module that imports
vLLM), so every flag means exactly what it means under `vllm serve`. Adapter validation lives
beside them because what an adapter may target depends on the same settings (rank, modules).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from clora.core.models import CHAT_TEMPLATE
from clora.core.settings import ServingSettings
from clora.runtime.engine.protocol import AdapterRejected

# The loopback address: the in-process app's ASGI scope, and the diagnosis port vLLM's app is served on.
HOST = "127.0.0.1"

# PEFT module names -> the packed vLLM module that serves them.
_PEFT_TO_VLLM = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


@dataclass
class EngineConfig:
    """The engine's settings, in the one shape both the engine manager and validation read."""

    model: str
    log_dir: Path
    cache_dir: Path
    served_base_name: str = "base"
    dtype: str = "float32"
    max_model_len: int = 2048
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_lora_rank: int = 16
    lora_target_modules: list[str] | None = None
    kv_cache_gib: float = 2.0
    cpu_threads_bind: str = "auto"
    enforce_eager: bool = True
    grouped_lora: bool = True
    spin_s: float | None = None
    start_timeout_s: float = 300.0
    extra_args: list[str] = field(default_factory=list)
    diagnosis_http: bool = False  # also serve vLLM's app, unauthenticated, on a loopback port

    @classmethod
    def from_settings(cls, serving: ServingSettings, model: str, log_dir: Path, cache_dir: Path) -> "EngineConfig":
        """`clora serve`'s settings for the engine; the run dir holds its logs."""
        return cls(
            model=model, log_dir=log_dir, cache_dir=cache_dir,
            served_base_name=serving.served_base_name, dtype=serving.dtype,
            max_model_len=serving.max_model_len, max_loras=serving.max_loras,
            max_cpu_loras=serving.max_cpu_loras, max_lora_rank=serving.max_lora_rank,
            lora_target_modules=serving.lora_target_modules, kv_cache_gib=serving.kv_cache_gib,
            cpu_threads_bind=serving.cpu_threads_bind, enforce_eager=serving.enforce_eager,
            grouped_lora=serving.grouped_lora, spin_s=serving.engine_spin_s,
            start_timeout_s=serving.engine_start_timeout_s, extra_args=serving.engine_extra_args,
            diagnosis_http=serving.engine_diagnosis_http,
        )

    @property
    def log_path(self) -> Path:
        """vLLM's log (this process's vLLM loggers and its engine core's output): the place to look."""
        return self.log_dir / "vllm.log"

    def argv(self) -> list[str]:
        """`vllm serve` arguments; parsed by vLLM's own parser, so every flag means what it does there."""
        args = [
            "--model", self.model, "--served-model-name", self.served_base_name, "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras), "--max-cpu-loras", str(self.max_cpu_loras),
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            "--chat-template", str(CHAT_TEMPLATE), "--disable-uvicorn-access-log",
            # Logprobs of the distribution each token was sampled from (after temperature, top-k and
            # top-p), not vLLM's default raw ones: the behaviour policy the trainer's ratios divide by.
            "--logprobs-mode", "processed_logprobs",
            # vLLM's neutral sampling defaults (T=1, no top-p/top-k), not the model's generation
            # config: the gateway records the parameters each answer was sampled with.
            "--generation-config", "vllm",
            # Compact JSON for response_format: small models otherwise wander off into whitespace.
            "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        ]
        if self.lora_target_modules:
            args += ["--lora-target-modules", *self.lora_target_modules]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args + self.extra_args

    def env(self) -> dict[str, str]:
        """vLLM reads these at import and its child processes inherit them."""
        return {
            # The engine core is started from a process with threads (Kafka, Redis, the event
            # loop's executor): fork could copy a held lock into the child. Spawn starts clean.
            "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
            "VLLM_ENGINE_READY_TIMEOUT_S": str(int(self.start_timeout_s)),
            "VLLM_LOGGING_CONFIG_PATH": str(self._logging_config()),
            "CLORA_ENGINE_LOG": str(self.log_path.resolve()),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(self.kv_cache_gib))),
            "VLLM_CPU_OMP_THREADS_BIND": self.cpu_threads_bind,
            "VLLM_CACHE_ROOT": str((self.cache_dir / "vllm").resolve()),
            "TORCHINDUCTOR_CACHE_DIR": str((self.cache_dir / "torchinductor").resolve()),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            # Our vLLM plugin (plugin.py) reads it in the engine core. Its adapter grouping is
            # decided in Python per step, which a compiled graph would freeze: eager mode only.
            "CLORA_GROUPED_LORA": "1" if self.grouped_lora and self.enforce_eager else "0",
        } | ({} if self.spin_s is None else {
            # The plugin caps how long vLLM's processes busy-poll each other (plugin.limit_spin).
            "CLORA_ENGINE_SPIN_S": repr(float(self.spin_s))})

    def _logging_config(self) -> Path:
        """vLLM's log lines (this process and its children) go to the run dir, not our console."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "vllm-logging.json"
        path.write_text(json.dumps({
            "version": 1, "disable_existing_loggers": False,
            "formatters": {"vllm": {"format": "%(levelname)s %(asctime)s [%(process)d %(filename)s:%(lineno)d] "
                                              "%(message)s", "datefmt": "%m-%d %H:%M:%S"}},
            "handlers": {"vllm": {"class": "logging.FileHandler", "formatter": "vllm",
                                  "filename": str(self.log_path.resolve()), "level": "INFO"}},
            "loggers": {"vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False}},
        }))
        return path

    def validate_adapter(self, path: Path) -> None:
        """vLLM silently drops modules it does not serve: refuse such adapters instead."""
        config = _read_adapter_config(path)
        rank = int(config.get("r", 0))
        if rank > self.max_lora_rank:
            raise AdapterRejected(f"adapter rank {rank} exceeds the engine's max_lora_rank {self.max_lora_rank}")
        if self.lora_target_modules:
            dropped = _unserved_targets(config, set(self.lora_target_modules))
            if dropped:
                raise AdapterRejected(f"adapter targets {dropped}, which this engine does not serve")

    def validate_lora(self, rank: int, targets: list[str]) -> None:
        """What a trainer config asks for, checked before any adapter of that shape exists: a config
        the engine cannot serve is refused when it is set, not at every publish afterwards."""
        unknown = sorted({t for t in targets if t.split(".")[-1] not in _PEFT_TO_VLLM})
        if unknown:
            raise AdapterRejected(f"unknown target modules {unknown}; known: {sorted(_PEFT_TO_VLLM)}")
        if rank > self.max_lora_rank:
            raise AdapterRejected(f"rank {rank} exceeds the engine's max_lora_rank {self.max_lora_rank}")
        if self.lora_target_modules:
            dropped = _unserved_targets({"target_modules": targets}, set(self.lora_target_modules))
            if dropped:
                raise AdapterRejected(f"targets {dropped}, which this engine does not serve")


def _read_adapter_config(path: Path) -> dict:
    """A PEFT adapter directory's config; anything else is refused before vLLM sees it."""
    config_file = path / "adapter_config.json"
    if not config_file.exists() or not any(path.glob("adapter_model.*")):
        raise AdapterRejected(f"{path} is not a PEFT adapter directory")
    return json.loads(config_file.read_text())


def _unserved_targets(config: dict, served: set[str]) -> list[str]:
    """The adapter's target modules whose packed vLLM module the engine does not serve."""
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    return sorted({t for t in targets if _PEFT_TO_VLLM.get(t.split(".")[-1], t) not in served})
