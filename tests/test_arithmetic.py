"""The tool-use arithmetic environment: seeded problems whose answers are exact, a calculator that
evaluates arithmetic and nothing else, and a reward only for the right number."""

from __future__ import annotations

import random

import pytest

from clora.agents.arithmetic import LEVELS, TOOLS, calculate, calculator_result, generate, reward


def test_problems_are_seeded_exact_and_harder_by_level():
    for level in LEVELS:
        problems = [generate(random.Random(seed), level) for seed in range(200)]
        assert problems == [generate(random.Random(seed), level) for seed in range(200)]  # same seed, same problem
        for p in problems:
            assert calculate(p.expression) == p.answer and p.answer >= 0  # the answer is the expression's
            assert p.expression.count("(") == level - 1  # one operation per level
            assert p.question.endswith("have now?") and str(p.answer) not in p.question.split(".")[-1]
        assert len({p.question for p in problems}) > 150
    assert max(generate(random.Random(s), 1).answer for s in range(200)) < \
        max(generate(random.Random(s), 4).answer for s in range(200))


def test_calculator_evaluates_arithmetic_and_refuses_everything_else():
    assert calculate("(3 + 4) * 2 - 10 / 4") == pytest.approx(11.5)
    assert calculator_result("7 / 2") == "3.5" and calculator_result("-(2 * 3)") == "-6"
    for bad in ("__import__('os').system('true')", "2 ** 100", "x + 1", "1 / 0", "[1, 2]", "1 +"):
        assert calculator_result(bad).startswith("error:")


def test_reward_is_one_only_for_the_right_number():
    problem = generate(random.Random(3), 2)
    assert reward(problem, problem.answer) == 1.0
    assert reward(problem, float(problem.answer)) == 1.0
    assert reward(problem, problem.answer + 1) == 0.0
    assert reward(problem, str(problem.answer)) == 0.0 and reward(problem, True) == 0.0 and reward(problem, None) == 0.0


def test_tools_are_strict_schemas():
    assert [t["function"]["name"] for t in TOOLS] == ["calculator", "final_answer"]
    assert all(t["function"]["strict"] and not t["function"]["parameters"]["additionalProperties"] for t in TOOLS)
