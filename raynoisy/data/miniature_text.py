"""A synthetic miniature of AG News in its release layout (``train.csv``, ``test.csv``, ``classes.txt``).

It lets ``python jobs/text.py`` train a text classifier end to end on a laptop with nothing downloaded,
through the very loader the real release takes (``raynoisy.data.sources.zhang_csv``). Each headline and
description is drawn from templates filled with words of the story's topic, plus words every topic uses
("report", "new", "plan") and, in a share of stories, a word of another topic, so that no single word
decides the class and a model has to read the sentence.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
_TOPIC_WORDS = [
    ["minister", "election", "embassy", "parliament", "ceasefire", "border", "summit", "refugees", "treaty"],
    ["striker", "coach", "tournament", "goal", "season", "championship", "league", "playoff", "stadium"],
    ["shares", "profit", "investors", "merger", "earnings", "inflation", "retailer", "bank", "quarter"],
    ["software", "satellite", "researchers", "chip", "internet", "genome", "robot", "laboratory", "browser"],
]
_SHARED = ["report", "new", "plan", "officials", "record", "talks", "week", "deal", "group", "test"]
_HEADLINES = [
    "{a} {b} as {c} {s}",
    "{s} {a} after {b}",
    "{a} and {b} {s} {c}",
    "{a} {s} {b}",
]
_BODIES = [
    "The {a} said on Monday that the {b} would {s} the {c}.",
    "A {s} about the {a} drew attention to the {b} and the {c}.",
    "Analysts expect the {a} to follow the {b} this {s}, according to a {c}.",
    "After the {a}, the {b} announced a {s} with the {c}.",
]
_OTHER_TOPIC_SHARE = 0.3  # stories that also mention one word of another topic
_STAMP = ".miniature.json"
_GENERATOR_VERSION = 1


def _story(rng: np.random.Generator, topic: int) -> tuple[str, str]:
    words = list(rng.choice(_TOPIC_WORDS[topic], size=3, replace=False))
    if rng.random() < _OTHER_TOPIC_SHARE:
        other = int(rng.choice([t for t in range(len(CLASSES)) if t != topic]))
        words[int(rng.integers(3))] = str(rng.choice(_TOPIC_WORDS[other]))
    fill = {"a": words[0], "b": words[1], "c": words[2], "s": str(rng.choice(_SHARED))}
    title = str(rng.choice(_HEADLINES)).format(**fill)
    body = str(rng.choice(_BODIES)).format(**fill)
    return title[0].upper() + title[1:], body


def build_miniature_ag_news(
    root: Path, *, train_per_class: int = 400, test_per_class: int = 100, seed: int = 0
) -> Path:
    """Write the miniature under ``root`` (once: an up-to-date tree is reused) and return ``root``."""
    args = {"train_per_class": train_per_class, "test_per_class": test_per_class, "seed": seed}
    stamp = root / _STAMP
    wanted = {"version": _GENERATOR_VERSION, **args}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, per_class in (("train.csv", train_per_class), ("test.csv", test_per_class)):
        rows = [(topic, *_story(rng, topic)) for topic in range(len(CLASSES)) for _ in range(per_class)]
        order = rng.permutation(len(rows))
        with (root / name).open("w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream, quoting=csv.QUOTE_ALL)
            writer.writerows((topic + 1, title, body) for topic, title, body in (rows[i] for i in order))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    stamp.write_text(json.dumps(wanted))
    return root
