"""The plans of the validate stage: written by the real stage, read back typed, refused when broken."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_mlx_adapter, sh
from pipeline.errors import FusionError
from pipeline.spec import FusionSpec
from pipeline.io import json_text
from pipeline.plan import AdapterRef, BaselinesPlan, EvalPlan, EvalSettings, FusePlan, TaskSet


@pytest.fixture
def validated(tmp_path):
    """A small project (a tiny base model, two real adapters with evaluation sets) and the plans its
    validate stage wrote."""
    from pipeline.demo.tinymodel import write_tiny_llama

    write_tiny_llama(tmp_path / "models" / "base", seed=0, hidden=32, layers=2, heads=4, ff=64)
    for i, name in enumerate(("up", "inc")):
        make_mlx_adapter(tmp_path / "adapters" / name, rank=2 + i, seed=i, model="tiny/base")
        data = tmp_path / "data" / name
        data.mkdir(parents=True)
        (data / "test.jsonl").write_text(json.dumps({"prompt": f"{name} a", "completion": "b"}) + "\n")
    params = {
        "base_model": "models/base",
        "adapters": {n: {"path": f"adapters/{n}", "data": f"data/{n}"} for n in ("up", "inc")},
        "weights": [0.5, 0.5],
        "fusions": {"average": {"adapters": ["up", "inc"]},
                    "ties": {"adapters": ["up", "inc"], "method": "ties", "density": 0.5}},
        "eval": {"max_tokens": 4},
        "prompts": ["up hello"],
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(sys.executable, "-m", "pipeline.stages.validate", "--params", "params.yaml", "--out", "validated",
       cwd=tmp_path)
    return tmp_path


def test_plans_read_back_typed_and_write_the_same_bytes(validated):
    out = validated / "validated"
    assert sorted(p.name for p in out.iterdir()) == [
        "average.eval.json", "average.fuse.json", "baselines.json", "lm_eval.json", "ties.eval.json",
        "ties.fuse.json"]
    assert json.loads((out / "lm_eval.json").read_text()) == {"tasks": []}   # no eval.lm_eval
    fuse = FusePlan.read(out / "ties.fuse.json")
    assert fuse.fusion == "ties" and [a.name for a in fuse.adapters] == ["up", "inc"]
    assert isinstance(fuse.adapters[0], AdapterRef) and len(fuse.adapters[0].sha256) == 64
    assert isinstance(fuse.spec, FusionSpec) and fuse.spec.method == "ties" and fuse.spec.density == 0.5
    ev = EvalPlan.read(out / "average.eval.json")
    assert ev.eval == EvalSettings(max_examples=100, max_tokens=4, batch_size=32)
    assert ev.tasks["up"] == TaskSet("data/up/test.jsonl", ev.tasks["up"].sha256, None)  # no valid.jsonl
    assert ev.base["path"] == "models/base" and ev.prompts == ["up hello"]
    assert {"config.json", "model.safetensors"} <= set(ev.base["files"])  # every file, by its sha256
    base = BaselinesPlan.read(out / "baselines.json")
    assert set(base.adapters) == set(base.tasks) == {"up", "inc"}
    for path, plan in ((out / "ties.fuse.json", fuse), (out / "average.eval.json", ev),
                       (out / "baselines.json", base)):
        assert json_text(plan.to_json()) == path.read_text()


def test_the_validation_split_is_an_input_of_the_scoring_plans(validated):
    """The report picks each method's best setting on valid.jsonl: a new or changed split changes the
    plans (so DVC re-runs the scoring stages), and a split changed after validate is refused."""
    from pipeline.stages.evaluate import valid_sets

    def run_validate():
        sh(sys.executable, "-m", "pipeline.stages.validate", "--params", "params.yaml", "--out", "validated",
           cwd=validated)
        return EvalPlan.read(validated / "validated" / "average.eval.json")

    valid = validated / "data" / "up" / "valid.jsonl"
    valid.write_text(json.dumps({"prompt": "up c", "completion": "C"}) + "\n")
    first = run_validate()
    assert first.tasks["up"].valid_sha256 and first.tasks["inc"].valid_sha256 is None
    valid.write_text(json.dumps({"prompt": "up d", "completion": "D"}) + "\n")
    second = run_validate()
    assert second.tasks["up"].valid_sha256 != first.tasks["up"].valid_sha256
    old = (validated / "validated" / "average.eval.json").read_text()
    assert json.loads(old)["tasks"]["up"]["valid_sha256"] == second.tasks["up"].valid_sha256
    cwd = os.getcwd()
    os.chdir(validated)
    try:
        assert valid_sets(second) == {"up": Path("data/up/valid.jsonl")}
        valid.write_text(json.dumps({"prompt": "up e", "completion": "E"}) + "\n")
        with pytest.raises(FusionError, match="valid.jsonl: changed since the validate stage"):
            valid_sets(second)
    finally:
        os.chdir(cwd)


def _broken(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, cls, name, message", [
    (lambda d: d["adapters"][1].pop("sha256"), FusePlan, "ties.fuse.json", "missing key 'adapters[1].sha256'"),
    (lambda d: d["spec"].pop("method"), FusePlan, "ties.fuse.json", "missing key 'spec.method'"),
    (lambda d: d.update(extra=1), FusePlan, "ties.fuse.json", "unknown key 'extra'"),
    (lambda d: d["spec"].update(dens=1), FusePlan, "ties.fuse.json", "unknown key 'spec.dens'"),
    (lambda d: d.update(adapters={}), FusePlan, "ties.fuse.json", "adapters: expected list"),
    (lambda d: d["eval"].update(max_tokens="4"), EvalPlan, "ties.eval.json", "eval.max_tokens: expected int"),
    (lambda d: d["tasks"]["up"].pop("data"), EvalPlan, "ties.eval.json", "missing key 'tasks.up.data'"),
    (lambda d: d["adapters"]["inc"].update(path=None), BaselinesPlan, "baselines.json",
     "adapters.inc.path: expected str"),
    (lambda d: d.pop("prompts"), BaselinesPlan, "baselines.json", "missing key 'prompts'"),
])
def test_a_broken_plan_is_refused_naming_the_file_and_the_key(validated, change, cls, name, message):
    path = validated / "validated" / name
    _broken(path, change)
    with pytest.raises(FusionError) as e:
        cls.read(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_a_missing_or_unreadable_plan_is_refused(validated):
    missing = validated / "validated" / "nope.fuse.json"
    with pytest.raises(FusionError, match="nope.fuse.json: not found"):
        FusePlan.read(missing)
    garbled = validated / "validated" / "ties.eval.json"
    garbled.write_text("{not json")
    with pytest.raises(FusionError, match="ties.eval.json: not a readable plan"):
        EvalPlan.read(garbled)
    listed = validated / "validated" / "baselines.json"
    listed.write_text("[]")
    with pytest.raises(FusionError, match="baselines.json: the file: expected a mapping"):
        BaselinesPlan.read(listed)


def test_the_fuse_stage_turns_a_broken_plan_into_one_error_line(validated):
    plan = validated / "validated" / "average.fuse.json"
    _broken(plan, lambda d: d["adapters"][0].pop("path"))
    r = sh(sys.executable, "-m", "pipeline.stages.fuse", "--plan", plan, "--out", "fused/average",
           "--record", "fusions/average/fusion.json", cwd=validated, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [f"error: {plan}: missing key 'adapters[0].path' (re-run the validate stage)"]
    assert not (validated / "fused").exists() and not (validated / "fusions").exists()
