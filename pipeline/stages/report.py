"""Stage ``report``: metrics, plots and the human report for every fusion in params.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"), help="The params file (which fusions to report)."),
         baselines: Path = typer.Option(Path("reports/baselines.json"), help="Scores of the base and sources."),
         fusions: Path = typer.Option(Path("reports/fusions"), help="Per-fusion eval.json and fusion.json."),
         out: Path = typer.Option(Path("reports"), help="Where metrics.json, plots/, figures/ and report.* go."),
         lm_eval: Path = typer.Option(None, help="The lm-eval scores of the base and sources (the "
                                                 "lm_eval_baselines stage); with each fusion's lm_eval.json.")):
    """Write reports/metrics.json, plot data, figures, report.md and report.html."""
    from pipeline.errors import FusionError
    from pipeline.params import load_params, resolve
    from pipeline.report import write_report

    p = resolve(load_params(params), str(params))
    settings, evals, infos, controls = {}, {}, {}, {}
    for name, f in p.fusions.items():
        settings[name] = {"adapters": f.adapters, **f.spec.to_json()}
        for kind, store in (("eval", evals), ("fusion", infos)):
            path = fusions / name / f"{kind}.json"
            if not path.is_file():
                raise FusionError(f"{path}: missing (run the fuse and evaluate stages first)")
            store[name] = json.loads(path.read_text())
        control = fusions / name / "control.json"  # the random control (the control stage)
        if control.is_file():
            controls[name] = json.loads(control.read_text())
    benchmarks = None
    if lm_eval is not None:
        benchmarks = {"baselines": json.loads(lm_eval.read_text()), "fusions": {}}
        for name in p.fusions:
            path = fusions / name / "lm_eval.json"   # the lm_eval@NAME stage
            if path.is_file():
                benchmarks["fusions"][name] = json.loads(path.read_text())
    joint = p.raw.get("joint")
    if joint is not None and joint not in p.adapters:
        raise FusionError(f"{params}: joint: {joint!r} is not a declared adapter")
    written = write_report(out, settings, json.loads(baselines.read_text()), evals, infos,
                           controls=controls, joint=joint, lm_eval=benchmarks)
    print(f"report for {len(settings)} fusion(s): {written.get('markdown', out / 'report.md')}")


if __name__ == "__main__":
    run(app)
