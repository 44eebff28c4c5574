"""All configuration in one place: environment variables with the `CLORA_` prefix, in sections.

`Settings` holds one section per part of clora: `stores` (the data directory, Kafka, Redis and the
topics), `serving` (gateway, engine, capture), `feedback` (webhook, ingestion, replay buffers),
`trainer` and `evals`. Each stage takes its own section. Every field is read from its own
variable, and only from it (`CLORA_PORT` is `serving.port`, `CLORA_TRAINER_DEVICE` is
`trainer.device`): the names predate the sections and never change. `Settings(port=0,
trainer_enabled=False)` takes the same names, lowercased without the prefix; a name it does not
know is an error.

Settings are built by the composition root (the CLI, or a test) and handed down; nothing reads
them at import time. docs/configuration.md is generated from here (`make docs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def env(name: str, default: Any = ..., **kwargs: Any) -> Any:
    """A field read from `CLORA_<name>` (and settable by its field name in code)."""
    return Field(default, validation_alias=f"CLORA_{name}", **kwargs)


class Section(BaseSettings):
    # Read by variable name only: by field name too, `HOME` or `PORT` in the environment would count.
    model_config = SettingsConfigDict(extra="forbid")

    @classmethod
    def of(cls, **fields: Any) -> Section:
        """The section from the environment, with `fields` (by field name) set over it."""
        return cls(**{str(cls.model_fields[name].validation_alias): value for name, value in fields.items()})


class StoreSettings(Section):
    """Where data lives: the data directory, Kafka and its topics, Redis. Unset Kafka or Redis means
    `clora serve` starts the embedded one."""

    home: Path = env("HOME", Path(".clora"), description="Data directory (caches, runs, spool).")
    kafka_bootstrap: str | None = env("KAFKA_BOOTSTRAP", None, description="Kafka bootstrap servers.")
    redis_url: str | None = env("REDIS_URL", None, description="Redis URL, e.g. redis://host:6379/0.")
    interactions_topic: str = env("INTERACTIONS_TOPIC", "clora.interactions", description="Capture topic.")
    feedback_topic: str = env("FEEDBACK_TOPIC", "clora.feedback", description=(
        "Topic the webhook writes feedback events to."))
    dead_letter_topic: str = env("DEAD_LETTER_TOPIC", "clora.feedback.dead", description=(
        "Malformed or unjoinable messages, with the reason."))
    topic_partitions: int = env("TOPIC_PARTITIONS", 4, description="Partitions when creating topics.")

    @field_validator("home")
    @classmethod
    def _absolute(cls, home: Path) -> Path:
        # Children (vLLM) run in other directories: every path handed to them must be absolute.
        return home.expanduser().resolve()


class ServingSettings(Section):
    """The gateway (limits, keys), the engine (vLLM) and traffic capture."""

    model: str | None = env("MODEL", None, description="HF model dir; default SmolLM2-135M-Instruct.")
    host: str = env("HOST", "127.0.0.1", description="Gateway address.")
    port: int = env("PORT", 8000, description="Gateway port (0 picks a free one).")
    admin_key: str | None = env("ADMIN_KEY", None, description="Admin API key; generated if unset.")
    trace_secret: str | None = env("TRACE_SECRET", None, description="HMAC key for trace ids; generated if unset.")
    max_request_bytes: int = env("MAX_REQUEST_BYTES", 1 << 20, description="Largest accepted request body.")
    upstream_timeout_s: float = env("UPSTREAM_TIMEOUT_S", 600.0, gt=0, description=(
        "Longest wait for the engine's answer to a chat request (a whole answer: all of it; a stream: its "
        "start); past it the request is aborted in the engine and answered 504."))
    customer_max_concurrent: int = env("CUSTOMER_MAX_CONCURRENT", 64, ge=0,
        description="A customer's chat requests in flight "
        "at once; more are a 429 (0: no limit).")
    customer_requests_per_s: float = env("CUSTOMER_REQUESTS_PER_S", 100.0, ge=0,
        description="A customer's sustained chat "
        "request rate (bursts of 2 s worth); beyond it a 429 (0: no limit).")
    customer_tokens_per_min: int = env("CUSTOMER_TOKENS_PER_MIN", 0, ge=0,
        description="A customer's prompt + completion tokens "
        "per minute; beyond it a 429 until refilled (0: no limit).")
    fair_share_requests: int = env("FAIR_SHARE_REQUESTS", 8, ge=0, description=(
        "Chat requests in the engine that competing customers share equally: while a customer uses no more "
        "than its share, the others' requests beyond theirs wait (no 429); a customer alone, or customers "
        "that all want more than a share, use up to their concurrency limits (0: off)."))
    max_tokens_cap: int = env("MAX_TOKENS_CAP", 4096, ge=0,
        description="Largest `max_tokens` / `max_completion_tokens` a "
        "customer may ask for; more is a 400 (0: no cap).")
    served_base_name: str = env("SERVED_BASE_NAME", "base", description="The base model's name on the server.")
    dtype: str = env("DTYPE", "float32", description="vLLM dtype (float32 is fastest on AVX2-only CPUs).")
    max_model_len: int = env("MAX_MODEL_LEN", 2048, description="Context window.")
    max_loras: int = env("MAX_LORAS", 4, description="Adapters in one decode batch (GPU/CPU slots).")
    max_cpu_loras: int = env("MAX_CPU_LORAS", 16, description="Adapters cached by vLLM beyond the slots.")
    max_lora_rank: int = env("MAX_LORA_RANK", 16, description=(
        "Largest adapter rank (the CPU path pads every adapter to it)."))
    lora_target_modules: list[str] | None = env("LORA_TARGET_MODULES", None,
        description="Restrict served LoRA modules (e.g. qkv_proj,o_proj); None = all."
    )
    kv_cache_gib: float = env("KV_CACHE_GIB", 2.0, description="vLLM CPU KV cache size (GiB).")
    cpu_threads_bind: str = env("CPU_THREADS_BIND", "auto", description="VLLM_CPU_OMP_THREADS_BIND.")
    enforce_eager: bool = env("ENFORCE_EAGER", True, description="Skip torch.compile: faster start.")
    grouped_lora: bool = env("GROUPED_LORA", True, description="CPU: serve LoRA with clora's grouped ops (one matrix "
        "multiply per adapter) instead of vLLM's per-token ones; eager mode only.")
    engine_spin_s: float | None = env("ENGINE_SPIN_S", 0.005, ge=0.0, description=(
        "Cap on how long vLLM's engine processes busy-poll (sched_yield) for each other's next message "
        "before blocking on a socket. vLLM's own is 1 s (set 1, or None in code): a second core spinning "
        "whenever the engine runs, the core the co-located trainer computes on. 5 ms keeps fast steps "
        "spinning and blocks through a real model's (benchmarks/engine_spin.py); 0 adds a socket wake-up "
        "to every step, which small models' millisecond steps feel. CPU engines only."))
    engine_start_timeout_s: float = env("ENGINE_START_TIMEOUT_S", 300.0, description=(
        "Give up starting vLLM after this long."))
    engine_extra_args: list[str] = env("ENGINE_EXTRA_ARGS", default_factory=list, description=(
        "More `vllm serve` flags."))
    engine_diagnosis_http: bool = env("ENGINE_DIAGNOSIS_HTTP", False, description=(
        "Also serve vLLM's own OpenAI app, as `vllm serve` would (no key), on a loopback port (`engine_url` in "
        "serve.json): for diagnosis and the benchmarks' straight-to-vLLM path only. Any local process can then "
        "reach every customer's adapter past auth, limits and capture; off, only the gateway reaches the engine."))
    adapter_keep_versions: int = env("ADAPTER_KEEP_VERSIONS", 20, description=(
        "Versions kept per customer for rollback."))
    capture_queue_size: int = env("CAPTURE_QUEUE_SIZE", 10_000, description="In-memory records before spooling.")
    capture_batch_s: float = env("CAPTURE_BATCH_S", 0.5, ge=0,
        description="Records go to Kafka in batches at most this "
        "often: one broker round trip per batch, not per record.")
    spool_max_bytes: int = env("SPOOL_MAX_BYTES", 1 << 30, description="On-disk spool bound.")
    capture_outbox_max_bytes: int = env("CAPTURE_OUTBOX_MAX_BYTES", 256 << 20, gt=0,
        description="Captured interactions ingestion "
        "has not stored yet, journaled on disk before the answer ends to send again.")
    capture_journal_wait_s: float = env("CAPTURE_JOURNAL_WAIT_S", 0.05, gt=0,
        description="How long an answer waits for its "
        "record's journal write (a stalled disk): then it is served and counted.")
    capture_sync_every_s: float = env("CAPTURE_SYNC_EVERY_S", 0.2, gt=0,
        description="Journaled records are fsync'd at least "
        "this often: what a machine crash (not a process kill) can lose.")
    capture_resend_after_s: float = env("CAPTURE_RESEND_AFTER_S", 30.0, gt=0,
        description="A captured interaction ingestion has "
        "not stored this long after sending is sent to the broker again.")


class FeedbackSettings(Section):
    """The feedback webhook, ingestion (Kafka into Redis) and the replay buffers."""

    max_body_bytes: int = env("FEEDBACK_MAX_BODY_BYTES", 1 << 20, description="Largest feedback body (413 above).")
    events_per_s: float = env("FEEDBACK_EVENTS_PER_S", 200.0, description="Sustained feedback rate per caller.")
    burst: int = env("FEEDBACK_BURST", 2000, description="Feedback events a caller may send at once.")
    outbox_max_bytes: int = env("FEEDBACK_OUTBOX_MAX_BYTES", 256 << 20, gt=0, description="Accepted feedback not yet "
        "confirmed by ingestion, on disk; beyond it the webhook answers 503.")
    resend_after_s: float = env("FEEDBACK_RESEND_AFTER_S", 30.0, gt=0,
        description="Accepted feedback that ingestion has "
        "not stored this long after sending is sent to the broker again.")
    max_wait_s: float = env("FEEDBACK_MAX_WAIT_S", 300.0, description="Feedback waits this long for its interaction.")
    ingest_group: str = env("INGEST_GROUP", "clora-ingest", description="Kafka consumer group of the ingestion.")
    ingest_fetch_wait_s: float = env("INGEST_FETCH_WAIT_S", 0.25, gt=0,
        description="The broker holds a fetch this long to "
        "fill a batch (returns early at 64 KiB): fewer wake-ups per record.")
    ingest_max_poll_records: int = env("INGEST_MAX_POLL_RECORDS", 500, gt=0, description=(
        "Records the ingestion handles per batch."))
    ingest_max_lag: int = env("INGEST_MAX_LAG", 10_000, ge=0, description="Messages the ingestion may be behind before "
        "/healthz reports it degraded (still a 200: serving is unaffected).")
    interaction_ttl_s: int = env("INTERACTION_TTL_S", 7 * 24 * 3600, description=(
        "How long feedback can join an answer."))
    replay_capacity: int = env("REPLAY_CAPACITY", 10_000, description="Default records per customer buffer.")
    replay_min_share: float = env("REPLAY_MIN_SHARE", 0.1, ge=0, le=0.25, description=(
        "Share of a buffer's capacity each kind of record (rating, reward, correction, comment) keeps through "
        "eviction, its newest: corrections outrank ratings, but never evict them all."))
    fault_hooks: bool = env("FAULT_HOOKS", False, description="`clora serve` cancels its ingestion pass mid-batch on "
        "SIGUSR1 (a fault the soak injects from outside the process).")


class TrainerSettings(Section):
    """`clora train` (and a child of `clora serve` unless disabled)."""

    enabled: bool = env("TRAINER_ENABLED", True, description="`clora serve` also runs the trainer.")
    device: str = env("TRAINER_DEVICE", "auto", description="cpu, cuda, cuda:N; auto = cuda if present.")
    pass_tokens: int | None = env("TRAINER_PASS_TOKENS", None, description=(
        "Tokens per batched pass (auto: 512 CPU, 65536 GPU)."))
    dtype: Literal["auto", "float32", "bfloat16"] = env("TRAINER_DTYPE", "auto",
        description="The trainer's base-model dtype; auto: bfloat16 on CUDA, else the engine's "
        "(CLORA_DTYPE), so the trainer's logprobs are computed as the server's are.")
    max_tenants: int = env("TRAINER_MAX_TENANTS", 8, description="Tenants trained together in one step.")
    threads: int = env("TRAINER_THREADS", 0, ge=0, description=(
        "torch threads of the trainer process; 0 = auto: on CPU every core but one (the engine computes on one "
        "core under CLORA_CPU_THREADS_BIND=auto; on 2 cores both threads made the engine and the trainer slower: "
        "benchmarks/results/trainer_threads.json), on CUDA torch's default."))
    pipeline: bool = env("TRAINER_PIPELINE", True, description="Sample the next step's rollouts while the trainer "
        "computes the current step; four or more tenants with rollouts take turns in halves, "
        "so theirs come from their newest versions (fewer sample in their step, then train).")
    idle_s: float = env("TRAINER_IDLE_S", 5.0, description="Pause when no tenant has anything to learn.")
    max_inflight: int = env("TRAINER_MAX_INFLIGHT", 64, description=(
        "Serving requests in flight above which training waits."))
    keep_checkpoints: int = env("TRAINER_KEEP_CHECKPOINTS", 5, description=(
        "Trainer state checkpoints kept per customer."))
    max_skipped_steps: int = env("TRAINER_MAX_SKIPPED_STEPS", 5, ge=1, description=(
        "A tenant's steps skipped in a row (logprob gap over its bound; the records over it quarantined) "
        "before its training is halted and /healthz says why (set its trainer config again, or restart, to resume)."))
    metrics_port: int = env("TRAINER_METRICS_PORT", 9464, ge=0, le=65535,
                                      description="Prometheus metrics of the trainer (steps, logprob gap); 0: off.")
    gateway_url: str | None = env("GATEWAY_URL", None, description="Gateway for `clora train`; default: serve.json.")


class EvalSettings(Section):
    """The eval job and the promotion gate (inside `clora serve`; `clora eval run` runs it by hand)."""

    interval_s: float = env("EVAL_INTERVAL_S", 300.0, description="Seconds between eval rounds; 0 = no periodic job.")
    tolerance: float = env("EVAL_TOLERANCE", 0.05, ge=0, le=1,
                                  description="A candidate may score this much below the served version.")


SECTIONS: dict[str, type[Section]] = {"stores": StoreSettings, "serving": ServingSettings,
                                      "feedback": FeedbackSettings, "trainer": TrainerSettings, "evals": EvalSettings}


def variables() -> dict[str, tuple[str, str]]:
    """`CLORA_*` name -> (section, field), for every field."""
    return {str(info.validation_alias): (section, name)
            for section, cls in SECTIONS.items() for name, info in cls.model_fields.items()}


def defaults() -> dict[str, Any]:
    """Every setting's default under its `CLORA_*` name, as a JSON value (no environment read)."""
    out = {}
    for name, (section, field) in variables().items():
        value = SECTIONS[section].model_fields[field].get_default(call_default_factory=True)
        out[name] = value if value is None or isinstance(value, (str, int, float, bool, list)) else str(value)
    out["CLORA_HOME"] = str(Path(".clora").expanduser().resolve())  # as the validator resolves it
    return out


def under_home(name: str) -> property:
    return property(lambda settings: settings.home / name, doc=f"`$CLORA_HOME/{name}`")


class Settings(BaseModel):
    stores: StoreSettings
    serving: ServingSettings
    feedback: FeedbackSettings
    trainer: TrainerSettings
    evals: EvalSettings

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        """Flat names (`port`, `trainer_device`) to their sections; each section built with the
        environment under what was given, so a value set in code wins and the rest comes from
        `CLORA_*` as always."""
        data = dict(data or {})
        given: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        flat = {name.removeprefix("CLORA_").lower(): where for name, where in variables().items()}
        for key in [k for k in data if k not in SECTIONS]:
            if key not in flat:
                raise ValueError(f"unknown setting {key!r} (a CLORA_ variable's name, lowercased without the prefix)")
            section, name = flat[key]
            given[section][name] = data.pop(key)
        for section, cls_ in SECTIONS.items():
            value = data.get(section)
            if isinstance(value, Section) and not given[section]:
                continue
            explicit = value.model_dump() if isinstance(value, Section) else dict(value or {})
            data[section] = cls_.of(**(explicit | given[section]))
        return data

    def updated(self, **changes: Any) -> Settings:
        """These settings with some changed (flat names, as `Settings(...)` takes them)."""
        return Settings(**{s: getattr(self, s).model_dump() for s in SECTIONS}, **changes)

    def values(self) -> dict[str, Any]:
        """Every setting under its `CLORA_*` name, as JSON values."""
        dumped = {section: getattr(self, section).model_dump(mode="json") for section in SECTIONS}
        return {name: dumped[section][field] for name, (section, field) in variables().items()}

    def child_env(self) -> dict[str, str]:
        """These settings as `CLORA_*` variables: a child process (the trainer) then runs with exactly
        them, whether they came from the environment or were set by the parent (the demo does)."""
        return {name: value if isinstance(value, str) else json.dumps(value)
                for name, value in self.values().items() if value is not None}

    @property
    def home(self) -> Path:
        return self.stores.home

    # Where the runtime writes, under the data directory.
    trainer_dir = under_home("trainer")  # tenants' states and checkpoints
    cache_dir = under_home("cache")
    spool_dir = under_home("spool")
    outbox_dir = under_home("outbox")
    capture_outbox_dir = under_home("capture-outbox")
    runs_dir = under_home("runs")
    adapters_dir = under_home("adapters")
    state_file = under_home("serve.json")  # written by `clora serve`: where its services listen
