"""The DVC pipeline end to end on a reduced demo, in a scratch copy of the project."""

import json

import pytest
import yaml

from conftest import ran_stages, scratch_project, sh


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = scratch_project(tmp_path_factory.mktemp("project"))
    r = sh("dvc", "repro", cwd=root)
    return root, r.stdout


def fusions_of(root):
    return yaml.safe_load((root / "params.yaml").read_text())["fusions"]


def test_repro_builds_everything(project):
    root, out = project
    names = fusions_of(root)
    assert ran_stages(out) >= {"demo", "validate", "offtask", "baselines", "report"} | {
        f"{stage}@{n}" for n in names for stage in ("fuse", "evaluate", "control")}
    for n in names:
        assert (root / "fused" / n / "adapters.safetensors").is_file()
        assert json.loads((root / "reports" / "fusions" / n / "fusion.json").read_text())["inputs"]
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert set(metrics["fusions"]) == set(names)
    report = (root / "reports" / "report.md").read_text()
    for n in names:
        assert n in report
    for task in ("up", "inc", "sh"):
        assert task in report
    assert (root / "dvc.lock").is_file()
    # the evidence: league table first, baselines, drift, signals with their predictive power
    assert report.index("## League table") < report.index("## Fusions")
    for section in ("## Off-task drift", "## Quality signals that need no data", "joint training",
                    "How well each signal predicts retention"):
        assert section in report
    for n in names:
        f = metrics["fusions"][n]
        assert "mean_retention" in f["random_control"] and f["drift"]["kl"] >= 0
        assert "joint_mean_retention" in f and "valid_mean_retention" in f
    assert metrics["drift"]["base"]["kl"] == 0.0 and "joint" in metrics["drift"]
    points = json.loads((root / "reports" / "signals.json").read_text())["points"]
    assert len(points) == 2 * len(names)  # every fusion and its random control
    headline = json.loads((root / "reports" / "headline.json").read_text())
    assert set(headline["all3"]) == {"mean", "worst", "random", "joint", "kl"}


def test_fused_adapter_loads_with_mlx_lm(project):
    root, _ = project
    from mlx_lm import load

    model, tok = load(str(root / "demo" / "models" / "base"), adapter_path=str(root / "fused" / "ties"))
    assert model is not None and tok.eos_token_id == 258


def test_second_repro_does_nothing_and_status_is_clean(project):
    root, _ = project
    r = sh("dvc", "repro", cwd=root)
    assert ran_stages(r.stdout) == set()
    assert "up to date" in sh("dvc", "status", cwd=root).stdout


def test_editing_one_fusion_reruns_only_that_fusion(project):
    root, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["fusions"]["up70"]["weights"] = [0.6, 0.4]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = sh("dvc", "repro", cwd=root)
    # lm_eval@up70 reads the fused adapter too (a no-op without eval.lm_eval)
    assert ran_stages(r.stdout) == {"validate", "fuse@up70", "evaluate@up70", "control@up70", "lm_eval@up70",
                                    "report"}


def test_default_weights_rerun_only_inheriting_fusions(project):
    root, _ = project
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "after repro", cwd=root)
    r = sh("dvc", "exp", "run", "-S", "weights=[0.7,0.3]", cwd=root)
    ran = ran_stages(r.stdout)
    inheriting = {n for n, f in fusions_of(root).items() if "weights" not in f}
    assert {f"fuse@{n}" for n in inheriting} <= ran
    assert not any(s.startswith(("fuse@", "evaluate@")) and s.split("@")[1] not in inheriting for s in ran)
    assert "baselines" not in ran and "demo" not in ran
    # slerp of two adapters ignores weights: it re-fuses to the same bytes and is not re-evaluated
    if "slerp" in inheriting:
        assert "evaluate@slerp" not in ran


def test_bad_params_fail_in_validate_with_one_line(project, tmp_path):
    root, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    for breakage, message in (
        ({"adapters": ["up", "nope"]}, "unknown adapter 'nope'"),
        ({"adapters": ["up", "inc"], "method": "avg"}, "unknown method 'avg'"),
        ({"adapters": ["up", "inc", "sh"]}, "give this fusion its own 'weights'"),
    ):
        bad = dict(params, fusions={**params["fusions"], "broken": breakage})
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(bad, sort_keys=False))
        r = sh("python", "-m", "pipeline.stages.validate", "--params", path, "--out", tmp_path / "v",
               cwd=root, check=False)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and "broken" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "v").exists()
