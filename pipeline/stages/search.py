"""Stage ``search`` (off by default): look for the weights of one fusion that score best on the
validation sets, with a fixed budget of evaluations and a fixed seed (``pipeline.search``).

With ``search.enabled: false`` (the default) the stage only writes ``best.json`` saying so, in a
blink; ``dvc exp run -S search.enabled=true`` (or ``fusion search``) runs it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import FusionError
from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"), help="Reads its 'search:' section."),
         fuse_plan: Path = typer.Option(..., help="NAME.fuse.json of the searched fusion (validate stage)."),
         eval_plan: Path = typer.Option(..., help="NAME.eval.json of the searched fusion (validate stage)."),
         out: Path = typer.Option(Path("reports/search"), help="Where best.json, trace.json, trace.png go.")):
    """Search the weights of the fusion named by search.fusion (when search.enabled is true)."""
    from pipeline.basemodel import model_path
    from pipeline.destination import check_destination
    from pipeline.params import load_params
    from pipeline.plan import EvalPlan, FusePlan
    from pipeline.search import run_search, settings, write_disabled

    s = settings(load_params(params).get("search"), f"{params}: search")
    check_destination(out, [fuse_plan, eval_plan], record="best.json", what="search")
    if not s["enabled"]:
        write_disabled(out)
        print("weight search is off (search.enabled: false)")
        return
    job, ev_job = FusePlan.read(fuse_plan), EvalPlan.read(eval_plan)
    if s["fusion"] not in (None, job.fusion):
        raise FusionError(f"{fuse_plan}: is the plan of {job.fusion!r}, but search.fusion is {s['fusion']!r}")
    run_search(job.fusion, model_path(ev_job.base_model, ev_job.base), [(a.name, a.path) for a in job.adapters],
               {name: t.data for name, t in ev_job.tasks.items()}, job.spec, ev_job.eval, s, out)


if __name__ == "__main__":
    run(app)
