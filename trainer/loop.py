"""The training loop: one multi-tenant step, top to bottom, in `Trainer.step`.

  1. Gather, per tenant: on-policy groups sampled now from the live server under the tenant's
     current adapter and scored by its environment; new rated answers and corrections from its
     replay buffer, topped up with older ones (prioritized: corrections first) when few are new.
  2. Swap each tenant's state onto the device.
  3. Forward/backward, gradients accumulating per tenant: on-policy groups through the shared-prefix
     pass (PPO-clip against the logprobs vLLM sampled with, optional KL to the base model); rated
     answers (truncated importance weights against the serving version's logprobs) and
     corrections (SFT, optional DPO against the answer they replaced) through passes shared by
     every tenant's rows.
  4. Per tenant: AdamW, swap out, checkpoint, publish the new version (the gateway loads it and
     switches the customer to it, or keeps it as a candidate for the eval job's promotion gate),
     record which records the version consumed.
A step that fails is retried tenant by tenant; a tenant that fails alone is backed off by the
scheduler, and the others' steps land.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from clora.agents.catalog import make_env
from clora.agents.envs import Completion
from clora.core.admin_client import RuntimeClient
from clora.feedback.replay import ReplayBuffer
from clora.trainer.adapter_store import AdapterStore, TenantState
from clora.trainer.batching import TenantBatch, multi_tenant_backward, sequence_logprobs, shared_prefix_logprobs
from clora.trainer.config import TenantConfig, TenantConfigStore
from clora.trainer.lora import MultiLoRALinear, Segment, bind
from clora.trainer.losses import (
    dpo_loss,
    group_advantages,
    kl_to_reference,
    off_policy_loss,
    ppo_clip_loss,
    sequence_sums,
    sft_loss,
)
from clora.trainer.optim import adamw_step
from clora.wire.feedback import TrainingRecord

log = logging.getLogger("clora.trainer")


@dataclass
class Group:
    """K completions of one prompt, as the server sampled them, with their rewards."""

    prompt_token_ids: list[int]
    completions: list[list[int]]
    logprobs: list[list[float]]
    rewards: list[float]


@dataclass
class TenantData:
    customer: str
    config: TenantConfig
    groups: list[Group] = field(default_factory=list)
    rated: list[TrainingRecord] = field(default_factory=list)
    corrections: list[TrainingRecord] = field(default_factory=list)
    cursor: int = 0  # replay-buffer sequence number of the newest record taken

    def empty(self) -> bool:
        return not (self.groups or self.rated or self.corrections)


@dataclass
class StepReport:
    customer: str
    step: int
    version: str | None
    mean_reward: float | None  # on-policy samples of this step (before the update)
    rated: int
    corrections: int
    losses: dict[str, float]
    seconds: float


class Trainer:
    def __init__(self, model: nn.Module, layers: dict[str, MultiLoRALinear], tokenizer, store: AdapterStore,
                 client: RuntimeClient, replay: ReplayBuffer, configs: TenantConfigStore, base_model: str,
                 pass_tokens: int = 512):
        self.model, self.layers, self.tokenizer = model, layers, tokenizer
        self.store, self.client, self.replay, self.configs = store, client, replay, configs
        self.base_model = base_model
        self.pass_tokens = pass_tokens
        self.device = model.lm_head.weight.device

    # -- the step ----------------------------------------------------------------------------------
    async def step(self, customers: list[str]) -> list[StepReport]:
        started = time.perf_counter()
        # 1. Data for each tenant (sampling for all tenants runs concurrently on the server).
        data = [d for d in await asyncio.gather(*[self.gather(c) for c in customers]) if not d.empty()]
        if not data:
            return []
        # 2-3. Device copies of each tenant's state; gradients of every loss into them.
        states = {d.customer: self.store.swap_in(d.customer) for d in data}
        losses = await asyncio.to_thread(self.backward, data, states)
        # 4. Update, keep, publish.
        reports = []
        for d in data:
            state = states[d.customer]
            adamw_step(state, lr=d.config.lr)
            state.published_version = None  # a new step: not published until publish() says so
            self.store.swap_out(state)
            version = await self.publish(d.customer, switch=not d.config.gated)
            await self.replay.mark_consumed(d.customer, [r.event_id for r in d.rated + d.corrections], version)
            await self.replay.set_cursor(d.customer, d.cursor)
            rewards = [r for g in d.groups for r in g.rewards]
            reports.append(StepReport(d.customer, state.step, version, statistics.fmean(rewards) if rewards else None,
                                      len(d.rated), len(d.corrections), losses[d.customer],
                                      time.perf_counter() - started))
        return reports

    def backward(self, data: list[TenantData], states: dict[str, TenantState]) -> dict[str, dict[str, float]]:
        losses: dict[str, dict[str, float]] = {d.customer: {} for d in data}
        for d in data:  # on-policy: one shared-prefix pass per group
            weights, config = states[d.customer].weights, d.config
            total = sum(len(c) for g in d.groups for c in g.completions)
            for group in d.groups:
                adv = group_advantages(torch.tensor([group.rewards]))[0].to(self.device)
                with bind(self.layers, [Segment(0, len(group.completions), weights)]):
                    result = shared_prefix_logprobs(self.model, group.prompt_token_ids, group.completions)
                old = torch.tensor([lp for lps in group.logprobs for lp in lps], device=self.device)
                loss = ppo_clip_loss(result.logprobs, old, adv[result.rows], config.clip)
                if config.kl_coef:
                    with torch.no_grad():
                        ref = shared_prefix_logprobs(self.model, group.prompt_token_ids, group.completions)
                    loss = loss + config.kl_coef * kl_to_reference(result.logprobs, ref.logprobs)
                share = sum(len(c) for c in group.completions) / total
                (loss * config.weights.onpolicy * share).backward()
                _add(losses[d.customer], "onpolicy", float(loss.detach()) * share)

        rated = [d for d in data if d.rated and d.config.weights.offpolicy]
        if rated:  # production answers with a reward: truncated-IS policy gradient, tenants batched
            advantages = [_centred([r.reward or 0.0 for r in d.rated]) for d in rated]

            def off_policy(t: int, logp: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                d = rated[t]
                behaviour = torch.tensor(_row_values(d.rated, rows, "behaviour_logprobs"), device=logp.device)
                loss = off_policy_loss(logp, behaviour, advantages[t].to(logp.device)[rows], d.config.is_cap)
                return loss * d.config.weights.offpolicy

            batches = [TenantBatch(states[d.customer].weights, [r.prompt_token_ids for r in d.rated],
                                   [r.completion_token_ids for r in d.rated]) for d in rated]
            for d, value in zip(rated, multi_tenant_backward(self.model, self.layers, batches, off_policy,
                                                             self.pass_tokens)):
                _add(losses[d.customer], "offpolicy", value)

        corrected = [d for d in data if d.corrections and d.config.weights.correction]
        if corrected:  # operators' corrections: supervised targets, tenants batched
            batches = [TenantBatch(states[d.customer].weights, [r.prompt_token_ids for r in d.corrections],
                                   [self.target_ids(r) for r in d.corrections]) for d in corrected]
            for d, value in zip(corrected, multi_tenant_backward(
                    self.model, self.layers, batches,
                    lambda t, logp, _rows: sft_loss(logp) * corrected[t].config.weights.correction, self.pass_tokens)):
                _add(losses[d.customer], "correction", value)

        for d in data:
            if d.corrections and d.config.weights.preference:
                _add(losses[d.customer], "preference", self._preference(d, states[d.customer]))
        return losses

    def _preference(self, d: TenantData, state: TenantState) -> float:
        """DPO: the correction over the answer it replaced, against the base model as reference."""
        prompts = [r.prompt_token_ids for r in d.corrections] * 2
        completions = [self.target_ids(r) for r in d.corrections] + [r.completion_token_ids for r in d.corrections]
        n = len(d.corrections)
        with torch.no_grad():
            ref = sequence_logprobs(self.model, prompts, completions)
        ref_sums = sequence_sums(ref.logprobs, ref.rows, 2 * n)
        with bind(self.layers, [Segment(0, 2 * n, state.weights)]):
            result = sequence_logprobs(self.model, prompts, completions)
        sums = sequence_sums(result.logprobs, result.rows, 2 * n)
        loss = dpo_loss(sums[:n], sums[n:], ref_sums[:n], ref_sums[n:], d.config.dpo_beta)
        (loss * d.config.weights.preference).backward()
        return float(loss.detach())

    # -- data ----------------------------------------------------------------------------------------
    async def gather(self, customer: str) -> TenantData:
        config = await self.configs.get(customer) or TenantConfig()
        state = self.store.get(customer) or self.store.create(customer, self.layers, config.lora_spec(), config.seed)
        if state.published_version is None and state.step > 0:
            await self.recover(customer)  # an earlier publish failed: its step must not be skipped
        data = TenantData(customer, config)
        if config.environment and config.weights.onpolicy:
            data.groups = await self.sample_groups(customer, config, state.rng, self.policy_model(customer, state))
        cursor = await self.replay.cursor(customer)
        records, data.cursor = await self.replay.newer(customer, cursor, config.records_per_step)
        if len(records) < config.records_per_step:  # top up from the buffer (replay)
            taken = {r.event_id for r in records}
            older = await self.replay.sample(customer, config.records_per_step, "prioritized", state.rng)
            records += [r for r in older if r.event_id not in taken][:config.records_per_step - len(records)]
        data.rated = [r for r in records if r.reward is not None and r.correction is None and r.completion_token_ids
                      and len(r.behaviour_logprobs) == len(r.completion_token_ids)]
        data.corrections = [r for r in records if r.correction is not None and r.prompt_token_ids]
        return data

    @staticmethod
    def policy_model(customer: str, state: TenantState) -> str:
        """The version holding the weights being trained: the newest published one, which under the
        promotion gate may not be the one served yet (`default`)."""
        return f"{customer}.v{state.published_version}" if state.published_version else "default"

    async def sample_groups(self, customer: str, config: TenantConfig, rng: random.Random,
                            model: str = "default") -> list[Group]:
        env = make_env(config.environment)
        prompts = env.prompts(rng, config.prompts_per_step)
        samples = await asyncio.gather(*[
            self.client.sample(customer, messages, n=config.group_size, max_tokens=config.max_new_tokens,
                               temperature=config.temperature, model=model) for messages in prompts])
        groups = []
        for messages, sampled in zip(prompts, samples):
            choices = [c for c in sampled.choices if c.token_ids]
            rewards = [env.reward(messages, Completion(str(c.message.get("content") or ""), c.token_ids,
                                                       c.finish_reason, c.message.get("tool_calls")))
                       for c in choices]
            groups.append(Group(sampled.prompt_token_ids, [c.token_ids for c in choices],
                                [c.logprobs for c in choices], rewards))
        return groups

    def target_ids(self, record: TrainingRecord) -> list[int]:
        """A correction as the tokens the model should have produced, ending its turn."""
        text = str(record.correction["content"])
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

    async def pending(self, customer: str) -> int:
        """Records in the tenant's replay buffer that it has not trained on yet."""
        return await self.replay.count_newer(customer, await self.replay.cursor(customer))

    # -- versions ------------------------------------------------------------------------------------
    async def publish(self, customer: str, switch: bool = True) -> str:
        """Checkpoint (state + PEFT adapter, whole or absent), then publish it as a new version
        (served now, or a candidate for the promotion gate). The origin names the checkpoint, so a
        restart can tell whether it was published already."""
        checkpoint = self.store.checkpoint(customer, self.base_model)
        origin = f"trainer:{checkpoint.name}"
        published = await self.client.publish(customer, checkpoint / "adapter", origin, switch)
        self.store.mark_published(customer, checkpoint, published["version"])
        log.info("customer %s: step %s published as %s", customer, checkpoint.name, published["name"])
        return published["name"]

    async def recover(self, customer: str) -> None:
        """After a restart: a checkpoint written but not (known to be) published gets published."""
        self.store.discard_partial(customer)
        state = self.store.get(customer)
        checkpoint = self.store.latest_checkpoint(customer)
        if state is None or checkpoint is None or state.published_version is not None:
            return
        origin = f"trainer:{checkpoint.name}"
        listed = await self.client.versions(customer)
        match = next((v for v in listed["versions"] if v.get("source") == origin), None)
        if match is None:
            config = await self.configs.get(customer) or TenantConfig()
            match = await self.client.publish(customer, checkpoint / "adapter", origin, not config.gated)
        self.store.mark_published(customer, checkpoint, match["version"])

    # -- inspection ----------------------------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, customer: str, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
        """The trainer's own greedy completion under the tenant's current weights."""
        state = self.store.swap_in(customer)
        out: list[int] = []
        ids = torch.tensor([prompt_token_ids], device=self.device)
        cache = None
        with bind(self.layers, [Segment(0, 1, state.weights)]):
            for _ in range(max_new_tokens):
                result = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
                cache = result.past_key_values
                token = int(result.logits[0, -1].argmax())
                out.append(token)
                if token == self.tokenizer.eos_token_id:
                    break
                ids = torch.tensor([[token]], device=self.device)
        return out


def _add(losses: dict[str, float], key: str, value: float) -> None:
    losses[key] = losses.get(key, 0.0) + value


def _centred(rewards: list[float]) -> torch.Tensor:
    """Rewards minus their mean (a baseline), unless there is only one."""
    values = torch.tensor(rewards)
    return values - values.mean() if len(rewards) > 1 else values


def _row_values(records: list[TrainingRecord], rows: torch.Tensor, attribute: str) -> list[float]:
    """Per-token values of the given rows, in the order the tokens appear."""
    out: list[float] = []
    previous = -1
    for row in rows.tolist():
        if row != previous:
            out += getattr(records[row], attribute)
            previous = row
    return out
