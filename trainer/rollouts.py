"""On-policy rollouts: groups sampled through the gateway's admin API and scored by the tenant's
environment (for a multi-turn environment, K episodes per task played out turn by turn, each turn
a request with the tools the agent uses)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

from clora.agents.catalog import make_env
from clora.agents.envs import Completion, Episode, EpisodicEnvironment, is_episodic
from clora.core.admin_client import RuntimeClient
from clora.trainer.lora import LoRAWeights
from clora.wire.interactions import CapturedChoice, Sampler
from clora.wire.trainer_config import TenantConfig


@dataclass
class Turn:
    """A later turn of a multi-turn episode: the prompt the server saw (the conversation so far,
    tool results included) and what it sampled."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]


@dataclass
class Group:
    """K completions of one prompt, as the server sampled them, with their rewards; for a
    multi-turn environment, the first turns of K episodes of one task, each episode's later turns
    in `later` and its final reward in `rewards`."""

    prompt_token_ids: list[int]
    completions: list[list[int]]
    logprobs: list[list[float]]  # vLLM's, per completion token: the sampling policy's (processed)
    rewards: list[float]
    sampler: Sampler  # what they were sampled with (every turn)
    later: list[list[Turn]] = field(default_factory=list)  # per completion: its episode's later turns


@dataclass
class Rollouts:
    """A tenant's on-policy groups for a step, sampled by its weights published as `version`
    (None: the base model), under the tenant's config of that moment."""

    config: TenantConfig
    groups: list[Group]
    version: int | None
    weights: LoRAWeights | None = None  # a copy of the weights that sampled them, if kept (pipelined)


class RolloutSampler:
    """Samples a tenant's groups from the version it names, through the gateway."""

    def __init__(self, client: RuntimeClient):
        self.client = client

    async def groups(self, customer: str, config: TenantConfig, rng: random.Random,
                            model: str = "default") -> list[Group]:
        env = make_env(config.environment)
        if is_episodic(env):
            tasks = env.tasks(rng, config.prompts_per_step)
            return list(await asyncio.gather(*[self.episodes(customer, config, env, task, model)
                                               for task in tasks]))
        prompts = env.prompts(rng, config.prompts_per_step)
        samples = await asyncio.gather(*[
            self.client.sample(customer, messages, n=config.group_size, max_tokens=config.max_new_tokens,
                               temperature=config.temperature, model=model) for messages in prompts])
        groups = []
        for messages, sampled in zip(prompts, samples):
            choices = [c for c in sampled.choices if c.token_ids]
            rewards = [env.reward(messages, completion_of(c)) for c in choices]
            groups.append(Group(sampled.prompt_token_ids, [c.token_ids for c in choices],
                                [c.logprobs for c in choices], rewards, Sampler(temperature=config.temperature)))
        return groups

    async def episodes(self, customer: str, config: TenantConfig, env: EpisodicEnvironment, task: Any,
                              model: str) -> Group:
        """K episodes of one task: their shared first request sampled K times at once, then each
        episode's later turns (tool results fed back) one request at a time, concurrently."""
        episodes = [env.episode(task) for _ in range(config.group_size)]
        request = episodes[0].next_request() or {}
        messages, fields = request.pop("messages"), request
        sampler = Sampler(temperature=config.temperature,
                          constrained="tool_choice" in fields or "response_format" in fields)
        sampled = await self.client.sample(customer, messages, n=config.group_size, max_tokens=config.max_new_tokens,
                                           temperature=config.temperature, model=model, **fields)
        played = [(e, c) for e, c in zip(episodes, sampled.choices) if c.token_ids]
        for episode, choice in played:
            episode.observe(completion_of(choice))
        later = await asyncio.gather(*[self.play_out(customer, config, e, model) for e, _ in played])
        return Group(sampled.prompt_token_ids, [c.token_ids for _, c in played], [c.logprobs for _, c in played],
                     [e.reward for e, _ in played], sampler, list(later))

    async def play_out(self, customer: str, config: TenantConfig, episode: Episode, model: str) -> list[Turn]:
        """An episode's turns after the first, until it is over (a turn that sampled nothing ends it)."""
        turns: list[Turn] = []
        while (request := episode.next_request()) is not None:
            messages = request.pop("messages")
            sampled = await self.client.sample(customer, messages, n=1, max_tokens=config.max_new_tokens,
                                               temperature=config.temperature, model=model, **request)
            choice = sampled.choices[0]
            if not choice.token_ids:
                break
            turns.append(Turn(sampled.prompt_token_ids, choice.token_ids, choice.logprobs))
            episode.observe(completion_of(choice))
        return turns


def completion_of(choice: CapturedChoice) -> Completion:
    """A sampled choice as an environment scores it."""
    return Completion(str(choice.message.get("content") or ""), choice.token_ids, choice.finish_reason,
                      choice.message.get("tool_calls"))
