"""DVC stage scripts: thin typer commands, one per stage in ``dvc.yaml``.

Each reads its own slice of ``params.yaml`` (or the plan ``validate`` wrote for it, ``pipeline.plan``),
calls the library and writes the paths its ``cmd`` names (through ``pipeline.io``).
"""

import sys

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
