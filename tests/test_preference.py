"""Customer preference rules: checks, corrections that comply, the content check, and the splits
(training, gate, report) of every environment's prompts, disjoint."""

from __future__ import annotations

import random

import pytest

from clora.agents.arithmetic import generate, generate_in
from clora.agents.catalog import make_env
from clora.agents.envs import FACTORIES, SPLITS, Completion, is_episodic, split_of
from clora.agents.preference import DEMO_RULES, FALLBACK, GATE, REPORT, TRAINING, core_answer, on_topic, questions, rule

ANSWERS = [
    "A bicycle is a vehicle with two wheels. You pedal it to move forward. It is cheap and healthy.",
    "Sure! Here are some facts:\n1. Coffee comes from beans.\n2. It has caffeine.",
    "",
    "word " * 80,
    "- already\n- a list",
    '{"answer": "already json"}',
]


@pytest.mark.parametrize("spec", list(DEMO_RULES.values()))
def test_every_correction_complies_and_only_with_its_own_rule(spec):
    own = rule(spec)
    others = [rule(s) for s in DEMO_RULES.values() if s != spec]
    for answer in ANSWERS:
        corrected = own.apply(answer)
        assert own.check(corrected), (spec, answer, corrected)
        assert not any(o.check(corrected) for o in others), (spec, corrected)
        assert len(corrected.split()) <= 40  # short targets: never cut by max_tokens


def test_checks_reject_near_misses():
    greeting, sign_off = rule("greeting:Ahoy from Acme!"), rule("sign-off:-- The Globex Team")
    assert greeting.check("  Ahoy from Acme! Tea is a drink.") and not greeting.check("Tea. Ahoy from Acme!")
    assert not greeting.check("Ahoy from Acme! Ahoy from Acme!") and not greeting.check("Ahoy from Acme!")
    assert sign_off.check("Tea is a drink.\n-- The Globex Team") and not sign_off.check("-- The Globex Team. Tea.")
    bullets, as_json = rule("bullets"), rule("json")
    assert bullets.check("- one\n- two") and not bullets.check("- one") and not bullets.check("- one\ntwo")
    assert not bullets.check("- one\n- two\n-")
    assert as_json.check('{"answer": "Tea is good."}') and not as_json.check('{"answer": "x"}')
    assert not as_json.check('{"answer": ""}') and not as_json.check('{"answer": "x", "more": 1}')
    assert not as_json.check('Here: {"answer": "x"}')
    with pytest.raises(ValueError, match="unknown rule"):
        rule("shout")


def test_core_answer_keeps_first_sentences_within_the_word_limit():
    assert core_answer("One two three. Four five six. Seven.", max_words=6) == "One two three. Four five six."
    assert len(core_answer("word " * 100).split()) == 12
    assert core_answer("- a\n- b") == "a. b."  # list items become sentences
    assert core_answer("   ") == FALLBACK


@pytest.mark.parametrize("spec", list(DEMO_RULES.values()))
def test_corrections_never_nest(spec):
    """A correction of a correction (or of a half-learnt, cut-off answer) is the same correction."""
    own = rule(spec)
    once = own.apply(ANSWERS[0])
    assert own.apply(once) == once
    cut = once[:len(once) // 2]  # an answer cut at max_tokens midway through the format
    assert own.apply(cut).count("answer") <= 1 and own.check(own.apply(cut))


def test_bullets_split_into_whole_sentences_or_clauses():
    assert rule("bullets").apply("Tea is a drink. It is made from leaves.") == \
        "- Tea is a drink\n- It is made from leaves"
    assert rule("bullets").apply("Tea is a drink made from leaves, and people enjoy it hot.") == \
        "- Tea is a drink made from leaves\n- and people enjoy it hot"


def test_the_subject_pools_are_disjoint_and_the_report_pool_is_large_enough():
    assert not (set(TRAINING) & set(GATE) or set(TRAINING) & set(REPORT) or set(GATE) & set(REPORT))
    assert len(questions(REPORT)) >= 64  # a 90% interval of +/-0.1 on a share needs 64 prompts


SPECS = {"preference": "preference:json", "token-range": "token-range:0-1000", "arithmetic": "arithmetic:2"}


def first_prompts(env, rng: random.Random, n: int, split) -> list[str]:
    """The last message of each prompt (an episodic environment's: each task's first request)."""
    if is_episodic(env):
        return [env.episode(t).next_request()["messages"][-1]["content"] for t in env.tasks(rng, n, split)]
    return [p[-1]["content"] for p in env.prompts(rng, n, split)]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_environments_splits_are_disjoint(name):
    """Training prompts (many draws), gate and report prompts never share a prompt; for preference,
    never a subject either."""
    env = make_env(SPECS[name])
    drawn = {split: {p for seed in range(20) for p in first_prompts(env, random.Random(seed), 50, split)}
             for split in SPLITS}
    assert all(drawn.values())
    assert not (drawn["training"] & drawn["gate"] or drawn["training"] & drawn["report"]
                or drawn["gate"] & drawn["report"])


def test_arithmetic_problems_of_each_split_never_meet():
    problems = {split: {generate_in(random.Random(seed), 2, split).question for seed in range(300)}
                for split in SPLITS}
    assert not (problems["training"] & problems["gate"] or problems["training"] & problems["report"]
                or problems["gate"] & problems["report"])
    assert {split_of(generate(random.Random(s), 2).question) for s in range(50)} == set(SPLITS)


def test_eval_splits_draw_distinct_prompts():
    env = make_env("preference:json")
    report = [p[-1]["content"] for p in env.prompts(random.Random(0), 64, "report")]
    assert len(set(report)) == 64 and set(report) <= set(questions(REPORT))


def test_content_check_fails_a_collapsed_answer():
    question = "Why do people care about a volcano?"
    assert on_topic(question, "Volcanoes shape land and can erupt.")
    for collapsed in ('{"answer": "a b"}', "- a\n- a", "I am happy to help with that."):
        assert not on_topic(question, collapsed)
    env = make_env("preference:json")
    prompt = [{"role": "user", "content": question}]
    assert env.reward(prompt, Completion('{"answer": "A volcano is a mountain that erupts."}', [])) == 1.0
    assert env.reward(prompt, Completion('{"answer": "a b"}', [])) == 0.0  # the form alone no longer scores
    assert env.content(prompt, Completion('{"answer": "a b"}', [])) == 0.0


def test_reward_is_the_rule_check_and_the_content_check():
    env = make_env("preference:sign-off:-- The Globex Team")
    prompt = [{"role": "user", "content": "What is tea?"}]
    assert env.reward(prompt, Completion("Tea is a drink.\n-- The Globex Team", [])) == 1.0
    assert env.reward(prompt, Completion("Tea is a drink.", [])) == 0.0
    assert env.reward(prompt, Completion("It is nice.\n-- The Globex Team", [])) == 0.0

def test_a_list_item_must_say_something():
    bullets = rule("bullets")
    assert bullets.check("- Tea is a drink\n- It is hot") and not bullets.check("- - - -\n- - - -")
    assert not bullets.check("- --\n- --")


def test_rubric_gives_partial_credit_below_a_good_answer_and_none_off_topic():
    env = make_env("preference:one-sentence")
    prompt = [{"role": "user", "content": "What is a volcano?"}]

    def rubric(text: str) -> float:
        return env.rubric(prompt, Completion(text, []))

    good = rubric("A volcano is a mountain that erupts lava.")
    unfinished = rubric("A volcano is a mountain that erupts lava and")
    two = rubric("A volcano is a mountain. It erupts lava.")
    three = rubric("A volcano is a mountain. It erupts lava. It is hot.")
    assert good == 1.0 > unfinished > two > three > 0
    assert rubric("It is a mountain that erupts lava.") == 0.0  # one sentence, but not about the question
    # A rule without a rubric gives no partial credit.
    as_json = make_env("preference:json")
    assert as_json.rubric(prompt, Completion("A volcano is a mountain.", [])) == 0.0
    assert as_json.rubric(prompt, Completion('{"answer": "A volcano erupts."}', [])) == 1.0
