"""Stage ``validate``: check params.yaml and every fusion's adapters before anything heavy runs.

Writes one small plan per downstream stage under ``--out`` (``pipeline.plan``): ``NAME.fuse.json``,
``NAME.eval.json`` and ``baselines.json``, so that each stage re-runs exactly when what it uses
changes.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"), help="The params file."),
         out: Path = typer.Option(Path("reports/validated"), help="Directory for the plans.")):
    """Validate params.yaml and the adapters of every fusion; write the plans."""
    from pipeline import plan
    from pipeline.params import load_params, resolve

    p = resolve(load_params(params), str(params))
    plan.write(out, plan.build(p, str(params)))
    print(f"validated {len(p.fusions)} fusion(s) over {len(p.adapters)} adapter(s)")


if __name__ == "__main__":
    run(app)
