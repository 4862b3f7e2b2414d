"""Stage ``fuse@NAME``: fuse one fusion's adapters as its plan says."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(plan: Path = typer.Option(..., help="NAME.fuse.json written by the validate stage."),
         out: Path = typer.Option(..., help="Fused adapter directory (fused/NAME)."),
         record: Path = typer.Option(..., help="Where to copy fusion.json for the report.")):
    """Fuse the adapters named in PLAN into OUT."""
    from pipeline.fuse import fuse
    from pipeline.io import copy_file
    from pipeline.plan import FusePlan

    job = FusePlan.read(plan)
    names = [a.name for a in job.adapters]
    result = fuse([a.path for a in job.adapters], out, job.spec, names=names)
    copy_file(out / "fusion.json", record)
    o = result["output"]
    print(f"{job.fusion}: {job.spec.method} of {', '.join(names)} -> {out} "
          f"(rank {o['rank']}, max re-factoring error {o['max_error']:.2e})")


if __name__ == "__main__":
    run(app)
