"""The demo's synthetic tasks and their data sets: examples drawn from a seed, written as jsonl.

A prompt is ``"<name> <word>"`` with a fixed-length word from the task's own alphabet; no task reads
another's output alphabet. A task's splits are disjoint (no input word in two of them), and its
training set also holds "replay" examples: copying a word of another alphabet under a random 2-3
letter prefix that is not a task name, which keeps each adapter neutral away from its own task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from pipeline.demo.config import DemoConfig

LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
DIGITS = "0123456789"
SYMBOLS = "!#$%&*+-/<>?@^~"
ALPHABETS = {"lower": LOWER, "digits": DIGITS, "upper": UPPER, "symbols": SYMBOLS}


def _shift(word: str, alphabet: str) -> str:
    return "".join(alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in word)


@dataclass(frozen=True)
class Task:
    """A synthetic task: ``"<name> <word>"`` -> ``apply(word)``, words drawn from ``alphabet``."""

    name: str
    alphabet: str  # key of ALPHABETS
    apply: Callable[[str], str]
    example: str


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("up", "lower", str.upper, "up abcd -> ABCD"),
        Task("inc", "digits", lambda w: _shift(w, DIGITS), "inc 1234 -> 2345"),
        Task("sh", "symbols", lambda w: _shift(w, SYMBOLS), "sh !#$% -> #$%&"),
    )
}


def random_word(rng: np.random.Generator, alphabet: str, length: int) -> str:
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), length))


def random_prefix(rng: np.random.Generator) -> str:
    """A random 2-3 letter lower-case prefix that is not a task name."""
    while True:
        p = random_word(rng, LOWER, int(rng.integers(2, 4)))
        if p not in TASKS:
            return p


def _distinct_words(rng: np.random.Generator, alphabet: str, length: int, n: int) -> list[str]:
    seen: set[str] = set()
    words = []
    while len(words) < n:
        w = random_word(rng, alphabet, length)
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def make_task_data(task: str, cfg: DemoConfig) -> dict[str, list[dict]]:
    """The train/valid/test examples of one task: ``{"prompt", "completion"}`` dicts.

    Disjoint input words across splits; ``train`` has the task examples and the replay examples
    (copying under a random non-task prefix, alphabets other than the task's own), shuffled.
    """
    spec = TASKS[task]
    rng = np.random.default_rng(cfg.seed_for("data", task))
    n_train, n_valid = cfg.examples_per_task, cfg.valid_per_task
    words = _distinct_words(rng, ALPHABETS[spec.alphabet], cfg.word_length,
                            n_train + n_valid + cfg.test_per_task)

    def pair(word):
        return {"prompt": f"{task} {word}", "completion": spec.apply(word)}

    train = [pair(w) for w in words[:n_train]]
    others = [a for a in ALPHABETS if a != spec.alphabet]
    for _ in range(cfg.replay_per_task):
        word = random_word(rng, ALPHABETS[others[int(rng.integers(len(others)))]], cfg.word_length)
        train.append({"prompt": f"{random_prefix(rng)} {word}", "completion": word})
    train = [train[i] for i in rng.permutation(len(train))]
    return {
        "train": train,
        "valid": [pair(w) for w in words[n_train:n_train + n_valid]],
        "test": [pair(w) for w in words[n_train + n_valid:]],
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

