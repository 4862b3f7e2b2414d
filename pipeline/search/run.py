"""One weight search run: fuse each candidate, score it on the validation sets, write the results.

Each evaluation fuses the fusion's adapters with candidate weights in memory and scores the result
on every source's ``valid.jsonl`` with a base model loaded once per worker (``pipeline.search.workers``:
in this process, or on the actors of a Ray cluster with ``search.backend: ray``) (the report scores ``test.jsonl``, so the weights
are not chosen on the figures that judge them). The objective is the fusion's mean (or worst)
retention there. The fusion's other settings stay as they are; a rule that sets weights on some
modules keeps them there.

Writes under ``out``: ``best.json`` (the best weights, their value, the start's value and the
``dvc exp run -S`` setting that uses them), ``trace.json`` (one row per evaluation) and
``trace.png`` (the trace as a plot).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from pipeline.errors import FusionError


def valid_split(data: str | Path | None, name: str) -> Path:
    """The validation set of an adapter whose evaluation data is ``data`` (a directory, or its
    test.jsonl): ``valid.jsonl`` in that directory."""
    if data is None:
        raise FusionError(f"adapters.{name}: no 'data'; the search needs its valid.jsonl")
    data = Path(data)
    folder = data if data.is_dir() else data.parent if data.name in ("test.jsonl", "valid.jsonl") else None
    if folder is None or not (folder / "valid.jsonl").is_file():
        raise FusionError(f"adapters.{name}.data: the search needs a valid.jsonl next to the evaluation set "
                          f"({data}); give a directory holding valid.jsonl and test.jsonl")
    return folder / "valid.jsonl"


def setting_text(fusion: str, weights: list) -> str:
    """``++fusions.NAME.weights=[...]``: the ``dvc exp run -S`` value for these weights (``++`` adds the
    key when the fusion inherits the default weights, and overrides it otherwise)."""
    return f"++fusions.{fusion}.weights={json.dumps(weights, separators=(',', ':'))}"


def run_search(fusion: str, base_model: str, adapters: list[tuple[str, str]], data: dict, spec, ev, s: dict,
               out: Path, log: Callable[[str], None] = print) -> dict:
    """Search ``fusion``'s weights (its other settings fixed) and write best.json, trace.json, trace.png.

    ``adapters``: (name, path) of each source; ``data``: each source's evaluation data (its
    valid.jsonl sits next to it); ``ev``: the evaluation settings (``pipeline.plan.EvalSettings``);
    ``s``: the ``search:`` settings (``pipeline.search.settings``).
    """
    from pipeline.evaluate import retention
    from pipeline.io import atomic_dir, write_file, write_json
    from pipeline.methods import get_method
    from pipeline.search.optimizer import search, trace_figure, vector_weights, weights_vector
    from pipeline.search.workers import open_pool

    names = [n for n, _ in adapters]
    valid = {name: valid_split(data[name], name) for name in names}
    n, groups = len(adapters), s["layer_groups"]
    method = get_method(spec.method)
    if not method.uses_weights(n):
        raise FusionError(f"fusion {fusion!r}: {spec.method} of {n} adapters does not read the weights; "
                          "search another fusion")
    if spec.space != "delta":
        raise FusionError(f"fusion {fusion!r}: the search tunes fusions in delta space (space: delta)")
    score = dict(max_examples=s["max_examples"] or ev.max_examples, max_tokens=ev.max_tokens,
                 batch_size=ev.batch_size, system_prompt=ev.system_prompt)
    where = "this process" if s["backend"] == "local" else f"Ray at {s['ray_address'] or 'a local Ray'}"
    log(f"search {fusion}: loading the base model and the validation sets ({where})")
    pool = open_pool(s["backend"], s["ray_address"], s["workers"], base_model, adapters, valid, spec, score)
    try:
        if s["backend"] == "ray":
            log(f"  {pool.workers} Ray worker(s) on {pool.nodes} node(s), each with its own copy of the base model")
        log(f"search {fusion}: scoring the {n} source adapters on their validation sets")
        sources = dict(zip(names, pool.map("source", names)))
        tasks_of = {name: name for name in names}
        seconds: list[dict] = []

        def population(points: list[list[float]]) -> list[float]:
            values = []
            for scores, timing in pool.map("candidate", [vector_weights(x, n, groups) for x in points]):
                seconds.append(timing)
                value = retention(scores, sources, tasks_of, {})[s["objective"]]
                if value is None:
                    raise FusionError(f"fusion {fusion!r}: no retention on the validation sets to search on")
                values.append(value)
            return values

        def report(row: dict) -> None:
            w = vector_weights(row["x"], n, groups)
            log(f"  {row['evaluation']:>3}/{s['budget']}: weights {json.dumps(w)} -> "
                f"{s['objective'].replace('_', ' ')} {row['value']:.4f} (best {row['best']:.4f})")

        start = spec.weights if spec.weights is not None else method.default_weights(n)
        result = search(None, weights_vector(list(start), n, groups), budget=s["budget"], seed=s["seed"],
                        bounds=tuple(s["bounds"]), on_evaluation=report, population=population)
    finally:
        pool.close()
    if seconds:
        mean = {k: sum(t[k] for t in seconds) / len(seconds) for k in ("fuse", "load", "score")}
        log(f"per evaluation: fuse {mean['fuse']:.3f} s, load {mean['load']:.3f} s, score {mean['score']:.3f} s "
            f"(mean of {len(seconds)}, in memory)")

    best = vector_weights(result.best, n, groups)
    record = {
        "enabled": True,
        "fusion": fusion,
        "adapters": names,
        "method": spec.method,
        "objective": s["objective"],
        "split": "valid",
        "budget": s["budget"],
        "seed": s["seed"],
        "bounds": s["bounds"],
        "layer_groups": groups,
        "evaluations": result.evaluations,
        "start": {"weights": vector_weights(result.start, n, groups), "value": result.start_value},
        "best": {"weights": best, "value": result.value,
                 "evaluation": next(r["evaluation"] for r in result.trace if r["x"] == result.best)},
        "set": setting_text(fusion, best),
    }
    rows = [{"evaluation": r["evaluation"], "value": r["value"], "best": r["best"],
             "weights": json.dumps(vector_weights(r["x"], n, groups))} for r in result.trace]
    label = s["objective"].replace("_", " ")
    png = trace_figure(result.trace, f"{label} (valid)",
                       f"Weight search for {fusion}: {result.evaluations} evaluations, seed {s['seed']}",
                       result.start_value)
    with atomic_dir(out) as tmp_out:
        write_json(tmp_out / "best.json", record)
        write_json(tmp_out / "trace.json", rows)
        write_file(tmp_out / "trace.png", png)
    log(f"best {label} on valid {result.value:.4f} (start {result.start_value:.4f}) with weights {json.dumps(best)}")
    log(f"use it: dvc exp run -S '{record['set']}'")
    return record


def write_disabled(out: Path) -> None:
    """What the search stage writes when ``search.enabled`` is false."""
    from pipeline.io import atomic_dir, write_json

    with atomic_dir(out) as tmp:
        write_json(tmp / "best.json", {"enabled": False,
                                       "note": "weight search is off: dvc exp run -S search.enabled=true"})
        write_json(tmp / "trace.json", [])
