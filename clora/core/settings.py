"""All configuration in one place: environment variables with the `CLORA_` prefix.

Settings are built by the composition root (the CLI, or a test) and handed down as the few
values each component needs; nothing reads them at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLORA_", extra="ignore")

    # Where everything the runtime writes lives: model cache, run logs, spool, embedded Redis data.
    home: Path = Field(default=Path(".clora"), description="Data directory (caches, runs, spool).")

    @field_validator("home")
    @classmethod
    def _absolute(cls, home: Path) -> Path:
        # Children (vLLM) run in other directories: every path handed to them must be absolute.
        return home.expanduser().resolve()

    # External services; unset means "spawn the embedded one".
    kafka_bootstrap: str | None = Field(default=None, description="Kafka bootstrap servers.")
    redis_url: str | None = Field(default=None, description="Redis URL, e.g. redis://host:6379/0.")
    model: str | None = Field(default=None, description="HF model dir; default SmolLM2-135M-Instruct.")

    # Gateway.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, description="Gateway port (0 picks a free one).")
    admin_key: str | None = Field(default=None, description="Admin API key; generated if unset.")
    trace_secret: str | None = Field(default=None, description="HMAC key for trace ids; generated if unset.")
    max_request_bytes: int = Field(default=1 << 20, description="Largest accepted request body.")
    upstream_timeout_s: float = Field(default=600.0, gt=0, description=(
        "Longest wait for the engine's answer to a chat request (a whole answer: all of it; a stream: its "
        "start); past it the request is aborted in the engine and answered 504."))
    customer_max_concurrent: int = Field(default=64, ge=0, description="A customer's chat requests in flight "
                                         "at once; more are a 429 (0: no limit).")
    customer_requests_per_s: float = Field(default=100.0, ge=0, description="A customer's sustained chat "
                                           "request rate (bursts of 2 s worth); beyond it a 429 (0: no limit).")
    customer_tokens_per_min: int = Field(default=0, ge=0, description="A customer's prompt + completion tokens "
                                         "per minute; beyond it a 429 until refilled (0: no limit).")
    fair_share_requests: int = Field(default=8, ge=0, description=(
        "Chat requests in the engine that competing customers share equally: while a customer uses no more "
        "than its share, the others' requests beyond theirs wait (no 429); a customer alone, or customers "
        "that all want more than a share, use up to their concurrency limits (0: off)."))
    max_tokens_cap: int = Field(default=4096, ge=0, description="Largest `max_tokens` / `max_completion_tokens` a "
                                "customer may ask for; more is a 400 (0: no cap).")

    # Engine (vLLM).
    served_base_name: str = "base"
    dtype: str = "float32"
    max_model_len: int = 2048
    max_loras: int = Field(default=4, description="Adapters in one decode batch (GPU/CPU slots).")
    max_cpu_loras: int = Field(default=16, description="Adapters cached by vLLM beyond the slots.")
    max_lora_rank: int = 16
    lora_target_modules: list[str] | None = Field(
        default=None, description="Restrict served LoRA modules (e.g. qkv_proj,o_proj); None = all."
    )
    kv_cache_gib: float = Field(default=2.0, description="vLLM CPU KV cache size (GiB).")
    cpu_threads_bind: str = Field(default="auto", description="VLLM_CPU_OMP_THREADS_BIND.")
    enforce_eager: bool = Field(default=True, description="Skip torch.compile: faster start.")
    grouped_lora: bool = Field(default=True, description="CPU: serve LoRA with clora's grouped ops (one matrix "
                               "multiply per adapter) instead of vLLM's per-token ones; eager mode only.")
    engine_spin_s: float | None = Field(default=0.005, ge=0.0, description=(
        "Cap on how long vLLM's engine processes busy-poll (sched_yield) for each other's next message "
        "before blocking on a socket. vLLM's own is 1 s (set 1, or None in code): a second core spinning "
        "whenever the engine runs, the core the co-located trainer computes on. 5 ms keeps fast steps "
        "spinning and blocks through a real model's (benchmarks/engine_spin.py); 0 adds a socket wake-up "
        "to every step, which small models' millisecond steps feel. CPU engines only."))
    engine_start_timeout_s: float = 300.0
    engine_extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` flags.")
    engine_diagnosis_http: bool = Field(default=False, description=(
        "Also serve vLLM's own OpenAI app, as `vllm serve` would (no key), on a loopback port (`engine_url` in "
        "serve.json): for diagnosis and the benchmarks' straight-to-vLLM path only. Any local process can then "
        "reach every customer's adapter past auth, limits and capture; off, only the gateway reaches the engine."))

    adapter_keep_versions: int = Field(default=20, description="Versions kept per customer for rollback.")

    # Traffic capture.
    interactions_topic: str = "clora.interactions"
    topic_partitions: int = 4
    capture_queue_size: int = Field(default=10_000, description="In-memory records before spooling.")
    capture_batch_s: float = Field(default=0.5, ge=0, description="Records go to Kafka in batches at most this "
                                   "often: one broker round trip per batch, not per record.")
    spool_max_bytes: int = Field(default=1 << 30, description="On-disk spool bound.")
    capture_outbox_max_bytes: int = Field(default=256 << 20, gt=0, description="Captured interactions ingestion "
                                          "has not stored yet, journaled on disk before the answer ends to send again.")
    capture_journal_wait_s: float = Field(default=0.05, gt=0, description="How long an answer waits for its "
                                          "record's journal write (a stalled disk): then it is served and counted.")
    capture_sync_every_s: float = Field(default=0.2, gt=0, description="Journaled records are fsync'd at least "
                                        "this often: what a machine crash (not a process kill) can lose.")
    capture_resend_after_s: float = Field(default=30.0, gt=0, description="A captured interaction ingestion has "
                                          "not stored this long after sending is sent to the broker again.")

    # Feedback webhook.
    feedback_topic: str = "clora.feedback"
    feedback_max_body_bytes: int = 1 << 20
    feedback_events_per_s: float = Field(default=200.0, description="Sustained feedback rate per caller.")
    feedback_burst: int = Field(default=2000, description="Feedback events a caller may send at once.")
    feedback_outbox_max_bytes: int = Field(default=256 << 20, gt=0, description="Accepted feedback not yet "
                                           "confirmed by ingestion, on disk; beyond it the webhook answers 503.")
    feedback_resend_after_s: float = Field(default=30.0, gt=0, description="Accepted feedback that ingestion has "
                                           "not stored this long after sending is sent to the broker again.")

    # Ingestion and replay buffers.
    dead_letter_topic: str = "clora.feedback.dead"
    ingest_group: str = Field(default="clora-ingest", description="Kafka consumer group of the ingestion.")
    ingest_fetch_wait_s: float = Field(default=0.25, gt=0, description="The broker holds a fetch this long to "
                                       "fill a batch (returns early at 64 KiB): fewer wake-ups per record.")
    ingest_max_poll_records: int = Field(default=500, gt=0, description="Records the ingestion handles per batch.")
    ingest_max_lag: int = Field(default=10_000, ge=0, description="Messages the ingestion may be behind before "
                                "/healthz reports it degraded (still a 200: serving is unaffected).")
    interaction_ttl_s: int = Field(default=7 * 24 * 3600, description="How long feedback can join an answer.")
    feedback_max_wait_s: float = Field(default=300.0, description="Feedback waits this long for its interaction.")
    replay_capacity: int = Field(default=10_000, description="Default records per customer buffer.")
    replay_min_share: float = Field(default=0.1, ge=0, le=0.25, description=(
        "Share of a buffer's capacity each kind of record (rating, reward, correction, comment) keeps through "
        "eviction, its newest: corrections outrank ratings, but never evict them all."))

    # Trainer (`clora train`, and a child of `clora serve` unless disabled).
    trainer_enabled: bool = Field(default=True, description="`clora serve` also runs the trainer.")
    gateway_url: str | None = Field(default=None, description="Gateway for `clora train`; default: serve.json.")
    trainer_device: str = Field(default="auto", description="cpu, cuda, cuda:N; auto = cuda if present.")
    trainer_pass_tokens: int | None = Field(default=None, description="Tokens per batched pass (auto: 512 CPU, 65536 GPU).")
    trainer_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="The trainer's base-model dtype; auto: bfloat16 on CUDA, else the engine's "
        "(CLORA_DTYPE), so the trainer's logprobs are computed as the server's are.")
    trainer_max_tenants: int = Field(default=8, description="Tenants trained together in one step.")
    trainer_threads: int = Field(default=0, ge=0, description=(
        "torch threads of the trainer process; 0 = auto: on CPU every core but one (the engine computes on one "
        "core under CLORA_CPU_THREADS_BIND=auto; on 2 cores both threads made the engine and the trainer slower: "
        "benchmarks/results/trainer_threads.json), on CUDA torch's default."))
    trainer_pipeline: bool = Field(default=True, description="Sample the next step's rollouts while the trainer "
                                   "computes the current step; four or more tenants with rollouts take turns in halves, "
                                   "so theirs come from their newest versions (fewer sample in their step, then train).")
    trainer_idle_s: float = Field(default=5.0, description="Pause when no tenant has anything to learn.")
    trainer_max_inflight: int = Field(default=64, description="Serving requests in flight above which training waits.")
    trainer_keep_checkpoints: int = Field(default=5, description="Trainer state checkpoints kept per customer.")
    trainer_max_skipped_steps: int = Field(default=5, ge=1, description=(
        "A tenant's steps skipped in a row (logprob gap over its bound; the records over it quarantined) "
        "before its training is halted and /healthz says why (set its trainer config again, or restart, to resume)."))
    trainer_metrics_port: int = Field(default=9464, ge=0, le=65535,
                                      description="Prometheus metrics of the trainer (steps, logprob gap); 0: off.")

    # Evals and the promotion gate (a job inside `clora serve`; `clora eval run` runs it by hand).
    eval_interval_s: float = Field(default=300.0, description="Seconds between eval rounds; 0 = no periodic job.")
    eval_tolerance: float = Field(default=0.05, ge=0, le=1,
                                  description="A candidate may score this much below the served version.")

    # Tests and the soak only.
    fault_hooks: bool = Field(default=False, description="`clora serve` cancels its ingestion pass mid-batch on "
                              "SIGUSR1 (a fault the soak injects from outside the process).")

    def child_env(self) -> dict[str, str]:
        """These settings as `CLORA_*` variables: a child process (the trainer) then runs with exactly
        them, whether they came from the environment or were set by the parent (the demo does)."""
        return {f"CLORA_{name.upper()}": value if isinstance(value, str) else json.dumps(value)
                for name, value in self.model_dump(mode="json").items() if value is not None}

    @property
    def trainer_dir(self) -> Path:
        return self.home / "trainer"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    @property
    def capture_outbox_dir(self) -> Path:
        return self.home / "capture-outbox"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def state_file(self) -> Path:
        """Written by `clora serve`: where its services listen, for the other CLI commands."""
        return self.home / "serve.json"
