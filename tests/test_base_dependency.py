"""The base model is a dependency of what scores on it: a local one by its files' sha256 (a file
changed in place makes the pipeline stale and re-scores it), a hub id by the revision actually loaded
(pinned in the plans, recorded in the report's inputs). And the stages replace only their own output
directories. Real files, real stage scripts, a real DVC repository."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import pytest
import yaml

from conftest import make_mlx_adapter, ran_stages, run_cli, sh, tool_env
from test_experiments import pipeline_repo, reset

REV1 = "1" * 40
REV2 = "2" * 40


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage(*args, cwd, env=None):
    """Run a stage script as DVC would (``python -m pipeline.stages.NAME ...``), not raising."""
    import subprocess

    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**tool_env(), **(env or {})}, timeout=600)


def one_error(r) -> str:
    """The one ``error:`` line of a refused run (exit 2, no traceback)."""
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture
def project(tmp_path):
    """A small project: a tiny local base model under models/, two adapters fitting it, their data."""
    from pipeline.demo.tinymodel import write_tiny_llama

    write_tiny_llama(tmp_path / "models" / "base", seed=0, hidden=32, layers=2, heads=4, ff=64)
    for i, name in enumerate(("up", "inc")):
        make_mlx_adapter(tmp_path / "adapters" / name, rank=2, seed=i + 1)
        data = tmp_path / "data" / name
        data.mkdir(parents=True)
        rows = [{"prompt": f"{name} ab{k}", "completion": f"x{k}"} for k in range(4)]
        (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {
        "base_model": "models/base",
        "adapters": {n: {"path": f"adapters/{n}", "data": f"data/{n}"} for n in ("up", "inc")},
        "weights": [0.5, 0.5],
        "fusions": {"average": {"adapters": ["up", "inc"]}},
        "eval": {"max_tokens": 2, "batch_size": 4},
        "prompts": ["up hi"],
        "demo": {"enabled": False},
        "search": {"enabled": False},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def set_base(root, base) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base_model"] = str(base)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def validate(root, *extra, env=None):
    return stage("pipeline.stages.validate", "--params", "params.yaml", "--out", "reports/validated",
                 "--base-in", "models", *extra, cwd=root, env=env)


# --- a local base model ------------------------------------------------------------------------

def test_the_plans_hold_every_file_of_a_local_base_model_by_its_sha256(project):
    r = validate(project)
    assert r.returncode == 0, r.stderr
    plan = json.loads((project / "reports" / "validated" / "average.eval.json").read_text())
    base = project / "models" / "base"
    assert plan["base"] == {"path": "models/base",
                            "files": {f.name: sha256(f) for f in sorted(base.iterdir()) if f.is_file()}}
    assert json.loads((project / "reports" / "validated" / "baselines.json").read_text())["base"] == plan["base"]


def test_a_base_model_changed_after_validate_is_not_scored(project):
    assert validate(project).returncode == 0
    weights = project / "models" / "base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # the same size and header, other weights
    weights.write_bytes(bytes(data))
    r = stage("pipeline.stages.evaluate", "baselines", "--plan", "reports/validated/baselines.json",
              "--out", "reports/baselines.json", cwd=project)
    line = one_error(r)
    assert "base_model models/base: model.safetensors changed since the validate stage" in line, line
    assert not (project / "reports" / "baselines.json").exists()


@pytest.mark.parametrize("where", ["outside", "symlink"])
def test_a_local_base_model_dvc_cannot_see_is_refused(project, tmp_path_factory, where):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "base"
    shutil.copytree(project / "models" / "base", elsewhere)
    if where == "symlink":  # DVC does not follow a link out of a dependency directory
        (project / "models" / "linked").symlink_to(elsewhere, target_is_directory=True)
        set_base(project, "models/linked")
    else:
        set_base(project, elsewhere)
    line = one_error(validate(project))
    assert "is not inside models (what the validate stage depends on in dvc.yaml)" in line, line
    assert not (project / "reports" / "validated").exists()
    # without --base-in (the stage run by hand), the same base model is accepted
    r = stage("pipeline.stages.validate", "--params", "params.yaml", "--out", "reports/validated", cwd=project)
    assert r.returncode == 0, r.stderr


# --- a hub id --------------------------------------------------------------------------------

def fake_hub(cache, repo_id: str, model_dir, revision: str) -> None:
    """``model_dir`` laid out as the Hugging Face cache holds ``repo_id`` at ``revision``: blobs
    named by their sha256, a snapshot of links to them, and ``refs/main`` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        digest = sha256(f)
        shutil.copyfile(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(os.path.relpath(repo / "blobs" / digest, snapshot))
    (repo / "refs" / "main").write_text(revision)


def test_a_hub_id_is_pinned_to_the_revision_loaded(project, tmp_path_factory):
    from pipeline.demo.tinymodel import write_tiny_llama

    cache = tmp_path_factory.mktemp("hub")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}  # nothing is downloaded
    fake_hub(cache, "org/tiny", project / "models" / "base", REV1)
    set_base(project, "org/tiny")
    r = validate(project, env=env)
    assert r.returncode == 0, r.stderr
    plan = json.loads((project / "reports" / "validated" / "baselines.json").read_text())
    weights = sha256(project / "models" / "base" / "model.safetensors")
    assert plan["base"]["id"] == "org/tiny" and plan["base"]["revision"] == REV1
    assert plan["base"]["files"]["model.safetensors"] == weights

    def baselines(out):
        r = stage("pipeline.stages.evaluate", "baselines", "--plan", "reports/validated/baselines.json",
                  "--out", out, cwd=project, env=env)
        assert r.returncode == 0, r.stderr
        return json.loads((project / out).read_text())

    first = baselines("reports/first.json")
    assert first["base_model"] == plan["base"]  # the report's input: the hub id and its revision
    # the hub's main branch moves on to other weights: the plan still scores the revision it names
    other = tmp_path_factory.mktemp("other") / "base"
    write_tiny_llama(other, seed=5, hidden=32, layers=2, heads=4, ff=64)
    fake_hub(cache, "org/tiny", other, REV2)
    again = baselines("reports/again.json")
    assert again == first
    # validating again pins the new revision, and its scores are those of the other weights
    assert validate(project, env=env).returncode == 0
    plan = json.loads((project / "reports" / "validated" / "baselines.json").read_text())
    assert plan["base"]["revision"] == REV2 and plan["base"]["files"]["model.safetensors"] != weights
    moved = baselines("reports/moved.json")
    assert moved["base_model"]["revision"] == REV2 and moved["base"] != first["base"]


def test_a_hub_id_that_cannot_be_resolved_is_one_error(project, tmp_path):
    set_base(project, "org/absent")
    r = validate(project, env={"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    line = one_error(r)
    assert "base_model org/absent: not a local directory, and not found on the hub" in line, line


# --- the stages' own output directories ------------------------------------------------------

STAGES = {
    "validate": ["pipeline.stages.validate", "--params", "params.yaml", "--out", "{out}"],
    "search": ["pipeline.stages.search", "--params", "params.yaml", "--fuse-plan", "p.fuse.json",
               "--eval-plan", "p.eval.json", "--out", "{out}"],
    "demo": ["pipeline.stages.demo", "--params", "params.yaml", "--out", "{out}", "--summary", "demo.json"],
    "real_model": ["pipeline.stages.real_model", "--params", "params.yaml", "--out", "{out}"],
    "real_tasks": ["pipeline.stages.real_tasks", "--params", "params.yaml", "--out", "{out}"],
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_never_replaces_a_directory_it_did_not_write(project, name):
    docs = project / "mine"
    docs.mkdir()
    (docs / "letter.txt").write_text("dear ...")
    r = stage(*[a.format(out="mine") for a in STAGES[name]], cwd=project)
    line = one_error(r)
    assert "mine: a non-empty directory this tool did not write" in line, line
    assert sorted(p.name for p in docs.iterdir()) == ["letter.txt"] and (docs / "letter.txt").read_text() == "dear ..."


def test_fusion_search_never_replaces_a_directory_it_did_not_write(project):
    docs = project / "mine"
    docs.mkdir()
    (docs / "letter.txt").write_text("dear ...")
    r = run_cli("search", "--fusion", "average", "--params", "params.yaml", "--out", "mine", cwd=project)
    assert "mine: a non-empty directory this tool did not write" in one_error(r)
    assert (docs / "letter.txt").read_text() == "dear ..."


@pytest.mark.parametrize("name", ["validate", "search", "demo", "real_tasks"])
def test_a_stage_replaces_its_own_previous_output(project, name):
    args = [a.format(out="out") for a in STAGES[name]]
    for _ in range(2):
        r = stage(*args, cwd=project)
        assert r.returncode == 0, r.stderr


# --- the whole pipeline in a DVC repository ---------------------------------------------------

@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = pipeline_repo(tmp_path_factory)
    reset(root)
    yield root
    reset(root)


def test_a_base_model_swapped_in_place_makes_dvc_and_the_gate_see_stale_scores(repo):
    import numpy as np

    weights = repo / "models" / "base" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    # other weights in place: every float32 tensor halved, the size and the header as they were,
    # so only the bytes tell (as with a model re-quantized to the same layout)
    n = int.from_bytes(raw[:8], "little")
    header, start, halved = json.loads(raw[8:8 + n]), 8 + n, 0
    for name, t in header.items():
        if name != "__metadata__" and t["dtype"] == "F32":
            a, b = t["data_offsets"]
            raw[start + a:start + b] = (np.frombuffer(bytes(raw[start + a:start + b]), "<f4") * 0.5).tobytes()
            halved += 1
    assert halved > 0
    weights.write_bytes(bytes(raw))
    status = json.loads(sh("dvc", "status", "--json", cwd=repo).stdout.splitlines()[-1])
    assert "validate" in status, status
    r = run_cli("check", "--baseline", "HEAD", cwd=repo)
    assert r.returncode == 2 and "pipeline is stale: dvc status lists" in r.stderr, r.stdout + r.stderr

    r = sh("dvc", "repro", cwd=repo)
    ran = ran_stages(r.stdout)
    # everything that scores on the base model, and nothing that does not read it (the fusions)
    assert {"validate", "baselines", "evaluate@average", "evaluate@up70", "evaluate@all3", "report"} <= ran
    assert not any(s.startswith("fuse@") for s in ran), ran
    scored = json.loads((repo / "reports" / "baselines.json").read_text())
    assert scored["base_model"]["files"]["model.safetensors"] == sha256(weights)
    assert "up to date" in sh("dvc", "status", cwd=repo).stdout
    r = run_cli("check", "--baseline", "HEAD", cwd=repo)
    assert "stale" not in r.stderr, r.stdout + r.stderr
