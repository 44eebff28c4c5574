"""Environments with verifiable rewards: what on-policy training samples prompts from and scores.

An environment hands out prompts (chat messages) and scores a completion. The trainer samples a
group of completions per prompt from the live server and learns from the group-normalised scores.
An episodic environment plays a task out over several turns (the model's answers, tool results fed
back, a final reward): `Episode`. Environments are named by a spec string (`name:args`) so a tenant's config can refer to one.

Every prompt belongs to one of three disjoint splits, so that what is measured was never trained
on, and what is reported did not select what is reported on: `training` (live traffic, on-policy
groups), `gate` (the promotion gate's evals, the demo's stopping rule) and `report` (scores that
are reported). Environments split the items their prompts are built from (subjects, topics,
problems) with `split_of`, so a subject of a report prompt never appears in training either.

This module is the registry: environment modules import it and register themselves, never the
reverse; `catalog` imports them all.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

Split = Literal["training", "gate", "report"]
SPLITS: tuple[Split, ...] = ("training", "gate", "report")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


def split_of(item: int | str) -> Split:
    """The split an item belongs to, for good: by position in a fixed list (an int), or by a stable
    hash of its text. One in eight goes to the gate, two in eight to the report, the rest train."""
    bucket = item % 8 if isinstance(item, int) else zlib.crc32(item.encode()) % 8
    return "gate" if bucket == 0 else "report" if bucket in (1, 5) else "training"


def in_split(items: list[str], split: Split) -> list[str]:
    """The items of a fixed list that belong to `split` (by position)."""
    return [item for i, item in enumerate(items) if split_of(i) == split]


class Environment(Protocol):
    name: str

    def prompts(self, rng: random.Random, n: int, split: Split = "training") -> list[list[dict[str, Any]]]: ...

    def reward(self, prompt: list[dict[str, Any]], completion: Completion) -> float: ...

    # Optional: `content(prompt, completion) -> float`, whether the answer still answers the
    # question (1.0) whatever its form: reported beside the reward, which may check form only.


class Episode(Protocol):
    """One multi-turn episode, as a state machine with no I/O: whoever runs it (the trainer through
    the admin sample API, an agent through the OpenAI SDK) asks the model `next_request()`, passes
    its answer to `observe`, and repeats until `next_request()` is None; then `reward` is final."""

    reward: float

    def next_request(self) -> dict[str, Any] | None:
        """The next chat request: `messages` (the conversation so far, tool results included) and any
        other request fields the agent uses (`tools`, `tool_choice`); None when the episode is over."""
        ...

    def observe(self, completion: Completion) -> None:
        """The model's answer to the last request (its text, token ids and tool calls)."""
        ...


class EpisodicEnvironment(Protocol):
    """A multi-turn environment: tasks, each played out as an episode. The trainer samples a group
    of K episodes per task, all starting from the same first request."""

    name: str

    def tasks(self, rng: random.Random, n: int, split: Split = "training") -> list[Any]: ...

    def episode(self, task: Any) -> Episode: ...


def is_episodic(env: Any) -> bool:
    return callable(getattr(env, "episode", None))


def assistant_message(completion: Completion) -> dict[str, Any]:
    """The model's answer as the assistant message a conversation continues from."""
    message: dict[str, Any] = {"role": "assistant"}
    if completion.text or not completion.tool_calls:
        message["content"] = completion.text
    if completion.tool_calls:
        message["tool_calls"] = completion.tool_calls
    return message


FACTORIES: dict[str, Callable[[str], Environment | EpisodicEnvironment]] = {}


def register(name: str, factory: Callable[[str], Environment | EpisodicEnvironment]) -> None:
    """Make an environment available to tenant configs as `name:args`."""
    FACTORIES[name] = factory


def build(spec: str) -> Environment | EpisodicEnvironment:
    """`name:args` -> an environment registered under `name` (`clora.agents.catalog.make_env`
    makes sure every environment module has registered itself first)."""
    name, _, args = spec.partition(":")
    if name not in FACTORIES:
        raise ValueError(f"unknown environment {name!r}; known: {', '.join(sorted(FACTORIES))}")
    return FACTORIES[name](args)
