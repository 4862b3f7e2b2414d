"""Experiments and the CI gate on a scratch copy of the project (reduced demo, adapters under adapters/).

One scratch repository is built per test session (``pipeline_repo``; test_check.py uses it too) and
every module starts from its committed state ``BUILT``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time

import pytest
import yaml

from conftest import ran_stages, scratch_project, sh

# The fusions of the scratch copy: one inherits every default, one has its own weights, one uses `sh`.
FUSIONS = {
    "average": {"adapters": ["up", "inc"]},
    "up70": {"adapters": ["up", "inc"], "weights": [0.7, 0.3]},
    "all3": {"adapters": ["up", "inc", "sh"], "weights": [1.0, 1.0, 1.0]},
}
# `dvc exp show` narrowed to the defaults and the headline figures (as the README shows it).
EXP_SHOW = ["dvc", "exp", "show", "--csv", "--drop", ".*",
            "--keep", r"Experiment|method|weights|density|rank|seed|.*\.(mean|worst)$"]

_built: dict = {}


def pipeline_repo(tmp_path_factory):
    """The scratch project, built once and set up as a user with their own model and adapters
    would (as the README says): the reduced demo's base model, adapters and data copied to
    models/base, adapters/NAME and data/NAME, ``demo: {enabled: false}``, three fusions; `dvc repro`
    run and committed (the commit is ``_built["rev"]``)."""
    if "root" not in _built:
        root = scratch_project(tmp_path_factory.mktemp("experiments"))
        sh("dvc", "repro", "demo", cwd=root)
        params = yaml.safe_load((root / "params.yaml").read_text())
        shutil.copytree(root / "demo" / "models" / "base", root / "models" / "base")
        params["base_model"] = "models/base"
        for name in params["adapters"]:
            shutil.copytree(root / "demo" / "adapters" / name, root / "adapters" / name)
            shutil.copytree(root / "demo" / "data" / name, root / "data" / name)
            params["adapters"][name] = {"path": f"adapters/{name}", "data": f"data/{name}"}
        params["demo"]["enabled"] = False
        params["fusions"] = FUSIONS
        params.setdefault("search", {}).update({"enabled": False, "fusion": "average", "budget": 4})
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        r = sh("dvc", "repro", cwd=root)
        assert "demo disabled" in r.stdout and not any((root / "demo").iterdir())
        sh("git", "add", "-A", cwd=root)
        sh("git", "commit", "-qm", "pipeline run", cwd=root)
        _built["root"] = root
        _built["rev"] = sh("git", "rev-parse", "HEAD", cwd=root).stdout.strip()
    return _built["root"]


def reset(root) -> None:
    """Back to the committed run: git files, then DVC outputs from the local cache."""
    sh("git", "reset", "-q", "--hard", _built["rev"], cwd=root)
    sh("dvc", "checkout", "-f", cwd=root)
    assert "up to date" in sh("dvc", "status", cwd=root).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = pipeline_repo(tmp_path_factory)
    reset(root)
    return root


def exp_table(root) -> list[dict]:
    return list(csv.DictReader(io.StringIO(sh(*EXP_SHOW, cwd=root).stdout)))


def test_changing_one_adapter_recomputes_only_the_fusions_that_use_it(repo):
    from safetensors.numpy import load_file, save_file

    path = repo / "adapters" / "sh" / "adapters.safetensors"
    tensors = load_file(path)
    save_file({k: v * 0.5 if k.endswith("lora_b") else v for k, v in tensors.items()}, path)
    r = sh("dvc", "repro", cwd=repo)
    # the baselines score every adapter, so they re-run too (and the off-task set, whose plan names
    # every adapter, is answered again, to the same bytes); `average` and `up70` do not use `sh`
    assert ran_stages(r.stdout) == {"validate", "offtask", "baselines", "fuse@all3", "evaluate@all3",
                                    "control@all3", "lm_eval@all3", "report"}
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "sh adapter changed", cwd=repo)


def test_exp_run_default_weights_refuses_only_the_inheriting_fusion(repo):
    r = sh("dvc", "exp", "run", "-S", "weights=[0.7,0.3]", cwd=repo)
    assert ran_stages(r.stdout) == {"validate", "fuse@average", "evaluate@average", "control@average",
                                    "lm_eval@average", "report", "search"}
    # `average` at [0.7, 0.3] is `up70`: the same fused bytes, the same scores
    m = json.loads((repo / "reports" / "metrics.json").read_text())["fusions"]
    assert m["average"]["mean_retention"] == pytest.approx(m["up70"]["mean_retention"])
    rows = exp_table(repo)
    assert set(rows[0]) >= {"weights", "method", "average.mean", "all3.worst"}
    assert not any(".tasks." in c or "_retention" in c for c in rows[0])  # the headline columns only
    assert any(r["weights"] in ("[0.7, 0.3]", "['0.7', '0.3']") and r["average.mean"] for r in rows[1:])


def test_queued_sweep_runs_in_temp_clones(repo):
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "before the sweep", cwd=repo)
    sh("dvc", "exp", "run", "--queue", "-S", "weights=[0.5,0.5],[0.9,0.1]", cwd=repo)
    sh("dvc", "queue", "start", "-j", "2", cwd=repo)
    deadline = time.time() + 600
    while True:
        status = sh("dvc", "queue", "status", cwd=repo).stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.time() < deadline, status
        time.sleep(2)
    assert status.count("Success") >= 2 and "Failed" not in status, status
    rows = exp_table(repo)
    swept = {r["weights"]: r for r in rows if r["Experiment"]}
    for w in ("0.5", "0.9"):
        hit = [r for k, r in swept.items() if w in k]
        assert hit and float(hit[0]["average.mean"]) > 0, swept
    # retention against weight across the sweep: `dvc plots diff` puts every run on the same axes
    names = sh("dvc", "exp", "ls", "--name-only", cwd=repo).stdout.split()
    plots = json.loads(sh("dvc", "plots", "diff", *names, "--json", "--split", cwd=repo).stdout)
    points = plots["data"]["reports/plots/weights.json"][0]["anchor_definitions"]["<DVC_METRIC_DATA>"]
    average_up = {p["weight"] for p in points if p["fusion"] == "average" and p["task"] == "up"}
    assert {0.5, 0.9} <= average_up, points


def test_search_stage_finds_weights_that_exp_run_accepts(repo):
    r = sh("dvc", "exp", "run", "-S", "search.enabled=true", "-S", "search.budget=3", cwd=repo)
    assert "search" in ran_stages(r.stdout)
    assert not any(s.startswith(("fuse@", "evaluate@")) for s in ran_stages(r.stdout))
    best = json.loads((repo / "reports" / "search" / "best.json").read_text())
    assert best["evaluations"] == 3 and best["split"] == "valid" and best["fusion"] == "average"
    assert best["best"]["value"] >= best["start"]["value"]
    assert (repo / "reports" / "search" / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((repo / "reports" / "search" / "trace.json").read_text())) == 3
    assert best["set"].startswith("++fusions.average.weights=[")
    r = sh("dvc", "exp", "run", "-S", "search.enabled=false", "-S", best["set"], cwd=repo)
    ran = ran_stages(r.stdout)
    assert "validate" in ran and not ran & {"fuse@up70", "fuse@all3", "baselines"}
    assert ("fuse@average" in ran) == (best["best"]["weights"] != best["start"]["weights"])
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["fusions"]["average"]["weights"] == best["best"]["weights"]
