"""Sweeps across machines (docs/scale-out.md): two clones of one project that share a bare git
repository (the git remote) and a local directory (the DVC remote).

Machine A has run the pipeline; it pushes its cache, runs an experiment and pushes it with
``dvc exp push``. Machine B, a fresh clone, sees the experiment and its metrics after ``dvc exp
pull`` (``dvc exp show --json``), and after ``dvc pull`` its ``dvc repro`` recomputes nothing.
The project is the scratch copy of test_experiments.py (reduced demo, demo disabled, the base
model, adapters and data copied in), taken at its committed run.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ran_stages, sh
from test_experiments import _built, pipeline_repo

WEIGHTS = "weights=[0.6,0.4]"


def exp_metrics(show: list[dict], name: str) -> dict:
    """The metrics of experiment ``name`` in ``dvc exp show --json`` output."""
    for rev in show:
        for exp in (rev.get("experiments") or []):
            if exp.get("name") == name:
                data = exp["revs"][0]["data"]
                return data["metrics"]["reports/metrics.json"]["data"]
    raise AssertionError(f"experiment {name} not in dvc exp show: {json.dumps(show)[:2000]}")


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    root = pipeline_repo(tmp_path_factory)
    base = tmp_path_factory.mktemp("scale-out")
    origin, remote, a, b = base / "origin.git", base / "dvc-remote", base / "a", base / "b"
    remote.mkdir()
    sh("git", "init", "-q", "--bare", "-b", "main", origin, cwd=base)
    sh("git", "push", "-q", origin, f"{_built['rev']}:refs/heads/main", cwd=root)
    for clone in (a, b):
        sh("git", "clone", "-q", origin, clone, cwd=base)
        sh("git", "config", "user.email", "ci@example.com", cwd=clone)
        sh("git", "config", "user.name", "CI", cwd=clone)
    # machine A ran the pipeline: its cache holds every output (here: the scratch project's)
    shutil.copytree(root / ".dvc" / "cache", a / ".dvc" / "cache")
    sh("dvc", "checkout", cwd=a)
    assert "up to date" in sh("dvc", "status", cwd=a).stdout
    sh("dvc", "remote", "add", "-d", "shared", remote, cwd=a)
    sh("git", "commit", "-qam", "the shared DVC remote", cwd=a)
    sh("git", "push", "-q", "origin", "main", cwd=a)
    sh("dvc", "push", cwd=a)
    sh("git", "pull", "-q", "origin", "main", cwd=b)
    return a, b, remote


def test_experiments_pushed_from_one_machine_appear_on_the_other_with_their_metrics(machines):
    a, b, _ = machines
    r = sh("dvc", "exp", "run", "-n", "w60", "-S", WEIGHTS, cwd=a)
    assert "fuse@average" in ran_stages(r.stdout)
    ran_on_a = json.loads((a / "reports" / "metrics.json").read_text())["fusions"]["average"]
    sh("dvc", "exp", "push", "origin", "w60", cwd=a)

    sh("dvc", "exp", "pull", "origin", "w60", cwd=b)
    assert "w60" in sh("dvc", "exp", "ls", "--name-only", cwd=b).stdout.split()
    seen_on_b = exp_metrics(json.loads(sh("dvc", "exp", "show", "--json", cwd=b).stdout), "w60")
    assert seen_on_b["fusions"]["average"]["mean_retention"] == ran_on_a["mean_retention"]
    assert seen_on_b["fusions"]["average"]["worst_retention"] == ran_on_a["worst_retention"]

    # the experiment's fused adapter came through the DVC remote: applied and pulled, B has A's bytes
    sh("dvc", "exp", "apply", "w60", cwd=b)
    sh("dvc", "pull", cwd=b)
    for f in ("adapters.safetensors", "adapter_config.json"):
        assert (b / "fused" / "average" / f).read_bytes() == (a / "fused" / "average" / f).read_bytes()
    r = sh("dvc", "repro", cwd=b)
    assert ran_stages(r.stdout) == set(), r.stdout


def test_a_fresh_clone_pulls_the_outputs_and_recomputes_nothing(machines):
    _, b, _ = machines
    sh("git", "reset", "-q", "--hard", "origin/main", cwd=b)
    shutil.rmtree(b / ".dvc" / "cache", ignore_errors=True)
    for out in ("fused", "demo"):
        shutil.rmtree(b / out, ignore_errors=True)
    sh("dvc", "pull", cwd=b)
    r = sh("dvc", "repro", cwd=b)
    assert ran_stages(r.stdout) == set(), r.stdout
    assert "up to date" in sh("dvc", "status", cwd=b).stdout

