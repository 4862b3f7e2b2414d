"""The real-model project's tasks: exact answers, seeded, disjoint splits (no model needed)."""

from __future__ import annotations

import json
import random

import pytest

from pipeline.errors import FusionError
from pipeline.realmodel import tasks


def test_each_task_has_the_documented_exact_answer():
    assert tasks.isodate(random.Random(0))[1].count("-") == 2
    for _ in range(50):
        p, c = tasks.reverse(random.Random(_))
        assert c.split() == p.removeprefix("Reverse the words: ").split()[::-1]
        p, c = tasks.upper(random.Random(_))
        assert c == p.removeprefix("Uppercase: ").upper()
        p, c = tasks.isodate(random.Random(_))
        day, month, year = p.removeprefix("Date in ISO format: ").split()
        assert c == f"{year}-{tasks.MONTHS.index(month) + 1:02d}-{int(day):02d}"
        p, c = tasks.to_json(random.Random(_))
        words = p.removeprefix("To JSON: ").split()
        assert json.loads(c) == {"name": words[1], "age": int(words[3]), "city": words[5]}


def test_splits_are_disjoint_and_reproducible_from_the_seed(tmp_path):
    sizes = {"train": 40, "valid": 10, "test": 10}
    tasks.write_task(tmp_path / "a", "reverse", sizes, seed=3)
    tasks.write_task(tmp_path / "b", "reverse", sizes, seed=3)
    tasks.write_task(tmp_path / "c", "reverse", sizes, seed=4)
    prompts = {}
    for split, n in sizes.items():
        a = (tmp_path / "a" / f"{split}.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
        rows = [json.loads(line) for line in a.decode().splitlines()]
        assert len(rows) == n and all(set(r) == {"prompt", "completion"} for r in rows)
        prompts[split] = {r["prompt"] for r in rows}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["valid"])
    assert not (prompts["valid"] & prompts["test"])
    assert (tmp_path / "c" / "test.jsonl").read_bytes() != (tmp_path / "a" / "test.jsonl").read_bytes()


def test_an_unknown_task_or_too_many_examples_is_one_clear_error(tmp_path):
    with pytest.raises(FusionError, match="unknown task 'sort'"):
        tasks.examples("sort", 5, 0)
    with pytest.raises(FusionError, match="fewer than"):
        tasks.examples("json", 10**6, 0)


def test_the_real_projects_params_resolve_with_a_system_prompt_and_a_bad_one_is_refused(tmp_path):
    import yaml

    from conftest import ROOT
    from pipeline.params import resolve

    raw = yaml.safe_load((ROOT / "real" / "params.yaml").read_text())
    p = resolve(raw, "real/params.yaml")
    assert p.eval["system_prompt"] == "You are a helpful assistant."
    # one adapter per task, and the joint-training baseline trained on the union of the tasks
    joint = raw["joint"]
    assert joint == raw["tasks"]["joint"] and p.adapters[joint].data is None
    assert set(p.adapters) == {*raw["tasks"]["names"], joint} == set(raw["train"]["adapters"])
    assert {f.spec.method for f in p.fusions.values()} >= {
        "linear", "concat", "slerp", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
    raw["eval"]["system_prompt"] = 3
    with pytest.raises(FusionError, match="eval.system_prompt must be a string"):
        resolve(raw, "real/params.yaml")


def test_the_joint_data_is_the_union_of_the_tasks(tmp_path):
    sizes = {"train": 12, "valid": 4, "test": 4}
    for name in ("reverse", "upper"):
        tasks.write_task(tmp_path / name, name, sizes, 0)
    got = tasks.write_union(tmp_path / "joint", [tmp_path / "reverse", tmp_path / "upper"], 0)
    assert got == {"train": 24, "valid": 8}
    for split in ("train", "valid"):
        union = sorted(line for n in ("reverse", "upper")
                       for line in (tmp_path / n / f"{split}.jsonl").read_text().splitlines())
        lines = (tmp_path / "joint" / f"{split}.jsonl").read_text().splitlines()
        assert sorted(lines) == union and lines != union
    assert not (tmp_path / "joint" / "test.jsonl").exists()
    again = tasks.write_union(tmp_path / "again", [tmp_path / "reverse", tmp_path / "upper"], 0)
    assert again == got and (tmp_path / "again" / "train.jsonl").read_bytes() == (
        tmp_path / "joint" / "train.jsonl").read_bytes()
