"""The training loop against the real runtime (gateway + vLLM with the tiny model): two customers
with opposite rewards each learn their own, on single answers and on two-turn episodes; every step
is hot-swapped into the live server, and the server's greedy output for a published version is the
trainer's own."""

from __future__ import annotations

import asyncio
import statistics
import time
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import torch

from clora.agents import envs, tokens
from clora.core.admin_client import RuntimeClient
from clora.core.customers import CustomerStore
from clora.core.tenant_configs import TenantConfigStore
from clora.feedback.replay import ReplayBuffer
from clora.trainer.adapter_store import AdapterStore
from clora.trainer.batching import sequence_logprobs
from clora.trainer.data import TrainerIO
from clora.trainer.loop import Trainer, drive, step
from clora.trainer.lora import Segment, bind, spec_of
from clora.trainer.model import load_model
from clora.trainer.report import StepReport
from clora.trainer.scheduler import Candidate, Scheduler
from clora.trainer.step import greedy
from clora.trainer.versions import Publisher
from clora.wire.trainer_config import TenantConfig
from tests.conftest import ADMIN_KEY
from tests.test_gateway import client_for

pytestmark = pytest.mark.slow

STEPS = 16


def register_opposite_targets(model) -> None:
    """Two opposite rewards a random model can learn. Project every token's output embedding on a
    random direction u: `aligned:+` rewards tokens from the top quarter and penalises the bottom
    quarter, `aligned:-` the reverse (reward 0.5 + 0.5 * (share rewarded - share penalised)).
    Moving the last hidden state along u (or -u) moves a whole quarter at once; arbitrary token
    sets (say, low vs high ids) would be unlearnable, their mean embeddings being the same."""
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    projection = model.lm_head.weight.detach() @ u
    low_q, high_q = torch.quantile(projection, torch.tensor([0.25, 0.75]))
    top = frozenset(torch.nonzero(projection > high_q).flatten().tolist())
    bottom = frozenset(torch.nonzero(projection < low_q).flatten().tolist())
    sets = {"+": (top, bottom), "-": (bottom, top)}
    envs.register("aligned", lambda sign: Aligned(f"aligned:{sign}", *sets[sign]))
    envs.register("relay", lambda sign: Relay(Aligned(f"aligned:{sign}", *sets[sign])))


def make_trainer(tiny_model: Path, gateway: str, redis_client, root: Path) -> Trainer:
    """Wired as `clora train`'s main wires it (the model loaded the same way, on the CPU)."""
    model, layers, tokenizer = load_model(tiny_model, "cpu")
    store = AdapterStore(root)
    runtime, configs = RuntimeClient(gateway, ADMIN_KEY), TenantConfigStore(redis_client)
    io = TrainerIO(store, runtime, ReplayBuffer(redis_client), configs, CustomerStore(redis_client), tokenizer)
    return Trainer(model, layers, store, io, Publisher(store, runtime, configs, str(tiny_model)))


def trainer_greedy(trainer: Trainer, customer: str, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """The trainer's own greedy completion under the customer's current weights."""
    state = trainer.store.swap_in(customer)
    return greedy(trainer.model, trainer.layers, state.weights, prompt_token_ids, max_new_tokens,
                  trainer.io.tokenizer.eos_token_id)


class Aligned(tokens.TokenSet):
    def __init__(self, name: str, rewarded: frozenset[int], penalised: frozenset[int]):
        super().__init__(name, rewarded)
        self.penalised = penalised

    def reward(self, prompt, completion: envs.Completion) -> float:
        bad = sum(t in self.penalised for t in completion.token_ids) / max(1, len(completion.token_ids))
        return 0.5 + 0.5 * (super().reward(prompt, completion) - bad)


class Relay:
    """A two-turn episode: the model writes, the environment answers ("Go on.", as a tool result
    would come back), the model writes again; the reward scores the tokens of both turns."""

    def __init__(self, scorer: Aligned):
        self.scorer, self.name = scorer, f"relay:{scorer.name}"

    def tasks(self, rng, n: int, split: envs.Split = "training") -> list[list[dict]]:
        return tokens.topic_prompts(rng, n, split)

    def episode(self, task: list[dict]) -> RelayEpisode:
        return RelayEpisode(self.scorer, list(task))


class RelayEpisode:
    def __init__(self, scorer: Aligned, messages: list[dict]):
        self.scorer, self.messages, self.token_ids, self.reward = scorer, messages, [], 0.0

    def next_request(self) -> dict | None:
        return {"messages": list(self.messages)} if len(self.messages) < 5 else None

    def observe(self, completion: envs.Completion) -> None:
        self.token_ids += completion.token_ids
        self.messages += [envs.assistant_message(completion), {"role": "user", "content": "Go on."}]
        self.reward = self.scorer.reward(self.messages, envs.Completion("", self.token_ids))


LR = 1.5e-2
# A reward gain that only learning makes: with the learning rate at 0 the gain of these 16-step
# curves stays within +-0.02 (sampling noise); learning makes 0.10-0.25.
LEARNED = 0.06


def gains(rewards: list[float]) -> float:
    """Mean reward of the last four steps minus the first two's."""
    return statistics.fmean(rewards[-4:]) - statistics.fmean(rewards[:2])


async def test_two_customers_learn_opposite_targets_over_two_turn_episodes(
        gateway, make_customer, redis_url, tiny_model, tmp_path):
    """Multi-turn GRPO end to end: episodes sampled turn by turn through the server under each
    customer's newest version, both customers' turns trained in shared passes."""
    redis_client = aioredis.Redis.from_url(redis_url)
    trainer = make_trainer(tiny_model, gateway, redis_client, tmp_path / "trainer")
    low, _ = make_customer("relay-low")
    high, _ = make_customer("relay-high")
    register_opposite_targets(trainer.model)
    for name, env in ((low, "relay:+"), (high, "relay:-")):
        await trainer.io.configs.set(name, TenantConfig(environment=env, lr=LR, rank=8, alpha=16, group_size=8,
                                                        prompts_per_step=6, max_new_tokens=8, seed=2))
    rewards: dict[str, list[float]] = {low: [], high: []}
    try:
        for _ in range(STEPS):
            reports = await step(trainer, [low, high])
            for report in reports:
                rewards[report.customer].append(report.mean_reward)
                # Where the step's time went: sampling through the server, then the backward.
                assert 0 < report.gather_s and 0 < report.backward_s
                assert report.gather_s + report.backward_s <= report.seconds
        for name in (low, high):
            assert len(rewards[name]) == STEPS
            assert gains(rewards[name]) > LEARNED, (name, [round(r, 3) for r in rewards[name]])
    finally:
        await trainer.io.client.close()
        await redis_client.aclose()


async def test_two_customers_learn_opposite_targets_and_serve_what_the_trainer_computes(
        gateway, make_customer, redis_url, tiny_model, tmp_path):
    redis_client = aioredis.Redis.from_url(redis_url)
    trainer = make_trainer(tiny_model, gateway, redis_client, tmp_path / "trainer")
    low, _ = make_customer("low")
    high, _ = make_customer("high")
    register_opposite_targets(trainer.model)
    for name, env in ((low, "aligned:+"), (high, "aligned:-")):
        await trainer.io.configs.set(name, TenantConfig(environment=env, lr=LR, rank=8, alpha=16, group_size=8,
                                                        prompts_per_step=6, max_new_tokens=12, seed=1))
    rewards: dict[str, list[float]] = {low: [], high: []}
    try:
        for _ in range(STEPS):
            reports = await step(trainer, [low, high])
            assert {r.customer for r in reports} == {low, high}
            for report in reports:
                rewards[report.customer].append(report.mean_reward)
        # Both learned their own target, from the samples the server produced with each new version.
        for name in (low, high):
            assert gains(rewards[name]) > LEARNED, (name, [round(r, 3) for r in rewards[name]])
        versions = await trainer.io.client.versions(low)
        assert versions.current == f"{low}.v{STEPS}" and len(versions.versions) == STEPS

        # The server's greedy answer under the published version is the trainer's own.
        prompt = [{"role": "user", "content": "Write about the sea."}]
        other_before = await trainer.io.client.sample(high, prompt, n=1, max_tokens=12, temperature=0)
        served = await trainer.io.client.sample(low, prompt, n=1, max_tokens=12, temperature=0)
        assert served.adapter == f"{low}.v{STEPS}"
        assert served.choices[0].token_ids == trainer_greedy(trainer, low, served.prompt_token_ids, 12)

        # One more step for `low` only: its new version is served, `high`'s output is unchanged.
        await step(trainer, [low])
        served_next = await trainer.io.client.sample(low, prompt, n=1, max_tokens=12, temperature=0)
        assert served_next.adapter == f"{low}.v{STEPS + 1}"
        assert served_next.choices[0].token_ids == trainer_greedy(trainer, low, served_next.prompt_token_ids, 12)
        other_after = await trainer.io.client.sample(high, prompt, n=1, max_tokens=12, temperature=0)
        assert other_after.adapter == other_before.adapter
        assert other_after.choices[0].token_ids == other_before.choices[0].token_ids
    finally:
        await trainer.io.client.close()
        await redis_client.aclose()


async def test_pipelined_steps_learn_from_rollouts_sampled_while_the_other_half_trains(
        gateway, make_customer, redis_url, tiny_model, tmp_path):
    """The loop as `clora train` drives it, pipelined: four tenants take turns in halves, each
    half's rollouts sampled by the engine while the trainer computes the other half's step, so
    they come from its newest version (none lagged): their logprob gap stays at vLLM's precision,
    no step is skipped, every customer learns, and the engine and the trainer were busy at the
    same time (their shares of a step's wall time add up to more than 1)."""
    redis_client = aioredis.Redis.from_url(redis_url)
    trainer = make_trainer(tiny_model, gateway, redis_client, tmp_path / "trainer")
    register_opposite_targets(trainer.model)
    names = []
    for label, env in (("pipe-low-a", "aligned:+"), ("pipe-low-b", "aligned:+"), ("pipe-high-a", "aligned:-"),
                       ("pipe-high-b", "aligned:-")):
        name, _ = make_customer(label)
        names.append(name)
        await trainer.io.configs.set(name, TenantConfig(environment=env, lr=LR, rank=8, alpha=16, group_size=8,
                                                        prompts_per_step=6, max_new_tokens=12, seed=3))

    async def candidates() -> list[Candidate]:
        return [Candidate(name, 1.0, samples=True) for name in names]

    steps: list[list[StepReport]] = []
    try:
        async with aclosing(drive(trainer, Scheduler(), candidates, asyncio.Event(), pipeline=True)) as driven:
            async for reports in driven:
                steps.append(reports)
                if len(steps) == 2 * STEPS:
                    break
        halves = [sorted(names)[:2], sorted(names)[2:]]
        for n, reports in enumerate(steps):
            assert sorted(r.customer for r in reports) == halves[n % 2]
            for report in reports:
                assert not report.skipped and report.result.lagged_groups == 0
                assert report.result.gap.tokens > 0 and report.result.gap.mean < 0.01, report.result.gap
                assert 0 < report.engine_busy <= 1 and 0 < report.trainer_busy <= 1
        # From the second step on, each step's rollouts were sampled while the step before computed.
        overlap = statistics.fmean(reports[0].engine_busy + reports[0].trainer_busy for reports in steps[1:])
        assert overlap > 1.0, overlap
        for name in names:
            rewards = [r.mean_reward for reports in steps for r in reports if r.customer == name]
            assert len(rewards) == STEPS and gains(rewards) > LEARNED, (name, [round(r, 3) for r in rewards])
        assert (await trainer.io.client.versions(names[0])).current == f"{names[0]}.v{STEPS}"
    finally:
        await trainer.io.client.close()
        await redis_client.aclose()


async def test_feedback_from_the_webhook_trains_the_customer(gateway, make_customer, redis_url, tiny_model,
                                                             tmp_path):
    """Served answers -> webhook (a correction, a down-rating) -> ingestion -> replay buffer -> steps
    that learn the correction (SFT + DPO) and push the down-rated answer away (off-policy)."""
    redis_client = aioredis.Redis.from_url(redis_url)
    trainer = make_trainer(tiny_model, gateway, redis_client, tmp_path / "trainer")
    customer, key = make_customer("fb")
    await trainer.io.configs.set(customer, TenantConfig(lr=3e-2, rank=8, alpha=16, records_per_step=4,
                                                        weights={"preference": 0.5}))
    client = client_for(gateway, key)
    traces = [client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": f"Say hello to {who}."}], max_tokens=8,
    ).headers["x-clora-trace-id"] for who in ("Ann", "Bob")]
    correction = {"role": "assistant", "content": "Hello Ann, welcome aboard!"}
    for body in ({"trace_id": traces[0], "correction": correction, "source": "operator"},
                 {"trace_id": traces[1], "rating": "down"}):
        resp = httpx.post(f"{gateway}/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert resp.status_code == 202, resp.text
    try:
        deadline = time.monotonic() + 60
        while (await trainer.io.replay.stats(customer)).size < 2:
            assert time.monotonic() < deadline, "feedback never reached the replay buffer"
            await asyncio.sleep(0.2)
        fixed = next(r for r in await trainer.io.replay.sample(customer, 2) if r.correction)
        target = trainer.io.target_ids(fixed)

        def target_logprob() -> float:
            state = trainer.store.swap_in(customer)
            with torch.no_grad(), bind(trainer.layers, [Segment(0, 1, state.weights)]):
                return float(sequence_logprobs(trainer.model, [fixed.prompt_token_ids], [target]).logprobs.sum())

        reports = [await step(trainer, [customer]) for _ in range(4)]
        first = reports[0][0]
        assert (first.rated, first.corrections) == (1, 1)
        assert set(first.result.losses) == {"offpolicy", "correction", "preference"}
        assert first.result.paths == {"importance": 1, "correction": 1}  # sampled at T=1: a ratio
        # Sampled by the base model, which the fresh adapter is: the trainer's logprobs are vLLM's.
        assert 0 < first.result.gap.tokens <= 8 and first.result.gap.mean < 0.01
        # Later steps had no new records: the buffer's records were replayed.
        assert all(r[0].corrections == 1 for r in reports[1:])
        before = TenantConfig(rank=8)  # a fresh adapter (B = 0) is the base model: compare against it
        trainer.store.create("probe", trainer.layers, spec_of(before))
        state = trainer.store.swap_in("probe")
        with torch.no_grad(), bind(trainer.layers, [Segment(0, 1, state.weights)]):
            base = float(sequence_logprobs(trainer.model, [fixed.prompt_token_ids], [target]).logprobs.sum())
        assert target_logprob() > base + 5.0  # the correction became far more likely
        versions = [r[0].version for r in reports]
        assert await trainer.io.replay.consumed_by(customer, fixed.event_id) == versions
        served = await trainer.io.client.sample(customer, fixed.messages, n=1, max_tokens=12, temperature=0)
        assert served.adapter == versions[-1]
        assert served.choices[0].token_ids == trainer_greedy(trainer, customer, served.prompt_token_ids, 12)
    finally:
        await trainer.io.client.close()
        await redis_client.aclose()
