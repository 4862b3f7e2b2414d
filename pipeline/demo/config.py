"""``DemoConfig``: every knob of the demo (the params.yaml ``demo:`` section), checked once, and the
seed of each part of the build derived from its one ``seed``."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np

from pipeline.demo.tasks import ALPHABETS, TASKS
from pipeline.errors import FusionError

# progress(stage, done, total): stage is "data", "pretrain" or "adapter <task>".
Progress = Callable[[str, int, int], None]

# The parts of the build that draw random numbers, each with its own stream (see ``seed_for``).
_STAGES = {"data": 1, "base": 2, "pretrain data": 3, "adapter": 4, "joint": 5}


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo; the defaults build the full demo in about 2 minutes on 2 CPU cores."""

    seed: int = 0
    # base model (llama, byte-level vocabulary)
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    ff: int = 512
    # base pretraining (own loop: AdamW, warmup + cosine)
    pretrain_steps: int = 600
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    # data, per task
    word_length: int = 4
    examples_per_task: int = 1000
    replay_per_task: int = 2000
    valid_per_task: int = 100
    test_per_task: int = 200
    # adapters (mlx-lm trainer, LoRA on every linear layer of every block)
    adapter_rank: int = 8
    adapter_scale: float = 1.0
    adapter_iters: int = 300
    adapter_batch: int = 32
    adapter_lr: float = 1e-3
    tasks: tuple[str, ...] = ("up", "inc", "sh")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "tasks":
                continue
            if f.type == "float" and not isinstance(value, bool) and isinstance(value, (int, float)):
                if not (math.isfinite(value) and value > 0):
                    raise FusionError(f"demo: {f.name} must be a positive number, got {value!r}")
                object.__setattr__(self, f.name, float(value))
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise FusionError(f"demo: {f.name} must be an integer, got {value!r}")
            if f.name in ("seed", "replay_per_task"):
                if value < 0:
                    raise FusionError(f"demo: {f.name} must be >= 0, got {value}")
            elif value < 1:
                raise FusionError(f"demo: {f.name} must be positive, got {value}")
        if not isinstance(self.tasks, tuple) or not self.tasks:
            raise FusionError("demo: tasks must be a non-empty list of task names")
        for t in self.tasks:
            if t not in TASKS:
                raise FusionError(f"demo: unknown task {t!r} (known: {', '.join(TASKS)})")
        if len(set(self.tasks)) != len(self.tasks):
            raise FusionError(f"demo: tasks must be distinct, got {list(self.tasks)}")
        if self.hidden % self.heads:
            raise FusionError(f"demo: hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        need = self.examples_per_task + self.valid_per_task + self.test_per_task
        for t in self.tasks:
            space = len(ALPHABETS[TASKS[t].alphabet]) ** self.word_length
            if need > space // 2:
                raise FusionError(
                    f"demo: task {t!r} has only {space} distinct words of length {self.word_length}; "
                    f"{need} examples per task need a longer word_length")
        if self.adapter_batch > self.examples_per_task + self.replay_per_task:
            raise FusionError("demo: adapter_batch is larger than the training set")
        if self.adapter_batch > self.valid_per_task:
            raise FusionError("demo: valid_per_task must be at least adapter_batch")

    @classmethod
    def from_dict(cls, d: dict | None) -> DemoConfig:
        """The config from a params.yaml ``demo:`` section; unknown keys raise FusionError."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FusionError(f"demo: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        if "tasks" in d:
            tasks = d["tasks"]
            if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not all(
                    isinstance(t, str) for t in tasks):
                raise FusionError(f"demo: tasks must be a list of task names, got {tasks!r}")
            d["tasks"] = tuple(tasks)
        return cls(**d)

    def seed_for(self, stage: str, task: str | None = None) -> int:
        """The seed of one part of the build: ``"data"`` or ``"adapter"`` of a ``task``, the
        ``"base"`` model's initialisation, the ``"pretrain data"`` or the ``"joint"`` adapter (its
        data order and its training); derived from ``seed``.
        A task's stream is keyed by its place in ``TASKS``, not in ``tasks``.
        """
        key = [self.seed, _STAGES[stage]] + ([] if task is None else [list(TASKS).index(task)])
        return int(np.random.SeedSequence(key).generate_state(1)[0])
