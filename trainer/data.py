"""What a step learns from, read from the gateway and the replay buffer. No torch maths here, and
nothing published (versions.py publishes).

  - `rollouts`: per tenant, on-policy groups (rollouts.py) sampled under the version holding the
    newest weights (the newest published one, else the base model). Sampled ahead (pipelined,
    while the trainer computes the step before), they keep a copy of the weights that sampled
    them: if that step changes the tenant's weights, its groups are one version off-policy (see
    step.py). A tenant's first state starts from the adapter it is served when that has the
    configured shape (else from zero, saying so).
  - `gather`: the step's data: the rollouts, and new rated answers and corrections from the
    replay buffer, topped up with older ones (prioritized: corrections first) when few are new.
    Read only when the step starts, so a record is never taken by two steps.
  - `consumed` / `quarantine`: after the step, which records a version learnt from, and which
    records were moved out (their logprob gap was over the tenant's bound).
  - `candidates`: who has something to learn from, for the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from clora.core.admin_client import RuntimeClient
from clora.core.customers import CustomerStore
from clora.core.halts import TrainingHalts
from clora.core.tenant_configs import TenantConfigStore
from clora.feedback.replay import ReplayBuffer
from clora.trainer.adapter_store import AdapterStore, TenantState
from clora.trainer.lora import LoRAWeights, MultiLoRALinear, load_peft, spec_of
from clora.trainer.rollouts import Group, Rollouts, RolloutSampler
from clora.trainer.scheduler import Candidate
from clora.wire.feedback import TrainingRecord
from clora.wire.trainer_config import TenantConfig

log = logging.getLogger("clora.trainer")


@dataclass
class TenantData:
    """One tenant's data for one step: token ids and numbers, ready for `step.backward`."""

    customer: str
    config: TenantConfig
    groups: list[Group] = field(default_factory=list)
    rated: list[TrainingRecord] = field(default_factory=list)
    corrections: list[TrainingRecord] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)  # the corrections as token ids (when a loss uses them)
    cursor: int = 0  # replay-buffer sequence number of the newest record taken
    baseline: float = 0.0  # the tenant's running mean of rewards before this step
    current: list[bool] = field(default_factory=list)  # per rated record: sampled by the weights being trained
    # The weights that sampled `groups` when they are not those being trained (a pipelined rollout
    # sampled before the previous step changed them): the groups are off-policy by one version.
    behaviour: LoRAWeights | None = None

    def empty(self) -> bool:
        return not (self.groups or self.rated or self.corrections)

    def next_baseline(self) -> float:
        """The running mean of rewards after this step's rated answers (exponential, in record order)."""
        baseline = self.baseline
        for record in self.rated:
            baseline += self.config.baseline_rate * ((record.reward or 0.0) - baseline)
        return baseline


class TrainerIO:
    def __init__(self, store: AdapterStore, client: RuntimeClient, replay: ReplayBuffer, configs: TenantConfigStore,
                 customers: CustomerStore, tokenizer, served_base: str = "base"):
        self.store, self.client, self.replay, self.configs = store, client, replay, configs
        self.customers, self.tokenizer = customers, tokenizer
        self.served_base = served_base  # the base model's name on the server
        self.sampler = RolloutSampler(client)
        self.halts = TrainingHalts(replay.redis)  # tenants whose training is halted: not candidates

    async def config(self, customer: str) -> TenantConfig:
        return await self.configs.get(customer) or TenantConfig()

    # -- what a step learns from ---------------------------------------------------------------
    async def rollouts(self, customer: str, layers: dict[str, MultiLoRALinear], keep_weights: bool = False) -> Rollouts:
        """The tenant's on-policy groups under its newest version (none without an environment);
        its state is restored or created (shaped after `layers`). `keep_weights`: with a copy of
        the weights that sample them (a rollout sampled ahead of the step that trains on it)."""
        async with self.store.lock(customer):
            config = await self.config(customer)
            state = self.store.get(customer) or await self.first_state(customer, layers, config)
            version, model = state.published_version, self.policy_model(customer, state)
            weights = state.weights.copy() if keep_weights else None
        groups = []
        if config.environment and config.weights.onpolicy:
            groups = await self.sampler.groups(customer, config, state.rng, model)
        return Rollouts(config, groups, version, weights)

    async def gather(self, customer: str, rollouts: Rollouts) -> TenantData:
        """The tenant's data for a step: its rollouts and its records."""
        config, state = rollouts.config, self.store.get(customer)
        data = TenantData(customer, config, rollouts.groups, baseline=state.reward_baseline)
        if rollouts.groups and rollouts.version != state.published_version:
            if rollouts.weights is None:  # cannot be corrected for: not trained on
                log.warning("customer %s: rollouts of version %s dropped (the weights are now version %s)",
                            customer, rollouts.version, state.published_version)
                data.groups = []
            data.behaviour = rollouts.weights
        cursor = await self.replay.cursor(customer)
        records, data.cursor = await self.replay.newer(customer, cursor, config.records_per_step)
        if len(records) < config.records_per_step:  # top up from the buffer (replay)
            taken = {r.event_id for r in records}
            older = await self.replay.sample(customer, config.records_per_step, "prioritized", state.rng)
            records += [r for r in older if r.event_id not in taken][:config.records_per_step - len(records)]
        data.rated = [r for r in records if r.reward is not None and r.correction is None and r.completion_token_ids
                      and len(r.behaviour_logprobs) == len(r.completion_token_ids)]
        data.current = [r.adapter_version == state.published_version for r in data.rated]
        data.corrections = [r for r in records if r.correction is not None and r.prompt_token_ids]
        if config.weights.correction or config.weights.preference:  # only the losses that use them
            data.targets = [self.target_ids(r) for r in data.corrections]
        return data

    async def first_state(self, customer: str, layers: dict[str, MultiLoRALinear], config: TenantConfig) -> TenantState:
        """A new tenant's state: the weights of the adapter it is served now when they have the shape
        the config asks for (training continues from what customers see), else a fresh adapter."""
        state = self.store.create(customer, layers, spec_of(config), config.seed)
        served = (await self.client.versions(customer)).served()
        if served is None:
            return state
        start = await asyncio.to_thread(self._load_adapter, Path(served.path))
        reason = self.store.adopt(customer, start, served.version) if isinstance(start, LoRAWeights) else start
        if reason is None:
            log.info("customer %s: training starts from the served adapter %s", customer, served.name)
        else:
            log.warning("customer %s: the served adapter %s does not fit the trainer config (%s): training starts "
                        "from zero (the base model)", customer, served.name, reason)
        return state

    @staticmethod
    def _load_adapter(path: Path) -> LoRAWeights | str:
        try:
            return load_peft(path)
        except (OSError, ValueError, KeyError) as exc:
            return f"unreadable: {exc}"

    def policy_model(self, customer: str, state: TenantState) -> str:
        """The version holding the weights being trained: the newest published one (under the
        promotion gate perhaps not the one served yet), or the base model for a fresh adapter."""
        return f"{customer}.v{state.published_version}" if state.published_version else self.served_base

    def target_ids(self, record: TrainingRecord) -> list[int]:
        """A correction as the tokens the model should have produced, ending its turn."""
        text = str(record.correction["content"])
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

    # -- who has something to learn from -------------------------------------------------------
    async def pending(self, customer: str) -> int:
        """Records in the tenant's replay buffer that it has not trained on yet."""
        return await self.replay.count_newer(customer, await self.replay.cursor(customer))

    async def oldest_pending_age(self, customer: str) -> float:
        """Seconds since the webhook accepted the oldest record the tenant has not trained on (0: none)."""
        records, _ = await self.replay.newer(customer, await self.replay.cursor(customer), 1)
        return max(0.0, time.time() - records[0].created_at) if records else 0.0

    async def candidates(self) -> list[Candidate]:
        """Every customer with its work: a full step's worth with an environment, else its new
        records in steps (nothing below `min_records` until the oldest has waited `max_record_wait_s`)."""
        configs, halted = await self.configs.all(), await self.halts.all()
        out = []
        for customer in [c.name for c in await self.customers.list() if c.name not in halted]:
            config = configs.get(customer) or TenantConfig()
            samples = bool(config.environment and config.weights.onpolicy)
            if samples:
                work = 1.0
            else:
                new = await self.pending(customer)
                due = new >= config.min_records or (
                    new > 0 and await self.oldest_pending_age(customer) >= config.max_record_wait_s)
                work = new / config.records_per_step if due else 0.0
            out.append(Candidate(customer, work, config.priority, samples))
        return out

    async def quarantine(self, customer: str, records: list[TrainingRecord], reason: str) -> int:
        """Records that pushed a step over the logprob-gap bound, out of the buffer into its
        quarantine (never read again); returns how many."""
        return await self.replay.quarantine(customer, [r.event_id for r in records], reason)

    async def consumed(self, data: TenantData, version: str) -> None:
        """The records `version` learnt from, and the replay buffer's cursor past the new ones."""
        await self.replay.mark_consumed(data.customer, [r.event_id for r in data.rated + data.corrections], version)
        await self.replay.set_cursor(data.customer, data.cursor)
