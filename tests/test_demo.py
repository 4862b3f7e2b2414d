"""The built-in demo, built at a reduced size (a few seconds): files, formats, loading, determinism."""

from __future__ import annotations

import json
import string
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import tree_bytes
from pipeline.demo import ALPHABETS, TASKS, DemoConfig, build_demo, encode_pair, make_task_data
from pipeline.errors import FusionError
from pipeline.evaluate import evaluate, greedy_generate, load_examples, prompt_tokens

SMALL = DemoConfig(
    seed=3, hidden=32, layers=2, heads=4, ff=64,
    pretrain_steps=200, pretrain_batch=32, pretrain_lr=3e-3,
    examples_per_task=64, replay_per_task=16, valid_per_task=16, test_per_task=16,
    adapter_rank=4, adapter_scale=1.0, adapter_iters=12, adapter_batch=8, adapter_lr=1e-3,
)
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    calls = []
    summary = build_demo(root, SMALL, lambda *a: calls.append(a))
    return root, summary, calls


def test_build_writes_every_output_and_nothing_else(demo):
    root, summary, _ = demo
    assert sorted(p.name for p in root.iterdir()) == ["adapters", "data", "models"]  # no temp dir left
    base = root / "models" / "base"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (base / name).is_file()
    for task in SMALL.tasks:
        assert sorted(p.name for p in (root / "adapters" / task).iterdir()) == [
            "adapter_config.json", "adapters.safetensors"]  # no mlx-lm checkpoints
        for split in SPLITS:
            assert (root / "data" / task / f"{split}.jsonl").is_file()
    json.dumps(summary)  # the caller can dump it
    assert summary["config"]["tasks"] == list(SMALL.tasks)
    assert set(summary["adapters"]) == {*SMALL.tasks, "joint"}
    assert summary["base"]["pretrain_loss"] < summary["base"]["pretrain_loss_start"]
    for task, info in summary["adapters"].items():
        assert info["val_loss"] < info["val_loss_start"], task
    assert summary["data"]["up"] == {"train": 80, "replay": 16, "valid": 16, "test": 16}


def test_progress_reports_every_stage(demo):
    _, _, calls = demo
    stages = [c[0] for c in calls]
    assert set(stages) == {"data", "pretrain", *(f"adapter {t}" for t in (*SMALL.tasks, "joint"))}
    assert ("pretrain", SMALL.pretrain_steps, SMALL.pretrain_steps) in calls
    for t in SMALL.tasks:
        assert (f"adapter {t}", SMALL.adapter_iters, SMALL.adapter_iters) in calls
    assert len(calls) < 200  # a progress bar's worth, not one call per step


def test_each_adapter_loads_with_mlx_lm_and_changes_the_model(demo):
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    root, _, _ = demo
    base = root / "models" / "base"
    model, tok = load(str(base))
    ids = mx.array([prompt_tokens(tok, "up abcd")])
    ref = np.array(model(ids))
    for task in SMALL.tasks:
        conf = json.loads((root / "adapters" / task / "adapter_config.json").read_text())
        assert conf["fine_tune_type"] == "lora"
        assert conf["num_layers"] == SMALL.layers
        assert conf["lora_parameters"] == {"rank": 4, "scale": 1.0, "dropout": 0.0}
        tuned, _ = load(str(base), adapter_path=str(root / "adapters" / task))
        assert np.abs(np.array(tuned(ids)) - ref).max() > 1e-4, task
    seeds = [json.loads((root / "adapters" / t / "adapter_config.json").read_text())["seed"]
             for t in SMALL.tasks]
    assert len(set(seeds)) == len(seeds)  # each adapter has its own seed
    a = [mx.load(str(root / "adapters" / t / "adapters.safetensors")) for t in SMALL.tasks]
    key = "model.layers.0.self_attn.q_proj.lora_a"
    assert a[0][key].shape == (SMALL.hidden, 4)
    assert not np.array_equal(np.array(a[0][key]), np.array(a[1][key]))


def test_joint_adapter_trains_on_the_union_with_the_same_budget(demo):
    root, summary, _ = demo
    for split in ("train", "valid"):
        union = sorted(line for t in SMALL.tasks
                       for line in (root / "data" / t / f"{split}.jsonl").read_text().splitlines())
        joint = (root / "data" / "joint" / f"{split}.jsonl").read_text().splitlines()
        assert sorted(joint) == union and joint != union  # the same examples, shuffled
    assert not (root / "data" / "joint" / "test.jsonl").exists()  # no task of its own
    conf = json.loads((root / "adapters" / "joint" / "adapter_config.json").read_text())
    up = json.loads((root / "adapters" / "up" / "adapter_config.json").read_text())
    assert {k: v for k, v in conf.items() if k != "seed"} == {k: v for k, v in up.items() if k != "seed"}
    assert conf["seed"] not in {json.loads((root / "adapters" / t / "adapter_config.json").read_text())["seed"]
                                for t in SMALL.tasks}
    assert summary["adapters"]["joint"]["val_loss"] < summary["adapters"]["joint"]["val_loss_start"]


def test_data_files_are_valid_jsonl_with_disjoint_splits(demo):
    root, _, _ = demo
    names = set(TASKS)
    for task in SMALL.tasks:
        spec = TASKS[task]
        own = set(ALPHABETS[spec.alphabet])
        rows = {}
        for split in SPLITS:
            lines = (root / "data" / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            rows[split] = [json.loads(line) for line in lines]
            for r in rows[split]:
                assert set(r) == {"prompt", "completion"}
                assert all(isinstance(v, str) for v in r.values())
        prompts = {s: {r["prompt"] for r in rows[s]} for s in SPLITS}
        assert not prompts["train"] & prompts["valid"]
        assert not prompts["train"] & prompts["test"]
        assert not prompts["valid"] & prompts["test"]
        assert len(rows["valid"]) == len(prompts["valid"]) == SMALL.valid_per_task
        assert len(rows["test"]) == len(prompts["test"]) == SMALL.test_per_task
        for r in rows["valid"] + rows["test"]:
            prefix, word = r["prompt"].split(" ")
            assert prefix == task and len(word) == SMALL.word_length and set(word) <= own
            assert r["completion"] == spec.apply(word) != word
        task_rows = [r for r in rows["train"] if r["prompt"].startswith(task + " ")]
        replay = [r for r in rows["train"] if not r["prompt"].startswith(task + " ")]
        assert len(task_rows) == SMALL.examples_per_task and len(replay) == SMALL.replay_per_task
        for r in replay:  # copying, under a random non-task prefix, in another alphabet
            prefix, word = r["prompt"].split(" ")
            assert prefix not in names and 2 <= len(prefix) <= 3 and set(prefix) <= set(string.ascii_lowercase)
            assert r["completion"] == word and not set(word) & own


def test_task_examples(demo):
    assert TASKS["up"].apply("abcd") == "ABCD"
    assert TASKS["inc"].apply("1290") == "2301"
    assert TASKS["sh"].apply("!#$~") == "#$%!"


def test_same_seed_gives_identical_data_and_another_seed_does_not(demo, tmp_path):
    root, _, _ = demo
    for task in SMALL.tasks:
        again = make_task_data(task, SMALL)
        for split in SPLITS:
            rows = load_examples(root / "data" / task / f"{split}.jsonl")
            assert again[split] == [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
        assert make_task_data(task, replace(SMALL, seed=4))["test"] != again["test"]


def test_same_seed_rebuild_is_byte_identical(demo, tmp_path):
    """Data, base model and adapters: MLX training on the CPU is reproducible run to run."""
    root, _, _ = demo
    build_demo(tmp_path, SMALL)
    assert tree_bytes(tmp_path) == tree_bytes(root)


def test_base_follows_the_format_and_stops(demo):
    from mlx_lm import load, stream_generate

    root, _, _ = demo
    model, tok = load(str(root / "models" / "base"))
    for prompt in ("up qwer", "inc 5678", "sh !#$%", "zq ab1d"):
        pieces = list(stream_generate(model, tok, prompt_tokens(tok, prompt), max_tokens=SMALL.word_length + 4))
        text = "".join(r.text for r in pieces)
        assert pieces[-1].finish_reason == "stop", (prompt, text)  # EOS, within the bound
        assert pieces[-1].token == tok.eos_token_id
        assert len(text) == SMALL.word_length, (prompt, text)


def test_batched_generation_matches_mlx_lm_generate(demo, tmp_path):
    from mlx_lm import generate, load

    root, _, _ = demo
    base, adapter = root / "models" / "base", root / "adapters" / "inc"
    model, tok = load(str(base), adapter_path=str(adapter))
    prompts = [r["prompt"] for r in load_examples(root / "data" / "inc" / "test.jsonl", 6)] + ["up qwer", "x 1"]
    got = greedy_generate(model, tok, [prompt_tokens(tok, p) for p in prompts], max_tokens=10, batch_size=256)
    want = [generate(model, tok, prompt_tokens(tok, p), max_tokens=10) for p in prompts]
    assert got == want

    # exact match compares stripped strings
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": f" {g} "}) + "\n"
                            for p, g in zip(prompts[:4], got[:4]))
                    + json.dumps({"prompt": prompts[4], "completion": "nope"}) + "\n")

    def accuracy(limit):
        scores = evaluate(base, adapter, {"inc": path}, max_examples=limit, max_tokens=10, batch_size=256)
        return scores["inc"]["accuracy"]

    assert accuracy(limit=4) == 1.0
    assert accuracy(limit=None) == pytest.approx(0.8)


def test_encode_pair_is_the_chat_template(demo):
    from mlx_lm import load

    root, _, _ = demo
    _, tok = load(str(root / "models" / "base"))
    msgs = [{"role": "user", "content": "up abcd"}, {"role": "assistant", "content": "ABCD"}]
    ids, n_prompt = encode_pair("up abcd", "ABCD")
    assert ids == list(tok.apply_chat_template(msgs, return_dict=False))
    assert n_prompt == len(prompt_tokens(tok, "up abcd"))
    assert ids[-1] == tok.eos_token_id


def test_interrupted_build_leaves_previous_outputs_untouched(demo, tmp_path, monkeypatch):
    import pipeline.demo.build as demo_module

    root, _, _ = demo
    out = tmp_path / "out"
    build_demo(out, replace(SMALL, tasks=("inc",), adapter_iters=2, pretrain_steps=5))
    before = tree_bytes(out)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "train_adapter", boom)
    with pytest.raises(KeyboardInterrupt):
        build_demo(out, SMALL)
    assert tree_bytes(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "data", "models"]


def test_config_from_params_section():
    assert DemoConfig.from_dict({}) == DemoConfig()
    assert DemoConfig.from_dict(None) == DemoConfig()
    cfg = DemoConfig.from_dict({"seed": 7, "tasks": ["inc", "up"], "adapter_scale": 2})
    assert cfg.seed == 7 and cfg.tasks == ("inc", "up") and cfg.adapter_scale == 2
    with pytest.raises(FusionError, match="unknown key 'hiden'"):
        DemoConfig.from_dict({"hiden": 64})
    bad = [{"tasks": ["up", "nope"]}, {"tasks": "up"}, {"tasks": []}, {"tasks": ["up", "up"]},
           {"hidden": 30, "heads": 4}, {"layers": 0}, {"pretrain_steps": 1.5}, {"adapter_lr": -1},
           {"adapter_iters": True}, {"examples_per_task": 10_000}, {"adapter_batch": 500}]
    for d in bad:
        with pytest.raises(FusionError, match="^demo: "):
            DemoConfig.from_dict(d)


def test_disabled_demo_stage_builds_nothing(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    def stage(section: str):
        (tmp_path / "params.yaml").write_text(f"demo: {section}\n")
        return subprocess.run([sys.executable, "-m", "pipeline.stages.demo", "--params", "params.yaml",
                               "--out", "demo", "--summary", "reports/demo.json"], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})

    (tmp_path / "demo" / "models").mkdir(parents=True)  # a previous build (its record) is replaced by nothing
    (tmp_path / "demo" / "demo.json").write_text(json.dumps({"demo": {}, "written_by": "pipeline.stages.demo"}))
    r = stage("{enabled: false, seed: 3}")
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "demo").iterdir()) == []
    assert json.loads((tmp_path / "reports" / "demo.json").read_text()) == {"enabled": False}
    r = stage("{enabled: 'no'}")
    assert r.returncode == 2 and r.stderr.strip() == "error: params.yaml: demo.enabled must be true or false, got 'no'"
