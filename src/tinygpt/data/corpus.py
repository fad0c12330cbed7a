"""The built-in chat corpus: the English chatterbot-corpus plus generated conversations with
checkable skills, deterministic by seed.

It lets ``tinygpt train`` run with no data at all, and because the skills have right answers
(small sums, reversing or repeating a word, facts from a table) a trained model can be scored
on them, both on questions seen in training and on held-out ones it never saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tinygpt.data.dialogs import Conversation, Message, chatterbot_english

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
    "Greece": "Athens", "Poland": "Warsaw", "Chile": "Santiago", "India": "New Delhi", "China": "Beijing",
}
WORDS = ("cat", "house", "river", "green", "music", "paper", "window", "garden", "light", "stone",
         "bread", "cloud", "tiger", "apple", "train", "chair", "smile", "ocean", "pencil", "forest",
         "lemon", "horse", "candle", "bottle", "mirror", "planet", "rocket", "silver", "winter", "button")


def _held_out(*key: object) -> bool:
    """A fixed fifth of all items, the same on every machine (no use of hash(), which is salted)."""
    return sum(ord(c) * (i + 1) for i, c in enumerate(repr(key))) % 5 == 0


# Each skill maps an item to (question, answer) and lists every item it can ask about.
SKILLS: dict[str, tuple[Callable[[tuple], tuple[str, str]], list[tuple]]] = {
    "addition": (lambda it: (f"what is {it[0]} plus {it[1]}?", f"{it[0]} plus {it[1]} is {it[0] + it[1]}."),
                 [(a, b) for a in range(20) for b in range(20)]),
    "reverse": (lambda it: (f"reverse the word {it[0]}", f"{it[0]} reversed is {it[0][::-1]}."),
                [(w,) for w in WORDS]),
    "repeat": (lambda it: (f"say {it[0]} twice", f"{it[0]} {it[0]}"), [(w,) for w in WORDS]),
    "capital": (lambda it: (f"what is the capital of {it[0]}?",
                            f"The capital of {it[0]} is {CAPITALS[it[0]]}."),
                [(c,) for c in CAPITALS]),
}
HELD_OUT_SKILLS = ("addition", "reverse", "repeat")  # a fact can't be guessed, so capitals are all seen


def skill_items(skill: str, held_out: bool) -> list[tuple[str, str]]:
    """(question, answer) pairs of a skill, either the held-out ones or the ones used in training."""
    make, items = SKILLS[skill]
    hide = skill in HELD_OUT_SKILLS
    return [make(it) for it in items if (hide and _held_out(skill, it)) == held_out]


# Addition has 16 times more distinct items than the other skills, and only generalises to held-out
# sums if the model sees many of them, so it gets most of the draws.
SKILL_WEIGHTS = {"addition": 6, "reverse": 1, "repeat": 1, "capital": 1}


def synthetic_conversations(n: int, seed: int = 0) -> list[Conversation]:
    """n conversations of 1-3 exchanges drawn from the skills' training items."""
    rng = random.Random(seed)
    pools = {s: skill_items(s, held_out=False) for s in SKILLS}
    names = sorted(pools)
    weights = [SKILL_WEIGHTS[s] for s in names]
    convs = []
    for _ in range(n):
        conv: Conversation = []
        for _ in range(rng.randint(1, 3)):
            q, a = rng.choice(pools[rng.choices(names, weights)[0]])
            conv += [Message("user", q), Message("assistant", a)]
        convs.append(conv)
    return convs


def chatterbot_prompts() -> set[str]:
    return {c[0].content for c in chatterbot_english() if c and c[0].role == "user"}


def builtin_conversations(seed: int = 0, n_synthetic: int = 2000) -> list[Conversation]:
    """The default training set: chatterbot's English conversations and the synthetic skills, shuffled."""
    convs = chatterbot_english() + synthetic_conversations(n_synthetic, seed)
    random.Random(seed).shuffle(convs)
    return convs
