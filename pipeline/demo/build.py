"""``build_demo``: the whole demo build (data, base model, adapters) under a temporary directory
inside ``root``, renamed into place at the end, so an interrupted build leaves nothing half-written.

Besides one adapter per task it trains the joint-training baseline, ``adapters/joint``: the same
trainer with the same settings and budget (iterations, batch size, rank) as each task's adapter, on
the union of the tasks' training sets (``data/joint``: their train and valid splits, shuffled)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.demo.config import DemoConfig, Progress
from pipeline.demo.pretrain import pretrain_base
from pipeline.demo.tasks import make_task_data, write_jsonl
from pipeline.demo.train import train_adapter
from pipeline.threads import blas_threads

JOINT = "joint"  # the joint-training baseline: one adapter trained on every task's data


def build_demo(root: str | Path, cfg: DemoConfig = DemoConfig(), progress: Progress | None = None) -> dict:
    """Build the demo under ``root``: ``models/base``, ``adapters/<task>``, ``data/<task>``, and the
    joint-training baseline ``adapters/joint`` with its data ``data/joint``.

    Existing outputs of the same names are replaced, and only once everything is built. Returns a
    summary (config, sizes, losses; wall times under ``seconds``, the one part that varies run to run).
    """
    # The demo's matrices are small (~900 x 128 x 512): a second OpenBLAS thread gains little on an
    # idle machine and, on shared cores, its spin-waiting made pretraining 4x slower.
    with blas_threads(1):
        return _build(Path(root), cfg, progress)


def _build(root: Path, cfg: DemoConfig, progress: Progress | None) -> dict:
    from mlx.utils import tree_flatten

    from pipeline.demo.tinymodel import save_model

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=root))
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        sizes = {}
        for k, task in enumerate(cfg.tasks):
            splits = make_task_data(task, cfg)
            for name, rows in splits.items():
                write_jsonl(tmp / "data" / task / f"{name}.jsonl", rows)
            sizes[task] = {"train": len(splits["train"]), "replay": cfg.replay_per_task,
                           "valid": len(splits["valid"]), "test": len(splits["test"])}
            if progress:
                progress("data", k + 1, len(cfg.tasks))
        seconds["data"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        model, config, losses = pretrain_base(cfg, progress)
        base_dir = tmp / "models" / "base"
        save_model(model, config, base_dir)
        n_base = sum(v.size for _, v in tree_flatten(model.parameters()))
        del model
        seconds["pretrain"] = time.perf_counter() - t0

        adapters = {}
        for task in cfg.tasks:
            t0 = time.perf_counter()
            adapters[task] = train_adapter(
                base_dir, tmp / "data" / task, tmp / "adapters" / task, cfg,
                cfg.seed_for("adapter", task), progress, f"adapter {task}")
            seconds[f"adapter {task}"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rng = np.random.default_rng(cfg.seed_for("joint"))
        for split in ("train", "valid"):
            rows = [line for task in cfg.tasks
                    for line in (tmp / "data" / task / f"{split}.jsonl").read_text().splitlines()]
            (tmp / "data" / JOINT).mkdir(parents=True, exist_ok=True)
            (tmp / "data" / JOINT / f"{split}.jsonl").write_text(
                "".join(rows[i] + "\n" for i in rng.permutation(len(rows))), encoding="utf-8")
        sizes[JOINT] = {"train": len((tmp / "data" / JOINT / "train.jsonl").read_text().splitlines())}
        adapters[JOINT] = train_adapter(
            base_dir, tmp / "data" / JOINT, tmp / "adapters" / JOINT, cfg,
            cfg.seed_for("joint"), progress, f"adapter {JOINT}")
        seconds[f"adapter {JOINT}"] = time.perf_counter() - t0

        _move_into_place(tmp, root, ["models/base"] + [f"{d}/{t}" for d in ("adapters", "data")
                                                       for t in (*cfg.tasks, JOINT)])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds["total"] = time.perf_counter() - t_all
    tail = losses[-max(1, len(losses) // 20):]
    return {
        "config": {**asdict(cfg), "tasks": list(cfg.tasks)},
        "data": sizes,
        "base": {"parameters": int(n_base), "pretrain_loss_start": losses[0],
                 "pretrain_loss": float(np.mean(tail))},
        "adapters": adapters,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def _move_into_place(tmp: Path, root: Path, parts: list[str]) -> None:
    """Rename each built ``tmp/part`` to ``root/part``, replacing what was there."""
    for part in parts:
        src, dst = tmp / part, root / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            old = tmp / ".old" / part
            old.parent.mkdir(parents=True, exist_ok=True)
            os.replace(dst, old)
        os.replace(src, dst)
