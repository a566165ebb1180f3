"""Generate the bundled sample corpus (deterministic; the committed .jsonl files are its output).

* ``clean.jsonl``: short, regular English documents (arithmetic word problems with worked answers,
  simple facts): the "high-quality" corpus a reference model is trained on.
* ``noisy.jsonl``: the same kind of documents laid out one sentence group per line, as web pages
  are, with whole lines of web noise among them (navigation boilerplate, random character strings,
  hashes): the "pretraining corpus" selective training and ProX filter.

    python examples/sample_data/make_sample_corpus.py --out examples/sample_data
"""

from __future__ import annotations

import argparse
import json
import os
import random

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Emma", "Farid", "Gus", "Hana", "Ivan", "Jun", "Kira", "Leo"]
ITEMS = ["apples", "books", "coins", "pencils", "stamps", "shells", "cards", "marbles"]
FACTS = [
    "Water boils at 100 degrees Celsius at sea level.",
    "The earth orbits the sun once a year.",
    "A triangle has three sides and three angles.",
    "Plants make sugar from light, water and carbon dioxide.",
    "The moon reflects the light of the sun.",
    "A prime number has exactly two divisors.",
    "Sound travels faster in water than in air.",
    "The heart pumps blood through the body.",
]
NOISE = [
    "Home | About | Contact | Login | Sign up | Cookie settings",
    "Click here to subscribe!!! Limited offer, buy now, free shipping",
    "Copyright 2024 All rights reserved. Terms of use. Privacy policy.",
    "Share on Facebook Share on Twitter Share by email Print this page",
]


def word_problem(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    x, y = rng.randint(2, 40), rng.randint(2, 40)
    if rng.random() < 0.5:
        return (
            f"Question: {a} has {x} {item}. {b} gives {a} {y} more {item}. "
            f"How many {item} does {a} have now? Answer: {x} + {y} = {x + y}. "
            f"{a} has {x + y} {item}."
        )
    x, y = max(x, y), min(x, y)
    return (
        f"Question: {a} has {x} {item} and gives {y} of them to {b}. "
        f"How many {item} are left? Answer: {x} - {y} = {x - y}. {a} has {x - y} {item} left."
    )


def clean_sentences(rng: random.Random) -> list[str]:
    parts = [word_problem(rng) for _ in range(rng.randint(1, 4))]
    parts += rng.sample(FACTS, rng.randint(0, 2))
    rng.shuffle(parts)
    return parts


def clean_document(rng: random.Random) -> str:
    return " ".join(clean_sentences(rng))


def noise(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(NOISE)
    if kind < 0.7:
        return "".join(rng.choice("abcdef0123456789") for _ in range(rng.randint(16, 48)))
    return " ".join(
        "".join(rng.choice("qwxzjkvbpy") for _ in range(rng.randint(2, 7)))
        for _ in range(rng.randint(4, 12))
    )


def noisy_document(rng: random.Random) -> str:
    """A web page's lines: one problem or fact per line with 1-4 noise lines among them, or (one
    page in ten) nothing but noise."""
    if rng.random() < 0.1:
        return "\n".join(noise(rng) for _ in range(rng.randint(3, 8)))
    lines = clean_sentences(rng)
    for _ in range(rng.randint(1, 4)):
        lines.insert(rng.randint(0, len(lines)), noise(rng))
    return "\n".join(lines)


def write(path: str, docs: list[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--clean-docs", type=int, default=800)
    parser.add_argument("--noisy-docs", type=int, default=1600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    write(
        os.path.join(args.out, "clean.jsonl"), [clean_document(rng) for _ in range(args.clean_docs)]
    )
    write(
        os.path.join(args.out, "noisy.jsonl"), [noisy_document(rng) for _ in range(args.noisy_docs)]
    )


if __name__ == "__main__":
    main()
