"""Stage ``validate``: check params.yaml and every fusion's adapters before anything heavy runs.

Writes one small plan per downstream stage under ``--out`` so that each stage re-runs exactly when
what it uses changes: ``NAME.fuse.json`` (the fusion's fully resolved settings and its adapters'
hashes), ``NAME.eval.json`` (base model, evaluation sets and settings of its tasks) and
``baselines.json``. A fusion that inherits nothing that changed gets a byte-identical plan, so DVC
leaves its stages alone.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import FusionError
from pipeline.formats import atomic_dir, sha256_file
from pipeline.params import load_params, resolve
from pipeline.stages import run, write_json
from pipeline.validate import validate

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def eval_set(data: Path | None, name: str) -> Path | None:
    """An adapter's evaluation file: ``data`` itself, or its test.jsonl (else valid.jsonl)."""
    if data is None:
        return None
    if data.is_file():
        return data
    for split in ("test.jsonl", "valid.jsonl"):
        if (data / split).is_file():
            return data / split
    raise FusionError(f"adapters.{name}.data: {data} has no test.jsonl or valid.jsonl")


def base_identity(base: str) -> dict:
    """What identifies the base model: for a local directory, its config and file sizes and
    safetensors headers (cheap, no weights read); for a hub id, the id."""
    p = Path(base)
    if not p.exists():
        return {"id": base}
    ident = {"path": base, "files": {}}
    for f in sorted(p.iterdir()):
        if f.is_file():
            if f.suffix in (".json", ".jinja", ".txt", ".model"):
                ident["files"][f.name] = sha256_file(f)
            else:
                with open(f, "rb") as fh:
                    head = fh.read(1 << 16)
                import hashlib
                ident["files"][f.name] = f"{f.stat().st_size}:{hashlib.sha256(head).hexdigest()}"
    return ident


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"), help="The params file."),
         out: Path = typer.Option(Path("reports/validated"), help="Directory for the plans.")):
    """Validate params.yaml and the adapters of every fusion; write the plans."""
    p = resolve(load_params(params), str(params))
    problems = []
    hashes: dict[str, str] = {}
    for fusion in p.fusions.values():
        paths = [p.adapters[a].path for a in fusion.adapters]
        try:
            validate(paths, space=fusion.spec.space)
        except FusionError as e:
            problems += [f"fusion {fusion.name!r}: {line}" for line in str(e).splitlines()]
    sets = {}
    for decl in p.adapters.values():
        try:
            sets[decl.name] = eval_set(decl.data, decl.name)
        except FusionError as e:
            problems.append(str(e))
    if problems:
        raise FusionError("\n".join(problems))

    def adapter_rec(name: str) -> dict:
        decl = p.adapters[name]
        from pipeline.formats import read_adapter

        a = read_adapter(decl.path)
        if name not in hashes:
            hashes[name] = sha256_file(a.weights_file)
        return {"name": name, "path": str(decl.path), "sha256": hashes[name],
                "config_sha256": sha256_file(a.path / "adapter_config.json")}

    def task_rec(name: str) -> dict:
        s = sets[name]
        return {"data": str(s) if s else None, "sha256": sha256_file(s) if s else None}

    base = base_identity(p.base_model)
    common = {"base_model": p.base_model, "base": base, "eval": p.eval, "prompts": p.prompts}
    with atomic_dir(out) as tmp:
        for fusion in p.fusions.values():
            write_json(tmp / f"{fusion.name}.fuse.json",
                  {"fusion": fusion.name, "adapters": [adapter_rec(a) for a in fusion.adapters],
                   "spec": fusion.spec.to_json()})
            write_json(tmp / f"{fusion.name}.eval.json",
                  {**common, "fusion": fusion.name, "tasks": {a: task_rec(a) for a in fusion.adapters}})
        write_json(tmp / "baselines.json",
              {**common, "adapters": {a: adapter_rec(a) for a in p.adapters},
               "tasks": {a: task_rec(a) for a in p.adapters}})
    print(f"validated {len(p.fusions)} fusion(s) over {len(p.adapters)} adapter(s)")


if __name__ == "__main__":
    run(app)
