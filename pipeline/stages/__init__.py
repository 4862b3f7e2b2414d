"""DVC stage scripts: thin typer commands, one per stage in ``dvc.yaml``.

Each reads its own slice of ``params.yaml`` (or the plan ``validate`` wrote for it, ``pipeline.plan``),
calls the library and writes the paths its ``cmd`` names (through ``pipeline.io``).
"""

import sys

import typer

from pipeline.errors import FusionError, os_error_line


def run(app: typer.Typer) -> None:
    """Run a stage app; user mistakes (and a write the file system refuses) become one ``error:``
    line per problem and exit code 2."""
    try:
        app()
    except FusionError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
