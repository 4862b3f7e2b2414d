"""Stage ``validate``: check params.yaml and every fusion's adapters before anything heavy runs.

Writes one small plan per downstream stage under ``--out`` (``pipeline.plan``): ``NAME.fuse.json``,
``NAME.eval.json``, ``baselines.json`` and ``lm_eval.json`` (``pipeline.benchmarks``), so that each
stage re-runs exactly when what it uses changes. The scoring plans hold the base model's identity (``pipeline.basemodel``: its files'
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

    if not is_hub_id(base):
        check_tracked(base, base_in, where, "base_model", "--base-in")


def check_tracked(path: str, inside: list[Path], where: str, what: str, option: str = "--tasks-in") -> None:
    """FusionError when ``path`` (the setting ``what``) is not inside one of the directories ``inside``
    (symlinks resolved); no check when none is given."""
    from pipeline.errors import FusionError

    if not inside:
        return
    b = Path(path).resolve()
    if not any(b == d.resolve() or d.resolve() in b.parents for d in inside):
        raise FusionError(f"{where}: {what} {path} is not inside {', '.join(map(str, inside))} "
                          "(what the validate stage depends on in dvc.yaml), so DVC would not see its files "
                          "change: move it there (a symlink is not followed), or add its directory to the "
                          f"stage's deps and {option}")


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"), help="The params file."),
         out: Path = typer.Option(Path("reports/validated"), help="Directory for the plans."),
         base_in: list[Path] = typer.Option([], help="A directory (a dependency of this stage) that a "
                                                     "local base model must be inside; repeatable."),
         tasks_in: list[Path] = typer.Option([], help="A directory (a dependency of this stage) that "
                                                      "eval.lm_eval.include_path must be inside; repeatable.")):
    """Validate params.yaml and the adapters of every fusion; write the plans."""
    from dataclasses import asdict

    from pipeline import benchmarks, plan
    from pipeline.basemodel import is_hub_id
    from pipeline.destination import check_destination
    from pipeline.io import write_json
    from pipeline.params import load_params, resolve

    p = resolve(load_params(params), str(params))
    inputs = [d.path for d in p.adapters.values()] + [d.data for d in p.adapters.values() if d.data]
    check_destination(out, inputs + ([] if is_hub_id(p.base_model) else [p.base_model]),
                      record=plan.BASELINES_PLAN, what="plans")
    check_base_tracked(p.base_model, base_in, str(params))
    if p.lm_eval and p.lm_eval["include_path"]:
        check_tracked(p.lm_eval["include_path"], tasks_in, str(params), "eval.lm_eval.include_path")
    plans = plan.build(p, str(params))
    lm_eval = benchmarks.plan(p.lm_eval, p.base_model, plans.baselines.base,
                              {a: asdict(r) for a, r in plans.baselines.adapters.items()}, p.eval["system_prompt"])
    plan.write(out, plans)
    write_json(out / benchmarks.PLAN, lm_eval)
    print(f"validated {len(p.fusions)} fusion(s) over {len(p.adapters)} adapter(s)")


if __name__ == "__main__":
    run(app)
