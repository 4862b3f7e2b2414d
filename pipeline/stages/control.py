"""Stage ``control@NAME``: the fusion's random control, fused and scored like the fusion.

Each source of the fusion is replaced by its random counterpart (``pipeline.control``: same
modules, ranks and per-module norms, random directions), the counterparts are fused with the
fusion's own method and settings in a temporary directory, and the result is scored on the
fusion's tasks (and its drift on the off-task set, with ``--offtask``). Writes the scores, the
control's data-free signals and the seed to ``--out``; nothing else is kept.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(fuse_plan: Path = typer.Option(..., help="NAME.fuse.json written by the validate stage."),
         eval_plan: Path = typer.Option(..., help="NAME.eval.json written by the validate stage."),
         out: Path = typer.Option(..., help="Where to write the control's scores."),
         offtask: Path = typer.Option(None, help="The off-task set (drift from the base).")):
    """Fuse random adapters shaped like the fusion's sources the same way, and score the result."""
    from pipeline.control import control_rng, write_random_adapter
    from pipeline.drift import drift
    from pipeline.evaluate import evaluate
    from pipeline.fuse import fuse
    from pipeline.io import write_json
    from pipeline.plan import EvalPlan, FusePlan

    job, ev = FusePlan.read(fuse_plan), EvalPlan.read(eval_plan)
    names = [a.name for a in job.adapters]
    with tempfile.TemporaryDirectory(prefix="lora-fusion-control-") as tmp:
        root = Path(tmp)
        paths = [write_random_adapter(a.path, root / "random" / a.name, control_rng(job.spec.seed, a.name))
                 for a in job.adapters]
        record = fuse(paths, root / "fused", job.spec, names=names)
        tasks = {name: Path(t.data) for name, t in ev.tasks.items() if t.data}
        s = ev.eval
        result = {"seed": job.spec.seed, "adapters": names,
                  "scores": evaluate(ev.base_model, root / "fused", tasks, max_examples=s.max_examples,
                                     max_tokens=s.max_tokens, batch_size=s.batch_size,
                                     system_prompt=s.system_prompt),
                  "signals": record["signals"]}
        if offtask is not None:
            result["drift"] = drift(ev.base_model, root / "fused", offtask, batch_size=s.batch_size,
                                    system_prompt=s.system_prompt)
    write_json(out, result)
    print(f"{job.fusion}: random control scored on {len(tasks)} task(s) -> {out}")


if __name__ == "__main__":
    run(app)
