"""Natural-language tasks for adapters of a small instruct model, generated offline from a seed.

Each task is a function ``(rng) -> (prompt, completion)`` with one exact answer, so a generation is
scored by exact match after stripping surrounding whitespace (``pipeline.evaluate.normalise``).
``write_task`` draws distinct examples and writes mlx-lm's prompt/completion jsonl splits
``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` (no prompt appears in two splits); the same
seed gives the same bytes.

The tasks (prompts are short on purpose: a 135M model learns them from a LoRA in a few hundred
steps, and its base scores near zero on each):

- ``reverse``: ``Reverse the words: red fox jumps`` -> ``jumps fox red`` (3-5 common words);
- ``isodate``: ``Date in ISO format: 7 March 2014`` -> ``2014-03-07``;
- ``json``: ``To JSON: name Alice age 31 city Paris`` -> ``{"name": "Alice", "age": 31, "city": "Paris"}``;
- ``upper``: ``Uppercase: green apple`` -> ``GREEN APPLE`` (2-3 words).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from pipeline.errors import FusionError
from pipeline.io import atomic_dir

WORDS = (
    "red blue green black white brown pink gold apple bread cake fish milk rice salt tea "
    "cat dog bird cow horse lion mouse sheep frog bear car bus boat train plane road bridge "
    "house door window table chair bed lamp clock book pen paper letter phone music song "
    "river lake sea rain snow wind sun moon star tree flower grass stone sand hill field "
    "happy quiet warm cold fast slow big small old new early late king queen child friend"
).split()
NAMES = "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Laura Mark Nina Oscar Paula Sam".split()
CITIES = "Paris London Berlin Madrid Rome Vienna Oslo Dublin Lisbon Prague Warsaw Athens".split()
MONTHS = ("January February March April May June July August September October November "
          "December").split()
DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
MAX_MISSES = 10_000


def reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def isodate(rng: random.Random) -> tuple[str, str]:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, DAYS[month - 1])
    return f"Date in ISO format: {day} {MONTHS[month - 1]} {year}", f"{year:04d}-{month:02d}-{day:02d}"


def to_json(rng: random.Random) -> tuple[str, str]:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    return (f"To JSON: name {name} age {age} city {city}",
            json.dumps({"name": name, "age": age, "city": city}))


def upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 3))
    return f"Uppercase: {' '.join(words)}", " ".join(words).upper()


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": reverse, "isodate": isodate, "json": to_json, "upper": upper,
}


def examples(task: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct ``{"prompt", "completion"}`` examples of ``task`` drawn from ``seed``."""
    if task not in TASKS:
        raise FusionError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    make, rng = TASKS[task], random.Random(f"{task}:{seed}")
    seen: dict[str, str] = {}
    misses = 0  # draws in a row that gave nothing new: the task has run out of distinct prompts
    while len(seen) < n and misses < MAX_MISSES:
        prompt, completion = make(rng)
        misses = misses + 1 if prompt in seen else 0
        seen.setdefault(prompt, completion)
    if len(seen) < n:
        raise FusionError(f"task {task!r} has fewer than {n} distinct examples")
    return [{"prompt": p, "completion": c} for p, c in seen.items()]


def write_task(out: str | Path, task: str, sizes: dict[str, int], seed: int) -> dict[str, int]:
    """Write ``out/{split}.jsonl`` for each split in ``sizes`` (e.g. train/valid/test), disjoint.

    Returns the number of examples per split. ``out`` is replaced atomically.
    """
    drawn = examples(task, sum(sizes.values()), seed)
    with atomic_dir(out) as tmp:
        at = 0
        for split, n in sizes.items():
            lines = [json.dumps(e, ensure_ascii=False) for e in drawn[at: at + n]]
            (tmp / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            at += n
    return dict(sizes)


def write_union(out: str | Path, sources: list[Path], seed: int, splits=("train", "valid")) -> dict[str, int]:
    """Write ``out/{split}.jsonl`` as the union of the ``sources`` directories' splits, shuffled
    from ``seed`` (the joint-training baseline's data). Returns the number of examples per split."""
    rng = random.Random(f"union:{seed}")
    sizes = {}
    with atomic_dir(out) as tmp:
        for split in splits:
            lines = [line for src in sources
                     for line in (Path(src) / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line]
            rng.shuffle(lines)
            (tmp / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            sizes[split] = len(lines)
    return sizes
