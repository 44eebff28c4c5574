"""Per-customer eval suites: what a customer's adapters are scored on, kept in Redis.

A suite is either an environment (prompts of one of its eval splits, scored by its verifiable
reward) or a list of golden cases (fixed prompts whose expected answer is known). An environment's
`gate` and `report` splits are disjoint from each other and from its training prompts
(`clora.agents.envs.split_of`), so a score measures generalisation, not memory, and a reported score
(the report split) is never the one that selected the version (the gate split).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, Field, model_validator

HELD_OUT_SEED = 1_000_003  # trainer seeds are small integers: a suite's draws never meet them


class GoldenCase(BaseModel):
    messages: list[dict[str, Any]] = Field(min_length=1)
    expected: str = Field(description="The answer's text must equal this (surrounding whitespace ignored).")


class EvalSuite(BaseModel):
    environment: str | None = Field(default=None, description="Environment spec, or arithmetic:<level>.")
    golden: list[GoldenCase] = Field(default_factory=list)
    n: int = Field(default=16, ge=1, le=1024, description="Prompts (or episodes) per evaluation.")
    split: Literal["gate", "report"] = Field(default="gate", description="The environment's eval split: `gate` for "
                                             "the promotion gate, `report` for scores that are reported.")
    seed: int = Field(default=HELD_OUT_SEED, description="Draws prompts; keep it away from training seeds.")
    max_tokens: int = Field(default=64, ge=1, le=4096)

    @model_validator(mode="after")
    def _one_source(self) -> "EvalSuite":
        if (self.environment is None) == (not self.golden):
            raise ValueError("an eval suite needs exactly one of `environment` or `golden`")
        return self

    def fingerprint(self) -> str:
        """Changes whenever the suite does: cached scores of another suite are never reused."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


class SuiteStore:
    KEY = "clora:eval:suites"

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis

    async def set(self, customer: str, suite: EvalSuite) -> None:
        await self.redis.hset(self.KEY, customer, suite.model_dump_json())

    async def delete(self, customer: str) -> None:
        await self.redis.hdel(self.KEY, customer)

    async def get(self, customer: str) -> EvalSuite | None:
        raw = await self.redis.hget(self.KEY, customer)
        return EvalSuite.model_validate_json(raw) if raw else None

    async def all(self) -> dict[str, EvalSuite]:
        raw = await self.redis.hgetall(self.KEY)
        return {k.decode(): EvalSuite.model_validate_json(v) for k, v in sorted(raw.items())}
