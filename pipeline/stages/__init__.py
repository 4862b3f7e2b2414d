"""DVC stage scripts: thin typer commands, one per stage in ``dvc.yaml``.

Each reads its own slice of ``params.yaml`` (or the plan ``validate`` wrote for it), calls the
library and writes the paths its ``cmd`` names.
"""

import json
import sys
from pathlib import Path

import typer

from pipeline.errors import FusionError


def run(app: typer.Typer) -> None:
    """Run a stage app; user mistakes become one ``error:`` line per problem and exit code 2."""
    try:
        app()
    except FusionError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON with sorted keys (stable bytes run to run), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
