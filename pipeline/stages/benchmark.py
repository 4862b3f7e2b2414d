"""Stages ``lm_eval_baselines`` and ``lm_eval@NAME``: lm-evaluation-harness tasks (``eval.lm_eval``).

``baselines`` runs the plan's tasks on the base model and every source adapter, ``fusion`` on one
fused adapter (``pipeline.benchmarks.score``). The plan (``reports/validated/lm_eval.json``, from the
validate stage) holds the tasks, the hashes of the local task files and the base model's identity;
when it names no task both commands write ``{"tasks": []}`` and load nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


def read_plan(path: Path) -> dict:
    """The lm-eval plan in ``path``; a local task file whose bytes changed since validate is refused."""
    from pipeline.benchmarks import task_files
    from pipeline.errors import FusionError

    try:
        job = json.loads(path.read_text())
    except FileNotFoundError:
        raise FusionError(f"{path}: not found (run the validate stage first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FusionError(f"{path}: not a readable plan ({e})") from None
    if not isinstance(job, dict) or not isinstance(job.get("tasks"), list):
        raise FusionError(f"{path}: not an lm-eval plan (no 'tasks' list)")
    if job["tasks"] and job.get("include_path"):
        now = task_files(job["include_path"])
        changed = sorted(f for f in set(now) | set(job["files"]) if now.get(f) != job["files"].get(f))
        if changed:
            raise FusionError(f"{changed[0]}: changed since the validate stage recorded it: run dvc repro")
    return job


def _result(job: dict, scores: dict) -> dict:
    from pipeline.benchmarks import version

    return {"tasks": job["tasks"], "lm_eval_version": version(), "scores": scores}


@app.command()
def baselines(plan: Path = typer.Option(..., help="lm_eval.json written by the validate stage."),
              out: Path = typer.Option(..., help="Where to write the scores.")):
    """Run the lm-eval tasks on the base model and each source adapter."""
    from pipeline.basemodel import model_path
    from pipeline.benchmarks import score
    from pipeline.io import write_json

    job = read_plan(plan)
    if not job["tasks"]:
        write_json(out, {"tasks": []})
        print("no lm-eval tasks (eval.lm_eval)")
        return
    base = model_path(job["base_model"], job["base"])
    result = {"base": _result(job, score(base, None, job)), "adapters": {}}
    for name, ref in job["adapters"].items():
        result["adapters"][name] = _result(job, score(base, ref["path"], job))
    write_json(out, {"tasks": job["tasks"], **result})
    print(f"lm-eval: {len(job['tasks'])} task(s) on the base model and {len(job['adapters'])} adapter(s)")


@app.command()
def fusion(plan: Path = typer.Option(..., help="lm_eval.json written by the validate stage."),
           adapter: Path = typer.Option(..., help="The fused adapter directory."),
           out: Path = typer.Option(..., help="Where to write the scores.")):
    """Run the lm-eval tasks on one fused adapter."""
    from pipeline.basemodel import model_path
    from pipeline.benchmarks import score
    from pipeline.io import write_json

    job = read_plan(plan)
    if not job["tasks"]:
        write_json(out, {"tasks": []})
        return
    write_json(out, _result(job, score(model_path(job["base_model"], job["base"]), str(adapter), job)))
    print(f"lm-eval: {len(job['tasks'])} task(s) on {adapter}")


if __name__ == "__main__":
    run(app)
