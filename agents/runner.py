"""Agent episodes through the gateway with the official `openai` SDK (multi-turn tool calling).

An arithmetic episode: the agent is asked a word problem with the `calculator` and `final_answer`
tools. Turn 1 must call the calculator (the tool runs and its result goes back as a `tool` message),
turn 2 must call `final_answer`; the scaffold names the tool each turn (`tool_choice`), the model
writes the arguments under strict schemas. Reward 1.0 only for the right final number after a
calculator call. Every turn is an ordinary served request, so it is captured with its trace id and
can be rewarded through the feedback webhook like any production answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import openai

from clora.agents.arithmetic import ArithmeticEpisode, Problem
from clora.agents.envs import Completion


@dataclass
class Episode:
    problem: Problem
    reward: float = 0.0
    final_answer: Any = None
    calculator_calls: list[tuple[str, str]] = field(default_factory=list)  # (expression, result)
    trace_ids: list[str] = field(default_factory=list)
    stopped: str = "completed"  # or why it ended early

    @property
    def turns(self) -> int:
        return len(self.trace_ids)


async def run_arithmetic(client: openai.AsyncOpenAI, problem: Problem, *, model: str = "default",
                         max_tokens: int = 64, temperature: float = 0.0, **extra: Any) -> Episode:
    """One episode; `extra` goes into each request (e.g. `logit_bias`)."""
    state, trace_ids = ArithmeticEpisode(problem), []
    while (request := state.next_request()) is not None:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, max_tokens=max_tokens, temperature=temperature, **request, **extra)
        trace_ids.append(raw.headers.get("x-clora-trace-id", ""))
        choice = raw.parse().choices[0]
        tool_calls = [c.model_dump() for c in choice.message.tool_calls or []]
        state.observe(Completion(choice.message.content or "", list(getattr(choice, "token_ids", None) or []),
                                 choice.finish_reason, tool_calls))
    return Episode(problem, state.reward, state.final_answer, state.calculator_calls, trace_ids,
                   state.stopped or "completed")
