"""Environments with verifiable rewards: what on-policy training samples prompts from and scores.

An environment hands out prompts (chat messages) and scores a completion. The trainer samples a
group of completions per prompt from the live server and learns from the group-normalised scores.
Environments are named by a spec string (`name:args`) so a tenant's config can refer to one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Environment(Protocol):
    name: str

    def prompts(self, rng: random.Random, n: int) -> list[list[dict[str, Any]]]: ...

    def reward(self, prompt: list[dict[str, Any]], completion: Completion) -> float: ...

    # Optional: `heldout_prompts(rng, n)`, prompts from a pool never used for training (evals use
    # it when present; otherwise they draw `prompts` from their own, held-out seed).


TOPICS = ["the sea", "a city at night", "an old clock", "a garden", "the mountains", "a library", "winter",
          "a train journey", "the moon", "a market", "a storm", "a quiet morning"]


class TokenRange:
    """Reward = share of the completion's tokens whose id lies in [low, high).

    Dense and learnable even by a random-initialised model (about half its tokens fall in either
    half of the vocabulary at first), so two tenants with opposite ranges pull one base model in
    opposite directions: the trainer's own test and benchmark task.
    """

    def __init__(self, low: int, high: int):
        if not 0 <= low < high:
            raise ValueError("token-range needs 0 <= low < high")
        self.low, self.high = low, high
        self.name = f"token-range:{low}-{high}"

    def prompts(self, rng: random.Random, n: int) -> list[list[dict[str, Any]]]:
        return [[{"role": "user", "content": f"Write about {rng.choice(TOPICS)}."}] for _ in range(n)]

    def reward(self, prompt: list[dict[str, Any]], completion: Completion) -> float:
        if not completion.token_ids:
            return 0.0
        return sum(self.low <= t < self.high for t in completion.token_ids) / len(completion.token_ids)


class TokenSet:
    """Reward = share of the completion's tokens that belong to a given set of token ids."""

    def __init__(self, name: str, token_ids: frozenset[int]):
        self.name, self.token_ids = name, token_ids

    def prompts(self, rng: random.Random, n: int) -> list[list[dict[str, Any]]]:
        return [[{"role": "user", "content": f"Write about {rng.choice(TOPICS)}."}] for _ in range(n)]

    def reward(self, prompt: list[dict[str, Any]], completion: Completion) -> float:
        if not completion.token_ids:
            return 0.0
        return sum(t in self.token_ids for t in completion.token_ids) / len(completion.token_ids)


def _token_range(args: str) -> Environment:
    low, _, high = args.partition("-")
    return TokenRange(int(low), int(high))


FACTORIES: dict[str, Callable[[str], Environment]] = {"token-range": _token_range}


def register(name: str, factory: Callable[[str], Environment]) -> None:
    """Make an environment available to tenant configs as `name:args`."""
    FACTORIES[name] = factory


def make_env(spec: str) -> Environment:
    """`name:args` -> an environment, e.g. `token-range:0-24576`."""
    import agents.preference  # noqa: F401 - registers `preference`

    name, _, args = spec.partition(":")
    if name not in FACTORIES:
        raise ValueError(f"unknown environment {name!r}; known: {', '.join(sorted(FACTORIES))}")
    return FACTORIES[name](args)
