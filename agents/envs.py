"""Environments with verifiable rewards: what on-policy training samples prompts from and scores.

An environment hands out prompts (chat messages) and scores a completion. The trainer samples a
group of completions per prompt from the live server and learns from the group-normalised scores.
Environments are named by a spec string (`name:args`) so a tenant's config can refer to one.

This module is the registry: environment modules import it and register themselves, never the
reverse; `catalog` imports them all.
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


FACTORIES: dict[str, Callable[[str], Environment]] = {}


def register(name: str, factory: Callable[[str], Environment]) -> None:
    """Make an environment available to tenant configs as `name:args`."""
    FACTORIES[name] = factory


def build(spec: str) -> Environment:
    """`name:args` -> an environment registered under `name` (`clora.agents.catalog.make_env`
    makes sure every environment module has registered itself first)."""
    name, _, args = spec.partition(":")
    if name not in FACTORIES:
        raise ValueError(f"unknown environment {name!r}; known: {', '.join(sorted(FACTORIES))}")
    return FACTORIES[name](args)
