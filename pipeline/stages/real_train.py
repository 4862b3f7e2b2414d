"""Stage ``train@NAME`` of the real-model project: one LoRA adapter, trained with mlx-lm's trainer.

Reads ``train.defaults`` and ``train.adapters.NAME`` (which override the defaults) and
``eval.system_prompt`` from params.yaml; trains on ``--data/train.jsonl`` (validated on
valid.jsonl) and writes the adapter to ``--out`` and a summary (losses, time) to ``--summary``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.io import write_json
from pipeline.stages import run

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(name: str = typer.Option(..., help="The adapter (a key of train.adapters)."),
         params: Path = typer.Option(Path("params.yaml"), help="Reads 'train:' and eval.system_prompt."),
         base: Path = typer.Option(..., help="The base model directory."),
         data: Path = typer.Option(..., help="Directory with train.jsonl and valid.jsonl."),
         out: Path = typer.Option(..., help="The adapter directory to write."),
         summary: Path = typer.Option(..., help="Where to write the training summary.")):
    """Train one adapter of the real-model project."""
    from pipeline.errors import FusionError
    from pipeline.params import load_params
    from pipeline.realmodel.train import TrainSpec, train_adapter

    raw = load_params(params)
    section = raw.get("train") or {}
    adapters = section.get("adapters") or {}
    if name not in adapters:
        raise FusionError(f"{params}: train.adapters has no {name!r} (declared: {', '.join(adapters)})")
    settings = {**(section.get("defaults") or {}), **(adapters[name] or {})}
    try:
        spec = TrainSpec(**settings)
    except TypeError as e:
        raise FusionError(f"{params}: train.adapters.{name}: {e}") from None
    result = train_adapter(base, data, out, spec, system=(raw.get("eval") or {}).get("system_prompt"),
                           log=lambda line: print(line, flush=True))
    seconds = result.pop("seconds")  # wall time varies run to run: printed, not kept
    write_json(summary, {"name": name, "spec": settings, **result})
    print(f"trained {out} in {seconds:.0f} s")


if __name__ == "__main__":
    run(app)
