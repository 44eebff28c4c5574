"""Tool-use arithmetic, the report's setting: GSM8K-style word problems from a seeded generator.

The agent must call a `calculator` tool (it evaluates +, -, *, / and parentheses, nothing else)
and then `final_answer`; the reward is 1.0 only when `final_answer` carries the right number. No
dataset can be downloaded here, so problems are generated: each level adds a step (level 1: one
operation, level 4: four), numbers grow with the level, and every problem carries the expression
that solves it, so answers are exact by construction.

Level 0 is the documented variant SmolLM2-135M learns at our scale (BENCHMARKS.md, "Agent RL"): a
level-1 problem whose question also states the expression ("Compute it as 7 + 5."), and whose
reward additionally requires a correct tool call (a calculator result equal to the answer). At
level 1 the 135M model mostly invents numbers the problem does not contain, and 10 GRPO steps did
not move its held-out reward; with the expression stated, what is left to learn is the protocol
itself: copy the expression into the calculator, report the tool's result.
"""

from __future__ import annotations

import ast
import json
import operator
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from clora.agents.envs import Completion, Split, assistant_message, register, split_of

LEVELS = (0, 1, 2, 3, 4)  # 0: level 1 with the expression stated (the variant)
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards"]

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "calculator", "strict": True,
        "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {
            "type": "string", "pattern": "^[0-9+*/(). -]+$", "minLength": 1, "maxLength": 80}},
                       "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "final_answer", "strict": True,
        "description": "Give the final numeric answer to the problem.",
        "parameters": {"type": "object", "properties": {"answer": {"type": "number"}},
                       "required": ["answer"], "additionalProperties": False}}},
]
SYSTEM = ("You solve math word problems. First call the calculator tool with the expression that "
          "answers the question, then call final_answer with its result.")


@dataclass(frozen=True)
class Problem:
    question: str
    expression: str  # solves it
    answer: int
    level: int

    def messages(self) -> list[dict[str, Any]]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question}]


def generate(rng: random.Random, level: int) -> Problem:
    """One problem with `level` operations (level 0: one, with the expression stated); whole,
    non-negative intermediate results."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}")
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    operations = max(level, 1)
    top = 10 * operations
    value = rng.randint(2, top)
    expression = str(value)
    sentences = [f"{name} has {value} {item}."]
    for _ in range(operations):
        kind = rng.choice(["add", "sub", "mul", "div"] if operations > 1 else ["add", "sub"])
        if kind == "add":
            n = rng.randint(2, top)
            sentences.append(f"{name} gets {n} more.")
            expression, value = f"({expression} + {n})", value + n
        elif kind == "sub" and value > 2:
            n = rng.randint(1, value - 1)
            sentences.append(f"{name} gives away {n}.")
            expression, value = f"({expression} - {n})", value - n
        elif kind == "div" and any(value % d == 0 for d in range(2, 6)):
            d = rng.choice([d for d in range(2, 6) if value % d == 0])
            sentences.append(f"{name} shares them equally among {d} friends and keeps one share.")
            expression, value = f"({expression} / {d})", value // d
        else:
            n = rng.randint(2, 4)
            sentences.append(f"{name} ends up with {n} times as many.")
            expression, value = f"({expression} * {n})", value * n
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    expression = expression[1:-1] if expression.startswith("(") else expression
    if level == 0:
        question += f" Compute it as {expression}."
    return Problem(question, expression, value, level)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expression: str) -> Fraction:
    """Exact value of an arithmetic expression; anything but numbers, + - * / and parentheses is
    refused (ValueError): the tool never runs code."""
    if len(expression) > 200:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"not allowed in an expression: {ast.dump(node)[:60]}")

    return value(tree)


def calculator_result(expression: str) -> str:
    """What the calculator tool returns to the agent (an error is a message, not an exception)."""
    try:
        result = calculate(expression)
    except ValueError as exc:
        return f"error: {exc}"
    return str(result.numerator) if result.denominator == 1 else f"{float(result):.6g}"


def reward(problem: Problem, final_answer: Any) -> float:
    """1.0 only for the right number (ints and floats that equal it; nothing else)."""
    if isinstance(final_answer, bool) or not isinstance(final_answer, (int, float)):
        return 0.0
    return 1.0 if abs(final_answer - problem.answer) < 1e-6 else 0.0


def generate_in(rng: random.Random, level: int, split: Split = "training") -> Problem:
    """A problem whose question belongs to `split` (drawn until one does): training problems and
    eval problems never coincide, whatever the seeds."""
    while True:
        problem = generate(rng, level)
        if split_of(problem.question) == split:
            return problem


PROTOCOL = ("calculator", "final_answer")  # the tool each turn must call


def tool_arguments(completion: Completion, tool: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The first call of `tool` in an answer and its parsed arguments (None where there is none)."""
    calls = [c for c in completion.tool_calls or [] if (c.get("function") or {}).get("name") == tool]
    if not calls:
        return None, None
    try:
        arguments = json.loads(calls[0]["function"].get("arguments") or "")
    except json.JSONDecodeError:
        return calls[0], None
    return calls[0], arguments if isinstance(arguments, dict) else None


@dataclass
class ArithmeticEpisode:
    """The report's protocol: turn 1 calls the calculator (its result goes back as a `tool`
    message), turn 2 calls `final_answer`; each request names its turn's tool (`tool_choice`), the
    model writes the arguments. Reward 1.0 only for the right number after a calculator call (at
    level 0, after a correct one: a calculator result equal to the answer)."""

    problem: Problem
    messages: list[dict[str, Any]] = field(default_factory=list)
    turn: int = 0
    reward: float = 0.0
    final_answer: Any = None
    calculator_calls: list[tuple[str, str]] = field(default_factory=list)  # (expression, result)
    stopped: str | None = None  # None while running; "completed" or why it ended early

    def __post_init__(self) -> None:
        self.messages = self.messages or self.problem.messages()

    def next_request(self) -> dict[str, Any] | None:
        if self.stopped is not None:
            return None
        tool = PROTOCOL[self.turn]
        return {"messages": list(self.messages), "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": tool}}}

    def observe(self, completion: Completion) -> None:
        tool = PROTOCOL[self.turn]
        self.turn += 1
        call, arguments = tool_arguments(completion, tool)
        if call is None or arguments is None:
            self.stopped = f"no valid {tool} call"
        elif tool == "final_answer":
            self.final_answer = arguments.get("answer")
            self.reward = reward(self.problem, self.final_answer) if self.tool_call_counts() else 0.0
            self.stopped = "completed"
        else:
            expression = str(arguments.get("expression", ""))
            result = calculator_result(expression)
            self.calculator_calls.append((expression, result))
            self.messages += [assistant_message(completion),
                              {"role": "tool", "tool_call_id": call.get("id", ""), "content": result}]


    def tool_call_counts(self) -> bool:
        """A calculator call was made; at level 0 it must also have been correct."""
        if self.problem.level == 0:
            return any(result == str(self.problem.answer) for _, result in self.calculator_calls)
        return bool(self.calculator_calls)


class ArithmeticEnv:
    """`arithmetic:<level>`: tool-use word problems as a trainer environment (episodic)."""

    def __init__(self, level: int):
        if level not in LEVELS:
            raise ValueError(f"arithmetic level must be one of {LEVELS}")
        self.level, self.name = level, f"arithmetic:{level}"

    def tasks(self, rng: random.Random, n: int, split: Split = "training") -> list[Problem]:
        return [generate_in(rng, self.level, split) for _ in range(n)]

    def episode(self, task: Problem) -> ArithmeticEpisode:
        return ArithmeticEpisode(task)


register("arithmetic", lambda args: ArithmeticEnv(int(args or 1)))
