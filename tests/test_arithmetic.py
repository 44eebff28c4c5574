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
            assert p.expression.count("(") == max(level, 1) - 1  # one operation per level (level 0: one)
            if level == 0:  # the variant states the expression, never the answer
                question, stated = p.question.split(" Compute it as ")
                assert stated == f"{p.expression}." and question.endswith("have now?")
            else:
                question = p.question
            assert question.endswith("have now?") and str(p.answer) not in question.split(".")[-1]
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


def call(name: str, arguments: str, call_id: str = "call-1") -> list[dict]:
    return [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]


def test_an_episode_asks_for_each_tool_in_turn_and_feeds_the_calculator_back():
    from clora.agents.arithmetic import ArithmeticEpisode, Problem
    from clora.agents.envs import Completion

    episode = ArithmeticEpisode(Problem("Ana has 3 apples. Ana gets 4 more. How many?", "3 + 4", 7, 1))
    first = episode.next_request()
    assert first["tool_choice"]["function"]["name"] == "calculator" and first["tools"] == TOOLS
    episode.observe(Completion("", [1, 2], "tool_calls", call("calculator", '{"expression": "3 + 4"}')))
    second = episode.next_request()
    assert second["tool_choice"]["function"]["name"] == "final_answer"
    assistant, tool = second["messages"][-2:]
    assert assistant == {"role": "assistant", "tool_calls": call("calculator", '{"expression": "3 + 4"}')}
    assert tool == {"role": "tool", "tool_call_id": "call-1", "content": "7"}
    assert episode.reward == 0.0  # nothing until the final answer
    episode.observe(Completion("", [3], "tool_calls", call("final_answer", '{"answer": 7}', "call-2")))
    assert episode.next_request() is None and episode.reward == 1.0 and episode.stopped == "completed"


def test_an_episode_ends_without_reward_on_a_missing_or_broken_call():
    from clora.agents.arithmetic import ArithmeticEpisode, Problem
    from clora.agents.envs import Completion

    problem = Problem("Ana has 3 apples. Ana gets 4 more. How many?", "3 + 4", 7, 1)
    for answer in (Completion("7", [1]), Completion("", [1], None, call("calculator", "{not json"))):
        episode = ArithmeticEpisode(problem)
        episode.observe(answer)
        assert episode.next_request() is None and episode.reward == 0.0
        assert episode.stopped == "no valid calculator call"
    wrong = ArithmeticEpisode(problem)
    wrong.observe(Completion("", [1], None, call("calculator", '{"expression": "3 * 4"}')))
    wrong.observe(Completion("", [2], None, call("final_answer", '{"answer": 12}')))
    assert wrong.reward == 0.0 and wrong.stopped == "completed" and wrong.calculator_calls == [("3 * 4", "12")]


def test_the_stated_variant_rewards_only_a_correct_tool_call():
    """Level 0 states the expression, so its reward also asks for a calculator result equal to the
    answer: the right number reported after a wrong calculation earns nothing there (at level 1 it
    does, as in the report)."""
    from clora.agents.arithmetic import ArithmeticEpisode, Problem
    from clora.agents.envs import Completion

    for level, expression, earned in ((0, "3 * 4", 0.0), (0, "3 + 4", 1.0), (1, "3 * 4", 1.0)):
        episode = ArithmeticEpisode(Problem("Ana has 3 apples. Ana gets 4 more. How many?", "3 + 4", 7, level))
        episode.observe(Completion("", [1], None, call("calculator", f'{{"expression": "{expression}"}}')))
        episode.observe(Completion("", [2], None, call("final_answer", '{"answer": 7}')))
        assert episode.reward == earned, (level, expression)
