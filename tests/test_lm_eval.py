"""lm-evaluation-harness tasks on base, sources and fusions (params.yaml: eval.lm_eval).

The settings and the task folder's checks run everywhere; the scoring tests need the ``lmeval``
extra (lm-eval itself) and run offline on a local YAML task over a local jsonl file: mlx-lm's own
lm-eval model (``mlx_lm.evaluate.MLXLM``) on a model directory with the adapter fused in by mlx-lm
gives the scores ours give for base + adapter, and in a real DVC repo the stages score every model,
``metrics.json`` and the report carry the scores, and a changed task file re-runs the lm-eval
stages and nothing that does not read it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_mlx_adapter, module_shapes, ran_stages, scratch_project, sh
from pipeline.benchmarks import check, plan, task_files
from pipeline.errors import FusionError

HAVE_LM_EVAL = subprocess.run([sys.executable, "-c", "import lm_eval"], capture_output=True).returncode == 0
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="needs the lmeval extra (lm-eval)")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

ROWS = [{"question": "2+2=", "choices": ["4", "5", "22"], "answer": 0},
        {"question": "Capital of France:", "choices": ["Rome", "Paris"], "answer": 1},
        {"question": "abc reversed:", "choices": ["cba", "abc", "bca"], "answer": 0},
        {"question": "Opposite of up:", "choices": ["down", "left"], "answer": 0}]


def write_task(folder: Path, name: str = "quiz", data_file: str | None = None, rows=ROWS) -> Path:
    """A local lm-eval task: a multiple-choice YAML and its jsonl, in ``folder`` (paths relative to
    the working directory, as lm-eval reads them)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file or data.as_posix()}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}))
    return folder


# --- the settings --------------------------------------------------------------------------------

def test_no_section_or_no_task_is_no_benchmark():
    assert check(None) is None and check({"tasks": []}) is None
    assert plan(None, "base", {}, {}, None) == {"tasks": []}


@pytest.mark.parametrize("section, message", [
    ("hellaswag", "must be a mapping"),
    ({"tasks": "hellaswag"}, "tasks: must be a list"),
    ({"tasks": ["a", "a"]}, "names a task twice"),
    ({"tasks": ["a"], "limit": 0}, "limit: must be a whole number >= 1 or null"),
    ({"tasks": ["a"], "num_fewshot": -1}, "num_fewshot: must be a whole number >= 0"),
    ({"tasks": ["a"], "batch_size": None}, "batch_size: must be a whole number >= 1"),
    ({"tasks": ["a"], "chat_template": "yes"}, "chat_template: must be true, false or null"),
    ({"tasks": ["a"], "shots": 5}, "unknown setting(s) shots"),
])
def test_bad_settings_are_refused(section, message):
    with pytest.raises(FusionError, match=None) as e:
        check(section, "params.yaml")
    assert str(e.value).startswith("params.yaml: eval.lm_eval") and message in str(e.value)


def test_task_files_are_hashed_and_kept_inside_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_task(Path("data/bench"))
    files = task_files("data/bench")
    assert set(files) == {"data/bench/quiz.yaml", "data/bench/quiz.jsonl"}
    assert all(len(h) == 64 for h in files.values())
    Path("elsewhere.jsonl").write_text("{}\n")
    write_task(Path("data/bad"), data_file="elsewhere.jsonl")
    with pytest.raises(FusionError, match="data file elsewhere.jsonl is outside data/bad"):
        task_files("data/bad")
    Path("data/empty").mkdir()
    with pytest.raises(FusionError, match="no task YAML file"):
        task_files("data/empty")
    with pytest.raises(FusionError, match="not a folder"):
        task_files("data/none")
    os.symlink(tmp_path / "data" / "bench", "data/link")
    with pytest.raises(FusionError, match="not a symlink"):
        task_files("data/link")


def test_validate_refuses_a_task_folder_dvc_does_not_track(tmp_path):
    """The validate stage depends on data/ in dvc.yaml: a task folder elsewhere would change unseen."""
    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    write_task(tmp_path / "bench")
    params["eval"]["lm_eval"] = {"tasks": ["quiz"], "include_path": str(tmp_path / "bench")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, "-m", "pipeline.stages.validate", "--params", str(tmp_path / "params.yaml"),
                        "--out", str(tmp_path / "validated"), "--tasks-in", "data"],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0 and "eval.lm_eval.include_path" in line and "is not inside data" in line, line
    assert not (tmp_path / "validated").exists()


# --- scoring, against mlx-lm's own lm-eval model ------------------------------------------------

SCORE = r"""
import json, sys
from pipeline.benchmarks import run, score
base, adapter, fused, job = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])


def loglikelihoods(result):
    return [[float(r[0][0]) for r in doc["resps"]] for doc in result["samples"]["quiz"]]


out = {"scores": score(base, adapter, job), "ours": loglikelihoods(run(base, adapter, job, log_samples=True)),
       "base": loglikelihoods(run(base, None, job, log_samples=True))}
import lm_eval, lm_eval.tasks
from mlx_lm.evaluate import MLXLM
lm = MLXLM(fused, batch_size=job["batch_size"], use_chat_template=job["chat_template"])
r = lm_eval.simple_evaluate(model=lm, tasks=job["tasks"], apply_chat_template=lm.use_chat_template,
                           task_manager=lm_eval.tasks.TaskManager(include_path=job["include_path"]),
                           random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                           log_samples=True)
out["mlx_lm"] = loglikelihoods(r)
out["mlx_lm_acc"] = r["results"]["quiz"]["acc,none"]
print(json.dumps(out))
"""

MANY = [{"question": f"{i} plus {j} is", "choices": [str(i + j), str(i * j + 1), str(abs(i - j) + 7)], "answer": k % 3}
        for k, (i, j) in enumerate([(a, b) for a in range(2, 6) for b in range(3, 6)])]


@needs_lm_eval
@pytest.mark.parametrize("chat", [False, True])
def test_scores_equal_mlx_lms_own_lm_eval_model_on_the_fused_weights(tmp_path, tiny_model, chat):
    """Base + adapter as we score it gives the per-choice log-likelihoods, and the accuracy, of
    mlx-lm's own lm-eval model on the model directory mlx-lm fuses the adapter into; the adapter
    moves them well beyond that tolerance, so the check can fail."""
    import numpy as np

    adapter, _ = make_mlx_adapter(tmp_path / "adapter", module_shapes(), rank=4, scale=40.0, seed=3)
    fused = tmp_path / "fused"
    sh(sys.executable, "-m", "mlx_lm", "fuse", "--model", tiny_model, "--adapter-path", adapter,
       "--save-path", fused, cwd=tmp_path)
    write_task(tmp_path / "bench", rows=MANY)
    job = {"tasks": ["quiz"], "include_path": str(tmp_path / "bench"), "limit": None, "num_fewshot": None,
           "batch_size": 4, "max_tokens": None, "chat_template": chat, "seed": 0, "system_prompt": None}
    r = subprocess.run([sys.executable, "-c", SCORE, str(tiny_model), str(adapter), str(fused), json.dumps(job)],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ours, theirs, base = (np.array(out[k]) for k in ("ours", "mlx_lm", "base"))
    assert ours.shape == theirs.shape == base.shape == (len(MANY), 3)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert np.abs(ours - base).max() > 0.1   # the adapter matters
    assert out["scores"]["quiz"]["acc"] == pytest.approx(out["mlx_lm_acc"], abs=1e-12)
    picked = (ours.argmax(axis=1) == np.array([r["answer"] for r in MANY])).mean()
    assert out["scores"]["quiz"]["acc"] == pytest.approx(picked)
    assert set(out["scores"]["quiz"]) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}


@needs_lm_eval
def test_an_unknown_task_is_one_line(tmp_path, tiny_model):
    write_task(tmp_path / "bench")
    job = {"tasks": ["no_such_task"], "include_path": str(tmp_path / "bench"), "batch_size": 4}
    code = ("import json,sys\n"
            "from pipeline.benchmarks import score\nfrom pipeline.errors import FusionError\n"
            "try:\n    score(sys.argv[1], None, json.loads(sys.argv[2]))\n"
            "except FusionError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_model), json.dumps(job)], cwd=tmp_path,
                       capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=300)
    assert "refused: eval.lm_eval.tasks: no_such_task: no such lm-eval task" in r.stdout, r.stdout + r.stderr


# --- the pipeline ---------------------------------------------------------------------------------

@needs_lm_eval
def test_pipeline_scores_every_model_and_reruns_only_what_reads_the_task(tmp_path, monkeypatch):
    root = scratch_project(tmp_path / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["fusions"] = {k: params["fusions"][k] for k in ("average", "sum")}
    params["eval"]["lm_eval"] = {"tasks": ["quiz"], "include_path": "data/bench", "batch_size": 4}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_task(root / "data" / "bench")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)   # the stages' lm-eval reads local files only
    out = sh("dvc", "repro", cwd=root).stdout
    assert {"lm_eval_baselines", "lm_eval@average", "lm_eval@sum", "report"} <= ran_stages(out)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    for n in ("average", "sum"):
        assert 0.0 <= metrics["fusions"][n]["lm_eval"]["quiz"]["acc"] <= 1.0
    assert set(metrics["lm_eval"]["adapters"]) == set(params["adapters"])
    assert "acc" in metrics["lm_eval"]["base"]["quiz"]
    report = (root / "reports" / "report.md").read_text()
    assert "## Standard benchmarks (lm-eval)" in report and "quiz acc" in report
    shown = sh("dvc", "metrics", "show", "--json", cwd=root).stdout
    assert '"lm_eval"' in shown

    # a changed task file: the plan changes, the lm-eval stages and the report re-run, nothing else
    rows = ROWS + [{"question": "1+1=", "choices": ["2", "3"], "answer": 0}]
    (root / "data" / "bench" / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = ran_stages(sh("dvc", "repro", cwd=root).stdout)
    assert {"validate", "lm_eval_baselines", "lm_eval@average", "lm_eval@sum"} <= again, again
    assert not {s for s in again if s.startswith(("fuse@", "evaluate@", "control@"))} | (again & {"baselines", "offtask"}), again
    assert json.loads((root / "reports" / "lm_eval.json").read_text())["base"]["scores"]["quiz"]


def test_without_tasks_the_stages_write_an_empty_record(tmp_path):
    (tmp_path / "lm_eval.json").write_text(json.dumps({"tasks": []}))
    for args in (["baselines"], ["fusion", "--adapter", str(tmp_path / "nothing")]):
        r = subprocess.run([sys.executable, "-m", "pipeline.stages.benchmark", *args, "--plan",
                            str(tmp_path / "lm_eval.json"), "--out", str(tmp_path / "out.json")],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "out.json").read_text()) == {"tasks": []}
