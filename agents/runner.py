"""Agent episodes through the gateway with the official `openai` SDK (multi-turn tool calling).

An arithmetic episode: the agent is asked a word problem with the `calculator` and `final_answer`
tools. Turn 1 must call the calculator (the tool runs and its result goes back as a `tool` message),
turn 2 must call `final_answer`; the scaffold names the tool each turn (`tool_choice`), the model
writes the arguments under strict schemas. Reward 1.0 only for the right final number after a
calculator call. Every turn is an ordinary served request, so it is captured with its trace id and
can be rewarded through the feedback webhook like any production answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import openai

from clora.agents.arithmetic import TOOLS, Problem, calculator_result, reward

PROTOCOL = ("calculator", "final_answer")


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


def _arguments(raw: str) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


async def run_arithmetic(client: openai.AsyncOpenAI, problem: Problem, *, model: str = "default",
                         max_tokens: int = 64, temperature: float = 0.0, **extra: Any) -> Episode:
    """One episode; `extra` goes into each request (e.g. `logit_bias`)."""
    episode = Episode(problem)
    messages: list[dict[str, Any]] = problem.messages()
    for tool in PROTOCOL:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, tools=TOOLS, max_tokens=max_tokens, temperature=temperature,
            tool_choice={"type": "function", "function": {"name": tool}}, **extra)
        episode.trace_ids.append(raw.headers.get("x-clora-trace-id", ""))
        message = raw.parse().choices[0].message
        calls = [c for c in message.tool_calls or [] if c.function.name == tool]
        arguments = _arguments(calls[0].function.arguments) if calls else None
        if arguments is None:
            episode.stopped = f"no valid {tool} call"
            return episode
        if tool == "final_answer":
            episode.final_answer = arguments.get("answer")
            episode.reward = reward(problem, episode.final_answer) if episode.calculator_calls else 0.0
            return episode
        expression = str(arguments.get("expression", ""))
        result = calculator_result(expression)
        episode.calculator_calls.append((expression, result))
        messages += [message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}),
                     {"role": "tool", "tool_call_id": calls[0].id, "content": result}]
    return episode
