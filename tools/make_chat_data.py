#!/usr/bin/env python
"""Write the small chat dataset of the fine-tuning recipes (configs/finetune/data/facts-chat.jsonl).

Conversations are generated from plain facts (capitals, arithmetic, unit conversions, antonyms,
spelling): nothing copyrighted, every answer checkable, deterministic for a given seed. Answers
follow one house style (a full sentence restating the question), so a fine-tune visibly learns it.

    python tools/make_chat_data.py                       # rewrites the committed file
    python tools/make_chat_data.py --n 2000 --out my.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Australia": "Canberra", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Ireland": "Dublin", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Hungary": "Budapest", "Czechia": "Prague",
    "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat", "Iceland": "Reykjavik",
}
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "light": "dark", "happy": "sad", "early": "late",
    "strong": "weak", "open": "closed", "full": "empty", "rich": "poor", "high": "low", "young": "old",
    "loud": "quiet", "hard": "soft", "wet": "dry", "near": "far", "first": "last", "up": "down",
}
WORDS = ["river", "garden", "window", "planet", "silver", "candle", "forest", "button", "orange", "rocket",
         "pencil", "castle", "dragon", "violin", "marble", "harbor", "lantern", "meadow", "tiger", "cloud"]
SYSTEMS = [None, None, None, "You are a helpful assistant.", "You answer in one complete sentence."]


def qa(rng: random.Random) -> tuple[str, str]:
    """One question and its house-style answer."""
    kind = rng.choice(["capital", "add", "mul", "km", "hours", "antonym", "spell"])
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
    if kind == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    if kind == "km":
        km = rng.randint(2, 40)
        return f"How many meters are in {km} kilometers?", f"There are {km * 1000} meters in {km} kilometers."
    if kind == "hours":
        h = rng.randint(2, 24)
        return f"How many minutes are in {h} hours?", f"There are {h * 60} minutes in {h} hours."
    if kind == "antonym":
        word = rng.choice(sorted(ANTONYMS))
        return f"What is the opposite of \"{word}\"?", f"The opposite of \"{word}\" is \"{ANTONYMS[word]}\"."
    word = rng.choice(WORDS)
    return f"How do you spell \"{word}\" backwards?", f"\"{word}\" spelled backwards is \"{word[::-1]}\"."


def conversation(rng: random.Random) -> dict:
    """One to three question/answer turns, sometimes after a system message."""
    messages = []
    system = rng.choice(SYSTEMS)
    if system:
        messages.append({"role": "system", "content": system})
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        question, answer = qa(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=600, help="conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "configs/finetune/data/facts-chat.jsonl"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    lines = [json.dumps(conversation(rng)) for _ in range(args.n)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.n} conversations to {args.out}")


if __name__ == "__main__":
    main()
