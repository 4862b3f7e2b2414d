"""In-memory scoring (pipeline.live): the same numbers as writing the fused adapter and loading it.

On a small built demo (real base model, real trained adapters, real mlx-lm): every score of the
in-memory path equals the on-disk path's (``fuse`` to a directory, then ``evaluate``) exactly.
"""

from __future__ import annotations

import pytest

from pipeline.demo import DemoConfig, build_demo
from pipeline.errors import FusionError
from pipeline.evaluate import evaluate
from pipeline.fuse import fuse
from pipeline.live import Evaluator, Sources
from pipeline.spec import FusionSpec

SMALL = DemoConfig(
    seed=5, hidden=32, layers=2, heads=4, ff=64,
    pretrain_steps=60, pretrain_batch=16, pretrain_lr=3e-3,
    examples_per_task=48, replay_per_task=8, valid_per_task=12, test_per_task=12,
    adapter_rank=2, adapter_scale=2.0, adapter_iters=10, adapter_batch=8, adapter_lr=2e-3,
)
SCORE = dict(max_examples=12, max_tokens=6, batch_size=8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo(root, SMALL)
    names = sorted(p.name for p in (root / "adapters").iterdir())
    valid = {n: root / "data" / n / "valid.jsonl" for n in names}
    return root, names, valid


@pytest.fixture(scope="module")
def evaluator(demo):
    root, _, valid = demo
    return Evaluator(root / "models" / "base", valid, **SCORE)


@pytest.mark.parametrize("spec", [
    FusionSpec(weights=[0.5, 0.5]),
    FusionSpec(weights=[1.3, 0.0]),            # a zero weight: a smaller exact rank, zero-padded
    FusionSpec(method="ties", weights=[1.0, 0.7], density=0.5),
    FusionSpec(weights=[[1.0, 0.2], [0.1, 0.9]]),  # per-layer weights
], ids=["linear", "zero-weight", "ties", "per-layer"])
def test_in_memory_scores_equal_the_written_adapters(demo, evaluator, tmp_path, spec):
    root, names, valid = demo
    paths = [root / "adapters" / n for n in names[:2]]
    fuse(paths, tmp_path / "fused", spec)
    on_disk = evaluate(root / "models" / "base", tmp_path / "fused", valid, **SCORE)
    in_memory = evaluator.score(Sources(paths).fuse(spec))
    assert in_memory == on_disk
    assert set(evaluator.timings) == {"load", "score"} and all(t >= 0 for t in evaluator.timings.values())


def test_adapter_directories_and_the_base_model_score_as_loaded_from_disk(demo, evaluator):
    root, names, valid = demo
    base = root / "models" / "base"
    for n in names:
        assert evaluator.score(root / "adapters" / n, tasks=[n]) == evaluate(base, root / "adapters" / n,
                                                                             {n: valid[n]}, **SCORE)
    # after every candidate the LoRA layers are gone again: the base model scores as loaded
    assert evaluator.score(None) == evaluate(base, None, valid, **SCORE)


def test_refusals_are_one_line_errors(demo, evaluator, tmp_path):
    root, names, _ = demo
    with pytest.raises(FusionError, match="not an mlx-lm adapter directory"):
        evaluator.score(tmp_path)
    with pytest.raises(FusionError, match="no evaluation set for task"):
        evaluator.score(None, tasks=["nope"])
    with pytest.raises(FusionError, match="expected 2 weights|weights"):
        Sources([root / "adapters" / n for n in names[:2]]).fuse(FusionSpec(weights=[1.0, 1.0, 1.0]))
    assert evaluator.score(None)  # still usable
