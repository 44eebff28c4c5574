"""Token-level environments: dense rewards that even a random-initialised model can learn.

The trainer's own tests and benchmarks use them: two tenants with opposite token ranges pull one
base model in opposite directions.
"""

from __future__ import annotations

import random
from typing import Any

from clora.agents.envs import Completion, Environment, Split, in_split, register

TOPICS = ["the sea", "a city at night", "an old clock", "a garden", "the mountains", "a library", "winter",
          "a train journey", "the moon", "a market", "a storm", "a quiet morning", "a lighthouse", "the desert",
          "a bakery", "an airport", "a forest path", "a school yard", "the harbour", "a rainy afternoon",
          "a concert", "a farm", "an island", "a bridge", "a snowfall", "a kitchen", "a museum", "a river",
          "a football match", "a bus stop", "a birthday", "the night sky", "a hospital", "a village", "a factory",
          "a beach in summer", "an empty theatre", "a bookshop", "a mountain hut", "a street market at dawn",
          "a waterfall", "a chess game", "a post office", "a vineyard", "a subway car", "a zoo", "a harvest",
          "a thunderstorm at sea"]


def topic_prompts(rng: random.Random, n: int, split: Split) -> list[list[dict[str, Any]]]:
    """`Write about <topic>.` for topics of the split only."""
    topics = in_split(TOPICS, split)
    return [[{"role": "user", "content": f"Write about {rng.choice(topics)}."}] for _ in range(n)]


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

    def prompts(self, rng: random.Random, n: int, split: Split = "training") -> list[list[dict[str, Any]]]:
        return topic_prompts(rng, n, split)

    def reward(self, prompt: list[dict[str, Any]], completion: Completion) -> float:
        if not completion.token_ids:
            return 0.0
        return sum(self.low <= t < self.high for t in completion.token_ids) / len(completion.token_ids)


class TokenSet:
    """Reward = share of the completion's tokens that belong to a given set of token ids."""

    def __init__(self, name: str, token_ids: frozenset[int]):
        self.name, self.token_ids = name, token_ids

    def prompts(self, rng: random.Random, n: int, split: Split = "training") -> list[list[dict[str, Any]]]:
        return topic_prompts(rng, n, split)

    def reward(self, prompt: list[dict[str, Any]], completion: Completion) -> float:
        if not completion.token_ids:
            return 0.0
        return sum(t in self.token_ids for t in completion.token_ids) / len(completion.token_ids)


def _token_range(args: str) -> Environment:
    low, _, high = args.partition("-")
    return TokenRange(int(low), int(high))


register("token-range", _token_range)
