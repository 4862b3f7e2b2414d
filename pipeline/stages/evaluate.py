"""Stages ``baselines`` and ``evaluate@NAME``: score models on every task's evaluation set.

``baselines`` scores the base model and every source adapter once; ``evaluate@NAME`` scores one
fused adapter on the tasks of the adapters it was built from. Both also answer the free-form
``prompts``. The plans come from the validate stage; the base model loaded is the one they record
(``pipeline.basemodel.model_path``: a local directory whose files still hash as recorded, or a hub id's
recorded revision), and ``baselines.json`` names it under ``base_model``. With ``--offtask`` each
model's drift from the base on the off-task set is measured too (``drift``, ``pipeline.drift``), and
with ``--valid`` its scores on the validation splits (``valid``: the valid.jsonl next to each test
set, whose sha256 the plan records), on which the report chooses each method's best setting.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


def valid_sets(plan) -> dict[str, Path]:
    """The validation split next to each task's evaluation set, as the plan recorded it (tasks
    without one are left out); a split whose bytes changed since the validate stage is refused."""
    from pipeline.errors import FusionError
    from pipeline.formats import sha256_file
    from pipeline.plan import valid_set

    out = {}
    for name, t in plan.tasks.items():
        if t.valid_sha256 is None:
            continue
        valid = valid_set(Path(t.data))
        if valid is None or sha256_file(valid) != t.valid_sha256:
            raise FusionError(f"{Path(t.data).parent / 'valid.jsonl'}: changed since the validate stage "
                              f"recorded it: run dvc repro")
        out[name] = valid
    return out


def _score(plan, base: str, adapter: str | None, label: str, offtask: Path | None = None,
           valid: bool = False) -> dict:
    """Scores of the base model (loaded from ``base``) with ``adapter`` on the plan's tasks (an
    EvalPlan or BaselinesPlan), and its drift on ``offtask`` and its scores on the validation splits
    when asked."""
    from rich.progress import Progress

    from pipeline.evaluate import evaluate, generate_samples

    ev = plan.eval
    tasks = {name: Path(t.data) for name, t in plan.tasks.items() if t.data}
    with Progress(transient=True) as bar:
        ids: dict[tuple, int] = {}

        def progress(task: str, stage: str, done: int, total: int) -> None:
            key = (task, stage)
            if key not in ids:
                ids[key] = bar.add_task(f"{label}: {task} {stage}", total=total)
            bar.update(ids[key], completed=done)

        result = evaluate(base, adapter, tasks, max_examples=ev.max_examples,
                          max_tokens=ev.max_tokens, batch_size=ev.batch_size, progress=progress,
                          system_prompt=ev.system_prompt)
        valids = valid_sets(plan) if valid else {}
        if valids:
            result["valid"] = evaluate(base, adapter, valids, max_examples=ev.max_examples,
                                       max_tokens=ev.max_tokens, batch_size=ev.batch_size,
                                       system_prompt=ev.system_prompt)
    if offtask is not None:
        from pipeline.drift import drift

        result["drift"] = drift(base, adapter, offtask, batch_size=ev.batch_size,
                                system_prompt=ev.system_prompt)
    if plan.prompts:
        answers = generate_samples(base, adapter, plan.prompts, ev.max_tokens,
                                   system_prompt=ev.system_prompt)
        result["generations"] = dict(zip(plan.prompts, answers))
    return result


@app.command()
def baselines(plan: Path = typer.Option(..., help="baselines.json written by the validate stage."),
              out: Path = typer.Option(..., help="Where to write the scores."),
              offtask: Path = typer.Option(None, help="The off-task set (drift from the base)."),
              valid: bool = typer.Option(False, help="Also score the validation splits.")):
    """Score the base model and each source adapter on every task."""
    from pipeline.basemodel import model_path
    from pipeline.io import write_json
    from pipeline.plan import BaselinesPlan

    job = BaselinesPlan.read(plan)
    base = model_path(job.base_model, job.base)
    result = {"base": _score(job, base, None, "base", offtask, valid), "adapters": {}, "base_model": job.base}
    for name, a in job.adapters.items():
        result["adapters"][name] = _score(job, base, a.path, name, offtask, valid)
    write_json(out, result)
    print(f"scored the base model and {len(job.adapters)} adapter(s) on {len(job.tasks)} task(s)")


@app.command()
def fusion(plan: Path = typer.Option(..., help="NAME.eval.json written by the validate stage."),
           adapter: Path = typer.Option(..., help="The fused adapter directory."),
           out: Path = typer.Option(..., help="Where to write the scores."),
           offtask: Path = typer.Option(None, help="The off-task set (drift from the base)."),
           valid: bool = typer.Option(False, help="Also score the validation splits.")):
    """Score one fused adapter on the tasks of its source adapters."""
    from pipeline.basemodel import model_path
    from pipeline.io import write_json
    from pipeline.plan import EvalPlan

    job = EvalPlan.read(plan)
    write_json(out, _score(job, model_path(job.base_model, job.base), str(adapter), job.fusion, offtask, valid))
    print(f"scored {job.fusion} on {len(job.tasks)} task(s)")


if __name__ == "__main__":
    run(app)
