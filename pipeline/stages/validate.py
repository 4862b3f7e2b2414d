"""Stage ``validate``: check params.yaml and every fusion's adapters before anything heavy runs.

Writes one small plan per downstream stage under ``--out`` (``pipeline.plan``): ``NAME.fuse.json``,
``NAME.eval.json`` and ``baselines.json``, so that each stage re-runs exactly when what it uses
changes. The scoring plans hold the base model's identity (``pipeline.basemodel``: its files'
sha256, or a hub id's revision), so they change when its bytes do. ``--base-in`` names the
directories this stage depends on in dvc.yaml that a local base model must be inside: DVC sees a base
model's files change only there (it does not follow a symlink out of a directory).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def check_base_tracked(base: str, base_in: list[Path], where: str) -> None:
    """FusionError when the local base model ``base`` is not inside one of ``base_in`` (symlinks resolved)."""
    from pipeline.basemodel import is_hub_id
    from pipeline.errors import FusionError

    if not base_in or is_hub_id(base):
        return
    b = Path(base).resolve()
    if not any(b == d.resolve() or d.resolve() in b.parents for d in base_in):
        raise FusionError(f"{where}: base_model {base} is not inside {', '.join(map(str, base_in))} "
                          "(what the validate stage depends on in dvc.yaml), so DVC would not see its files "
                          "change: move it there (a symlink is not followed), or add its directory to the "
                          "stage's deps and --base-in")


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"), help="The params file."),
         out: Path = typer.Option(Path("reports/validated"), help="Directory for the plans."),
         base_in: list[Path] = typer.Option([], help="A directory (a dependency of this stage) that a "
                                                     "local base model must be inside; repeatable.")):
    """Validate params.yaml and the adapters of every fusion; write the plans."""
    from pipeline import plan
    from pipeline.basemodel import is_hub_id
    from pipeline.destination import check_destination
    from pipeline.params import load_params, resolve

    p = resolve(load_params(params), str(params))
    inputs = [d.path for d in p.adapters.values()] + [d.data for d in p.adapters.values() if d.data]
    check_destination(out, inputs + ([] if is_hub_id(p.base_model) else [p.base_model]),
                      record=plan.BASELINES_PLAN, what="plans")
    check_base_tracked(p.base_model, base_in, str(params))
    plan.write(out, plan.build(p, str(params)))
    print(f"validated {len(p.fusions)} fusion(s) over {len(p.adapters)} adapter(s)")


if __name__ == "__main__":
    run(app)
