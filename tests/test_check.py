"""The regression gate: pipeline.check on plain dicts, and `fusion check` on a scratch pipeline."""

from __future__ import annotations

import copy
import json
import os
import subprocess

import pytest

from conftest import run_cli, sh
from pipeline.check import Tolerances, compare, fusion_metrics, to_markdown, tolerances
from pipeline.errors import FusionError
from test_experiments import pipeline_repo, reset

METRICS = {
    "fusions": {
        "average": {"mean_retention": 0.9, "worst_retention": 0.8, "worse_than_routing": True,
                    "tasks": {"up": {"accuracy": 0.8, "loss": 1.0, "retention": 0.8},
                              "inc": {"accuracy": 0.9, "loss": 2.0, "retention": 1.0}}},
        "ties": {"mean_retention": 0.95, "worst_retention": 0.95,
                 "tasks": {"up": {"accuracy": 0.76, "loss": 1.1, "retention": 0.95},
                           "inc": {"accuracy": 0.855, "loss": 2.1, "retention": 0.95}}},
    },
    "base": {"up": {"accuracy": 0.0, "loss": 3.0}},
    "adapters": {},
}


def changed(**edits) -> dict:
    """A copy of METRICS with ``{"average.tasks.up.loss": 1.5}``-style edits (None deletes)."""
    m = copy.deepcopy(METRICS)
    for path, value in edits.items():
        *parents, key = path.replace("__", ".").split(".")
        node = m["fusions"]
        for p in parents:
            node = node[p]
        if value is None:
            del node[key]
        else:
            node[key] = value
    return m


def lines(result) -> list[str]:
    return [str(r) for r in result.regressions]


# --- pipeline.check ----------------------------------------------------------------------------

def test_equal_metrics_pass():
    result = compare(METRICS, copy.deepcopy(METRICS))
    assert result.ok and result.regressions == [] and result.notes == []
    assert [r["fusion"] for r in result.rows] == ["average", "ties"]


def test_drop_beyond_tolerance_is_one_line_per_figure():
    result = compare(changed(average__mean_retention=0.85), METRICS, Tolerances(retention_drop=0.02))
    assert lines(result) == ["average: mean retention 0.9000 -> 0.8500 (-0.0500; tolerance 0.02)"]


def test_drop_within_tolerance_passes_and_improvements_pass():
    assert compare(changed(average__mean_retention=0.885), METRICS, Tolerances(retention_drop=0.02)).ok
    assert compare(changed(average__mean_retention=0.99, average__tasks__up__loss=0.5), METRICS).ok


def test_task_accuracy_retention_and_loss():
    now = changed(average__tasks__up__accuracy=0.7, average__tasks__up__retention=0.7,
                  average__tasks__inc__loss=2.2)
    result = compare(now, METRICS, Tolerances(retention_drop=0.05, accuracy_drop=0.05, loss_rise=0.05))
    assert lines(result) == [
        "average: up retention 0.8000 -> 0.7000 (-0.1000; tolerance 0.05)",
        "average: up accuracy 0.8000 -> 0.7000 (-0.1000; tolerance 0.05)",
        "average: inc loss 2.0000 -> 2.2000 (+10.0%; tolerance +5.0%)",
    ]
    assert compare(now, METRICS, Tolerances(retention_drop=0.2, accuracy_drop=0.2, loss_rise=0.2)).ok


def test_a_figure_that_disappears_is_a_regression():
    result = compare(changed(ties__worst_retention=None, average__tasks__up__accuracy=None), METRICS)
    assert lines(result) == ["average: up accuracy was 0.8000, now missing",
                             "ties: worst retention was 0.9500, now missing"]


def test_floors_apply_to_every_current_fusion():
    tol = Tolerances(min_mean_retention=0.92, min_worst_retention=0.5, min_accuracy=0.8)
    result = compare(METRICS, METRICS, tol)
    assert lines(result) == ["average: mean retention 0.9000 is under the floor 0.9200",
                             "ties: up accuracy 0.7600 is under the floor 0.8000"]


def test_new_and_removed_fusions_are_notes_and_new_ones_meet_the_floors():
    now = copy.deepcopy(METRICS)
    now["fusions"]["fresh"] = {"mean_retention": 0.3, "worst_retention": 0.2, "tasks": {}}
    del now["fusions"]["ties"]
    result = compare(now, METRICS, Tolerances(min_mean_retention=0.5))
    assert lines(result) == ["fresh: mean retention 0.3000 is under the floor 0.5000"]
    assert result.notes == ["ties: in the baseline only (not checked)", "fresh: new (no baseline; floors only)"]
    assert compare(now, METRICS).ok


def test_per_fusion_tolerances_from_the_params_section():
    default, per = tolerances({"retention_drop": 0.01, "fusions": {"ties": {"retention_drop": 0.5,
                                                                            "min_mean_retention": None}}})
    assert default == Tolerances(retention_drop=0.01)
    assert per["ties"].retention_drop == 0.5 and per["ties"].accuracy_drop == default.accuracy_drop
    now = changed(average__mean_retention=0.85, ties__mean_retention=0.6)
    assert lines(compare(now, METRICS, default, per)) == [
        "average: mean retention 0.9000 -> 0.8500 (-0.0500; tolerance 0.01)"]


@pytest.mark.parametrize("section, message", [
    ({"retention_dorp": 0.1}, "unknown setting(s) retention_dorp"),
    ({"accuracy_drop": -0.1}, "accuracy_drop: expected a number >= 0"),
    ({"loss_rise": None}, "loss_rise: expected a number >= 0, got None"),
    ({"fusions": {"x": {"min_accuracy": "high"}}}, "check.fusions.x.min_accuracy"),
    ({"fusions": [1]}, "fusions: expected a mapping"),
])
def test_bad_tolerances_are_one_clear_error(section, message):
    with pytest.raises(FusionError, match=None) as e:
        tolerances(section)
    assert message in str(e.value)


def test_metrics_without_fusions_are_refused():
    for bad in ({}, {"fusions": {}}, [], {"fusions": [1]}):
        with pytest.raises(FusionError, match="no fusion metrics"):
            fusion_metrics(bad, "baseline HEAD:reports/metrics.json")
    with pytest.raises(FusionError, match="baseline metrics"):
        compare(METRICS, {"base": {}})


def test_markdown_summary():
    md = to_markdown(compare(changed(average__mean_retention=0.5), METRICS), "origin/main")
    assert md.startswith("## Fusion check against `origin/main`: failed: 1 regression(s)")
    assert "| average | 0.9000 -> 0.5000 | 0.8000 -> 0.8000 | 1 regression(s) |" in md
    assert "- average: mean retention 0.9000 -> 0.5000" in md
    assert "passed" in to_markdown(compare(METRICS, METRICS), "HEAD")


# --- `fusion check` on a scratch pipeline ------------------------------------------------------

@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = pipeline_repo(tmp_path_factory)
    reset(root)
    return root


def planted_baseline(root, edit) -> str:
    """A commit (not checked out) whose reports/metrics.json is the workspace's, edited."""
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    edit(metrics)
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=root, input=json.dumps(metrics),
                          capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "GIT_INDEX_FILE": str(root / ".git" / "planted-index")}

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    git("read-tree", "HEAD")
    git("update-index", "--cacheinfo", f"100644,{blob},reports/metrics.json")
    return git("commit-tree", git("write-tree"), "-p", "HEAD", "-m", "planted baseline")


def test_check_passes_on_equal_metrics(repo, tmp_path):
    summary = tmp_path / "summary.md"
    r = run_cli("check", "--baseline", "HEAD", "--summary", summary, cwd=repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "within the tolerances of HEAD" in r.stdout
    assert "passed" in summary.read_text()


def test_check_fails_on_a_planted_drop_with_one_line_per_regression(repo):
    def better(m):
        m["fusions"]["average"]["mean_retention"] += 0.1
        m["fusions"]["all3"]["worst_retention"] += 0.05

    rev = planted_baseline(repo, better)
    r = run_cli("check", "--baseline", rev, cwd=repo)
    assert r.returncode == 1, r.stdout + r.stderr
    regressions = [line for line in r.stderr.splitlines() if line.startswith("regression:")]
    assert len(regressions) == 2, r.stderr
    assert regressions[0].startswith("regression: average: mean retention ")
    assert "(-0.1000; tolerance 0.02)" in regressions[0]
    assert regressions[1].startswith("regression: all3: worst retention ") and "(-0.0500;" in regressions[1]
    assert "Traceback" not in r.stderr


def test_check_fails_on_a_stale_pipeline(repo):
    params = repo / "params.yaml"
    before = params.read_text()
    try:
        params.write_text(before.replace("- 0.7\n    - 0.3\n", "- 0.6\n    - 0.4\n", 1))
        assert params.read_text() != before
        r = run_cli("check", "--baseline", "HEAD", cwd=repo)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "pipeline is stale: dvc status lists" in r.stderr and "validate" in r.stderr
    finally:
        params.write_text(before)


def test_check_fails_on_a_baseline_without_metrics(repo, tmp_path):
    first = sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=repo).stdout.split()[0]
    summary = tmp_path / "summary.md"
    r = run_cli("check", "--baseline", first, "--summary", summary, cwd=repo)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"baseline {first}: has no reports/metrics.json" in r.stderr
    assert "could not run" in summary.read_text()
    r = run_cli("check", "--baseline", "no-such-branch", cwd=repo)
    assert r.returncode == 2 and "not a git revision" in r.stderr
    rev = planted_baseline(repo, lambda m: m.clear())
    r = run_cli("check", "--baseline", rev, cwd=repo)
    assert r.returncode == 2 and "no fusion metrics" in r.stderr
