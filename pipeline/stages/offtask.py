"""Stage ``offtask``: the held-out prompts that belong to no task, answered by the base model.

Reads the ``drift:`` section of params.yaml (``examples``, ``seed``, ``max_tokens``, or the user's
own ``prompts``) and the base model from the baselines plan; writes an mlx-lm prompt/completion
jsonl file whose completions are the base model's own greedy answers (``pipeline.drift``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

DEFAULTS = {"examples": 32, "seed": 0, "max_tokens": 16, "prompts": None}


def drift_settings(raw: dict, where: str = "params.yaml") -> dict:
    """The ``drift:`` section with its defaults, checked."""
    from pipeline.errors import FusionError

    section = {**DEFAULTS, **(raw.get("drift") or {})}
    unknown = set(section) - set(DEFAULTS)
    if unknown:
        raise FusionError(f"{where}: drift has unknown setting(s) {', '.join(sorted(map(str, unknown)))} "
                          f"(known: {', '.join(DEFAULTS)})")
    for key in ("examples", "max_tokens"):
        v = section[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise FusionError(f"{where}: drift.{key} must be a positive integer, got {v!r}")
    p = section["prompts"]
    if p is not None and (not isinstance(p, list) or not p or not all(isinstance(x, str) for x in p)):
        raise FusionError(f"{where}: drift.prompts must be a non-empty list of strings (or null)")
    return section


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"), help="Reads its 'drift:' section."),
         plan: Path = typer.Option(Path("reports/validated/baselines.json"), help="The base model and eval settings."),
         out: Path = typer.Option(Path("reports/offtask.jsonl"), help="The off-task set to write.")):
    """Generate the off-task prompts and answer them with the base model (greedy)."""
    from pipeline.drift import base_answers, offtask_prompts
    from pipeline.io import write_jsonl
    from pipeline.params import load_params
    from pipeline.plan import BaselinesPlan

    s = drift_settings(load_params(params), str(params))
    job = BaselinesPlan.read(plan)
    prompts = s["prompts"] or offtask_prompts(s["examples"], s["seed"])
    rows = base_answers(job.base_model, prompts, s["max_tokens"], job.eval.batch_size, job.eval.system_prompt)
    write_jsonl(out, rows)
    print(f"{out}: {len(rows)} off-task prompts answered by the base model")


if __name__ == "__main__":
    run(app)
