"""Stage ``demo``: build the built-in demo (base model, adapters, data) offline from params.yaml.

With ``demo: {enabled: false}`` (your own base model and adapters) it builds nothing: ``--out`` is
left an empty directory, so the DAG stays as it is and nothing downstream reads from it. ``--out`` is
replaced only when it is empty or the demo's own (its record ``demo.json``), never a folder of yours.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.io import atomic_dir, write_json
from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"), help="Reads its 'demo:' section."),
         out: Path = typer.Option(Path("demo"), help="Writes models/base, adapters/TASK, data/TASK here."),
         summary: Path = typer.Option(Path("reports/demo.json"), help="Config, sizes and losses.")):
    """Build the demo's tiny base model, its LoRA adapters and their data sets (nothing when
    demo.enabled is false)."""
    from rich.progress import Progress

    from pipeline.demo import DemoConfig, build_demo
    from pipeline.destination import check_destination
    from pipeline.errors import FusionError
    from pipeline.params import load_params

    section = dict(load_params(params).get("demo") or {})
    enabled = section.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise FusionError(f"{params}: demo.enabled must be true or false, got {enabled!r}")
    check_destination(out, [params], record="demo.json", what="demo")
    if not enabled:
        with atomic_dir(out):
            pass
        write_json(summary, {"enabled": False})
        print(f"demo disabled (demo.enabled: false): {out} left empty")
        return
    cfg = DemoConfig.from_dict(section)
    out.mkdir(parents=True, exist_ok=True)  # the record first: from now on the directory is the demo's
    write_json(out / "demo.json", {"demo": section, "written_by": "pipeline.stages.demo"})
    with Progress(transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        result = build_demo(out, cfg, progress)
    seconds = result.pop("seconds")  # wall times vary run to run: printed, not kept, so the summary
    write_json(summary, result)  # (like the rest of the demo) is byte-reproducible
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
    print(f"demo built under {out} in {seconds['total']:.0f} s ({steps})")


if __name__ == "__main__":
    run(app)
