"""Stage ``fuse@NAME``: fuse one fusion's adapters as its plan says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from pipeline.fuse import FusionSpec, fuse
from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(plan: Path = typer.Option(..., help="NAME.fuse.json written by the validate stage."),
         out: Path = typer.Option(..., help="Fused adapter directory (fused/NAME)."),
         record: Path = typer.Option(..., help="Where to copy fusion.json for the report.")):
    """Fuse the adapters named in PLAN into OUT."""
    job = json.loads(plan.read_text())
    spec = FusionSpec(**job["spec"])
    paths = [a["path"] for a in job["adapters"]]
    names = [a["name"] for a in job["adapters"]]
    result = fuse(paths, out, spec, names=names)
    record.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "fusion.json", record)
    o = result["output"]
    print(f"{job['fusion']}: {spec.method} of {', '.join(names)} -> {out} "
          f"(rank {o['rank']}, max re-factoring error {o['max_error']:.2e})")


if __name__ == "__main__":
    run(app)
