"""Customer preference: each simulated customer has a hidden rule about how answers must look.

A rule can check an answer (the reward and the eval score) and rewrite one so that it complies
(what the simulated operator sends back as a correction). Rules come in two kinds: a phrase the
brand requires (a greeting, a sign-off) and a structural one (a bulleted list, a JSON object).

Questions are generated from templates and subjects; the subjects are split once (`split_of`) into
a training pool (live traffic), a gate pool (the promotion gate's evals) and a report pool (the
scores reported), so an eval question is never trained on and a reported score never selected
what it reports on.

Beside the rule (form), a content check (`on_topic`): the answer must name the question's subject
(one of its content words, singular or plural). It is a key fact every good answer
to these questions states, checkable without a reference model, and exactly what an adapter that
collapsed into its format (`{"answer": "a b"}`, "- a\n- a") loses.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from clora.agents.envs import Completion, Split, in_split, register

TEMPLATES = [
    "What is {s}?", "Explain {s} in simple words.", "Why do people care about {s}?",
    "Give me one useful fact about {s}.", "How would you describe {s} to a child?",
    "What should a beginner know about {s}?",
]
SUBJECTS = [
    "a bicycle", "a volcano", "coffee", "a rainbow", "the ocean tides", "a library card", "bread baking",
    "a compass", "solar panels", "a thunderstorm", "chess", "a lighthouse", "recycling", "the moon",
    "a vaccine", "a bridge", "honey bees", "a violin", "email", "a passport", "tea", "a glacier",
    "a savings account", "yoga", "a microwave oven", "the alphabet", "a river delta", "a keyboard",
    "a fire drill", "maple syrup", "a museum", "a hiking trail", "a weather forecast", "a telescope",
    "composting", "a train station", "a password manager", "a sunflower", "an umbrella", "a map",
    "a podcast", "a heat wave", "a sandwich", "a calendar", "a desert", "a dentist visit",
    "a power outage", "a spreadsheet", "a kite", "a piano", "a lemon tree", "a submarine", "a campfire",
    "a helicopter", "a greenhouse", "an earthquake", "a hot air balloon", "a swimming pool", "a windmill",
    "a dictionary", "a tractor", "a parachute", "a snowman", "a thermometer", "a beehive", "a canal",
    "a marathon", "a printer", "a skyscraper", "a pharmacy", "a robot vacuum", "an orchestra", "a harbour",
    "a cactus", "a satellite", "a wristwatch", "a ferry", "an avalanche", "a bakery", "a tunnel", "a coral reef",
    "a scarecrow", "an elevator", "a newspaper", "a waterfall", "a campsite", "a carpenter", "a penguin",
    "a dam", "a chess clock", "a hammock", "a geyser", "a pottery wheel", "a mailbox", "a tornado", "a sailboat",
]
TRAINING, GATE, REPORT = (in_split(SUBJECTS, split) for split in ("training", "gate", "report"))
POOLS: dict[Split, list[str]] = {"training": TRAINING, "gate": GATE, "report": REPORT}
ARTICLES = {"a", "an", "the"}


def subject_of(question: str) -> str | None:
    """The subject a generated question is about (the longest subject it contains)."""
    found = [s for s in SUBJECTS if s in question]
    return max(found, key=len) if found else None


def on_topic(question: str, answer: str) -> bool:
    """The answer names the question's subject: one of its content words, singular or plural."""
    subject = subject_of(question)
    if subject is None:
        return True
    words = set(re.findall(r"[a-z]+", answer.lower()))
    return any(forms(key) & words for key in subject.split() if key not in ARTICLES)


def forms(word: str) -> set[str]:
    """A noun and its plural ("volcano", "volcanoes"; "battery", "batteries")."""
    out = {word, word + "s", word + "es"}
    return out | ({word[:-1] + "ies"} if word.endswith("y") else set())


def questions(subjects: list[str]) -> list[str]:
    return [t.format(s=s) for s in subjects for t in TEMPLATES]


_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z0-9]{2,}")  # a list item says something ("- - -" is not an item)
_CLAUSE = re.compile(r",\s+|;\s+|\s+(?=and |because |so |which |but )")
FALLBACK = "I am happy to help with that."


def _unwrap(text: str) -> str:
    """An answer without a JSON wrapper or list markers: corrections of corrections never nest."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
            text = str(value.get("answer", "")) if isinstance(value, dict) else text
        except json.JSONDecodeError:
            text = re.sub(r'^\{\s*"answer"\s*:\s*"?', "", text).rstrip('"} ')
    lines = [line.strip(" -*#•\t") for line in text.splitlines() if line.strip(" -*#•\t")]
    return " ".join(line if line[-1] in ".!?:" else line + "." for line in lines)  # a line is a sentence


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(_unwrap(text)) if s.strip()]


def core_answer(text: str, max_words: int = 12) -> str:
    """The gist of an answer: its first sentences, at most `max_words` words, as one plain line.
    Corrections are built from it, so targets stay short (a sign-off cut by max_tokens is lost)."""
    out: list[str] = []
    for sentence in sentences(text):
        words = sentence.split()
        if out and len(out) + len(words) > max_words:
            break
        out += words[:max_words - len(out)]
    answer = " ".join(out).strip()
    if answer and answer[-1] not in ".!?":
        answer = answer.rstrip(",;:") + "."
    return answer or FALLBACK


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str  # "phrase" or "structure"
    description: str
    check: Callable[[str], bool]
    apply: Callable[[str], str]  # a complying version of an answer (idempotent)
    # How close an answer that breaks the rule comes to it (0..1, below a complying answer's 1.0):
    # partial credit on an operator's rubric, for customers who score answers instead of correcting them.
    closeness: Callable[[str], float] = lambda text: 0.0


def _greeting(phrase: str) -> Rule:
    def check(text: str) -> bool:  # once, at the start, followed by an actual answer
        text = text.strip()
        return text.startswith(phrase) and text.count(phrase) == 1 and len(text[len(phrase):].split()) >= 2

    return Rule(f"greeting:{phrase}", "phrase", f'starts with "{phrase}"', check,
                lambda text: f"{phrase} {core_answer(text.replace(phrase, ''))}")


def _sign_off(phrase: str) -> Rule:
    def check(text: str) -> bool:  # once, at the end, after an actual answer
        text = text.strip()
        return text.endswith(phrase) and text.count(phrase) == 1 and len(text[:-len(phrase)].split()) >= 2

    return Rule(f"sign-off:{phrase}", "phrase", f'ends with "{phrase}"', check,
                lambda text: f"{core_answer(text.replace(phrase, ''))}\n{phrase}")


def _bullets(text: str) -> str:
    """Two or three short items, each a whole sentence or clause (never cut mid-phrase if avoidable)."""
    items = [s.rstrip(".!?") for s in sentences(text)][:3]
    if len(items) < 2:  # one sentence: split it into clauses
        items = [c.strip().rstrip(".!?") for c in _CLAUSE.split(items[0] if items else FALLBACK) if c.strip()]
    if len(items) < 2:
        words = (items[0] if items else FALLBACK).split()
        half = max(1, len(words) // 2)
        items = [" ".join(words[:half]), " ".join(words[half:]) or "that is all"]
    return "\n".join(f"- {' '.join(item.split()[:10])}" for item in items[:3])


def _is_bullets(text: str) -> bool:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return len(lines) >= 2 and all(line.startswith("- ") and _WORD.search(line[2:]) for line in lines)


def _is_json_answer(text: str) -> bool:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == {"answer"} and isinstance(value["answer"], str) \
        and len(value["answer"].split()) >= 2 and "{" not in value["answer"]


def _is_one_sentence(text: str) -> bool:
    """One line, one sentence of at least four words, ending with "." or "!" (not cut off)."""
    text = text.strip()
    return "\n" not in text and text[-1:] in (".", "!") and len(_SENTENCE.split(text)) == 1 \
        and len(text.split()) >= 4


def _one_sentence(text: str) -> str:
    first = sentences(text)[0] if sentences(text) else FALLBACK
    first = " ".join(first.split()[:20]).rstrip(",;:")
    first = first if first[-1:] in (".", "!") else first.rstrip("?") + "."
    return first if len(first.split()) >= 4 else FALLBACK


BULLETS = Rule("bullets", "structure", 'a list: 2 or more lines, each starting with "- "', _is_bullets, _bullets)
def _one_sentence_closeness(text: str) -> float:
    """Half credit for a single (unfinished or multi-line) sentence, less for every sentence more."""
    return 0.5 / max(1, len(sentences(text)))


ONE_SENTENCE = Rule("one-sentence", "structure", "a single sentence on one line", _is_one_sentence, _one_sentence,
                    _one_sentence_closeness)
JSON_ANSWER = Rule("json", "structure", 'a JSON object {"answer": "..."} and nothing else', _is_json_answer,
                   lambda text: json.dumps({"answer": core_answer(text)}))


def rule(spec: str) -> Rule:
    """`greeting:<phrase>`, `sign-off:<phrase>`, `bullets` or `json`."""
    name, _, phrase = spec.partition(":")
    if name == "greeting" and phrase:
        return _greeting(phrase)
    if name == "sign-off" and phrase:
        return _sign_off(phrase)
    if spec == "bullets":
        return BULLETS
    if spec == "json":
        return JSON_ANSWER
    if spec == "one-sentence":
        return ONE_SENTENCE
    raise ValueError(f"unknown rule {spec!r}: use greeting:<phrase>, sign-off:<phrase>, bullets, json or "
                     "one-sentence")


# The demo's customers: two brand phrases, three structures. SmolLM2 follows `one-sentence` in about
# one answer in six at temperature 0.7 (0.16 measured on 180 training questions; 0.20 greedy on the
# report set), so scores alone can teach it: hooli's operator never corrects, it scores each answer
# on a rubric (1.0 when it follows the rule and answers the question, partial credit when it comes
# close: `Rule.closeness`), sent as the feedback's `reward`.
DEMO_RULES: dict[str, str] = {
    "acme": "greeting:Ahoy from Acme!",
    "globex": "sign-off:-- The Globex Team",
    "initech": "bullets",
    "umbrella": "json",
    "hooli": "one-sentence",
}
SCORED_ONLY = frozenset({"hooli"})  # its operator sends rewards only, never a correction


class PreferenceEnv:
    """Questions from the training pool; reward 1.0 when the answer follows the customer's rule."""

    SYSTEM = "You are a helpful assistant. Answer briefly."

    def __init__(self, rule_spec: str):
        self.rule = rule(rule_spec)
        self.name = f"preference:{rule_spec}"

    def _messages(self, question: str) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.SYSTEM}, {"role": "user", "content": question}]

    def prompts(self, rng: random.Random, n: int, split: Split = "training") -> list[list[dict[str, Any]]]:
        """Training: drawn with replacement (live traffic repeats itself); an eval split: distinct."""
        pool = questions(POOLS[split])
        if split == "training":
            return [self._messages(rng.choice(pool)) for _ in range(n)]
        return [self._messages(q) for q in rng.sample(pool, min(n, len(pool)))]

    def reward(self, prompt: list[dict[str, Any]], completion: Completion) -> float:
        """1.0 when the answer follows the rule and still answers the question."""
        return 1.0 if self.rule.check(completion.text) and self.content(prompt, completion) else 0.0

    def rubric(self, prompt: list[dict[str, Any]], completion: Completion) -> float:
        """An operator's graded score: the reward when the answer complies, else partial credit for
        coming close to the rule (only for an answer that still answers the question)."""
        if self.reward(prompt, completion):
            return 1.0
        return self.rule.closeness(completion.text) * self.content(prompt, completion)

    def content(self, prompt: list[dict[str, Any]], completion: Completion) -> float:
        return 1.0 if on_topic(str(prompt[-1]["content"]), _unwrap(completion.text)) else 0.0


register("preference", PreferenceEnv)
