"""Customer preference rules: checks, corrections that comply, and the held-out question split."""

from __future__ import annotations

import random

import pytest

from clora.agents.catalog import make_env
from clora.agents.envs import Completion
from clora.agents.preference import DEMO_RULES, FALLBACK, HELD_OUT, TRAINING, core_answer, questions, rule

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


def test_held_out_questions_never_appear_in_training_prompts():
    assert not set(HELD_OUT) & set(TRAINING)
    env = make_env("preference:json")
    trained = {p[-1]["content"] for p in env.prompts(random.Random(0), 500)}
    held_out = {p[-1]["content"] for p in env.heldout_prompts(random.Random(0), 50)}
    assert trained <= set(questions(TRAINING)) and held_out <= set(questions(HELD_OUT))
    assert not trained & held_out and len(held_out) == 50


def test_reward_is_the_rule_check():
    env = make_env("preference:sign-off:-- The Globex Team")
    prompt = env.prompts(random.Random(1), 1)[0]
    assert env.reward(prompt, Completion("Tea is a drink.\n-- The Globex Team", [])) == 1.0
    assert env.reward(prompt, Completion("Tea is a drink.", [])) == 0.0
