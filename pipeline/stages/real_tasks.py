"""Stage ``tasks`` of the real-model project: each task's train / valid / test splits, from a seed.

Reads the ``tasks:`` section of params.yaml (``names``, ``seed``, ``sizes``) and writes
``--out/NAME/{train,valid,test}.jsonl`` (prompt/completion pairs, see pipeline/realmodel/tasks.py)
and the record ``--out/tasks.json``; ``--out`` is replaced only when it holds that record or is empty.
With ``joint: NAME`` also ``--out/NAME/{train,valid}.jsonl``, the union of the tasks' splits (the
data of the joint-training baseline).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"), help="Reads its 'tasks:' section."),
         out: Path = typer.Option(Path("data"), help="Writes NAME/{train,valid,test}.jsonl here.")):
    """Generate the tasks' data sets offline."""
    from pipeline.destination import check_destination
    from pipeline.io import atomic_dir, write_json
    from pipeline.params import load_params
    from pipeline.realmodel.tasks import write_task, write_union

    section = load_params(params).get("tasks") or {}
    sizes = {k: int(v) for k, v in (section.get("sizes") or {"train": 600, "valid": 50, "test": 100}).items()}
    check_destination(out, [params], record="tasks.json", what="data")
    with atomic_dir(out) as tmp:
        write_json(tmp / "tasks.json", {"tasks": list(section.get("names") or []), "seed": int(section.get("seed", 0)),
                                        "sizes": sizes, "written_by": "pipeline.stages.real_tasks"})
        for name in section.get("names") or []:
            write_task(tmp / name, name, sizes, int(section.get("seed", 0)))
            print(f"{out}/{name}: " + ", ".join(f"{n} {s}" for s, n in sizes.items()))
        joint = section.get("joint")
        if joint:
            union = write_union(tmp / joint, [tmp / n for n in section.get("names") or []],
                                int(section.get("seed", 0)))
            print(f"{out}/{joint}: " + ", ".join(f"{n} {s}" for s, n in union.items()))


if __name__ == "__main__":
    run(app)
