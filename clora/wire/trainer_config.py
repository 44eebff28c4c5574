"""A customer's training configuration: a Redis record (`clora:trainer:config`) and the body of
`GET/PUT /admin/customers/{c}/trainer-config`. Defaults that work for SmolLM2-135M."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# PEFT's names of the projections a LoRA adapter may target (Llama-style models).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LossWeights(BaseModel):
    onpolicy: float = Field(default=1.0, ge=0, description="GRPO on groups sampled from the environment.")
    offpolicy: float = Field(default=1.0, ge=0, description="Importance-weighted PG on rated production answers.")
    correction: float = Field(default=1.0, ge=0, description="SFT on operators' corrected answers.")
    preference: float = Field(default=0.0, ge=0, description="DPO: correction preferred over the original answer.")


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default

    environment: str | None = Field(default=None, description="On-policy environment spec; None = feedback only.")
    lr: float = Field(default=1e-3, gt=0)
    rank: int = Field(default=16, ge=1, le=256)
    alpha: float = Field(default=32.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    prompts_per_step: int = Field(default=4, ge=1, description="On-policy groups per step.")
    group_size: int = Field(default=8, ge=2, description="Completions sampled per prompt (K).")
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    clip: float = Field(default=0.2, gt=0, description="PPO clip range.")
    kl_coef: float = Field(default=0.0, ge=0, description="KL penalty to the base model (on-policy).")
    records_per_step: int = Field(default=8, ge=1, description="Production records per step.")
    min_records: int = Field(default=4, ge=1, description="New records needed before a feedback-only step.")
    max_record_wait_s: float = Field(default=5.0, ge=0, description="Fewer than `min_records` new records train "
                                     "anyway once the oldest has waited this long since its 202: a lone correction is "
                                     "learnt from within seconds, not held back until more arrive.")
    is_cap: float = Field(default=2.0, ge=1, description="Truncation of importance weights (off-policy).")
    baseline_rate: float = Field(default=0.1, gt=0, le=1, description="Step size of the running mean of rated "
                                 "answers' rewards that their advantages are measured against (starts at 0).")
    max_logprob_gap: float = Field(default=0.1, ge=0, description="Mean |trainer - vLLM| logprob (nats) on tokens "
                                   "the trainer's weights sampled, above which a step is skipped.")
    dpo_beta: float = Field(default=0.1, gt=0)
    weights: LossWeights = Field(default_factory=LossWeights)
    priority: float = Field(default=1.0, gt=0, description="Share of training time relative to others.")
    gated: bool = Field(default=False, description="Publish versions as candidates: the eval job's promotion "
                                                   "gate decides when one is served.")
    seed: int = 0
