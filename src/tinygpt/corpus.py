"""The built-in corpus: short generated conversations, deterministic by seed.

It lets ``tinygpt train`` run with no data at all, and its skills (small sums,
reversing a word, facts from a table) are checkable, so a trained model can be
scored on them.
"""

from __future__ import annotations

import random

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
    "Greece": "Athens", "Poland": "Warsaw", "Chile": "Santiago", "India": "New Delhi", "China": "Beijing",
}
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a tomato": "red", "an orange": "orange", "a plum": "purple",
}
WORDS = ("cat", "house", "river", "green", "music", "paper", "window", "garden", "light", "stone",
         "bread", "cloud", "tiger", "apple", "train", "chair", "smile", "ocean", "pencil", "forest")
GREETINGS = (
    ("hello", "Hello! How can I help you?"),
    ("hi", "Hi there! What would you like to talk about?"),
    ("good morning", "Good morning! I hope your day goes well."),
    ("how are you?", "I am fine, thank you. How are you?"),
    ("thank you", "You are welcome."),
    ("what is your name?", "I am tinygpt, a small language model."),
    ("who made you?", "I was trained with tinygpt on a small corpus."),
    ("bye", "Goodbye! Talk to you soon."),
)


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(20), rng.randrange(20)
    if rng.random() < 0.5:
        return f"what is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return f"what is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def reverse_word(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"reverse the word {w}", f"{w} reversed is {w[::-1]}."


def capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"what is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def colour(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(sorted(COLOURS))
    return f"what colour is {thing}?", f"{thing[0].upper()}{thing[1:]} is {COLOURS[thing]}."


def greeting(rng: random.Random) -> tuple[str, str]:
    return rng.choice(GREETINGS)


SKILLS = (arithmetic, reverse_word, capital, colour, greeting)


def builtin_documents(n: int = 3000, seed: int = 0) -> list[str]:
    """n conversations of 1-4 exchanges, as 'User: ...' / 'Assistant: ...' lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        turns = [rng.choice(SKILLS)(rng) for _ in range(rng.randint(1, 4))]
        docs.append("".join(f"User: {q}\nAssistant: {a}\n" for q, a in turns))
    return docs
