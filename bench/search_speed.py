"""Weight-search throughput on the demo: one evaluation on disk against in memory, and the backends.

Part ``evaluation`` (default): for the same candidate weights, interleaved, times one search
evaluation both ways and splits it into fuse / load / score:

- on disk (the search before ``pipeline.live``): ``fuse`` into a temporary directory, then
  ``evaluate``'s steps: load the sets and ``mlx_lm.load(base, adapter)`` (load), score (score);
- in memory (``pipeline.live``, what the search does now): ``Sources.fuse`` (fuse), applying the
  factors to the base model loaded once (load), score (score).

Checks that both give the same scores, and prints medians and the on-disk / in-memory ratios.

Part ``backends``: the wall time of ``run_search`` for the same fusion, budget and seed with
``search.backend: local`` and with ``ray`` at 1 and 2 workers (a local Ray started by each run;
includes loading the model in each worker), the ratios to local, and that all three found the same
best weights. Needs the ray extra.

The demo is the one ``dvc repro`` built (the paths in params.yaml), or ``--demo DIR``.

    python bench/search_speed.py [--runs 6] [--fusion average]
    python bench/search_speed.py --part backends [--budget 12] [--max-examples 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (fast BLAS for MLX before mlx is imported)


def _setup(args):
    from pipeline.params import load_params, resolve
    from pipeline.plan import EvalSettings
    from pipeline.search import settings, valid_split

    raw = load_params(args.params)
    p = resolve(raw, str(args.params))
    f = p.fusions[args.fusion]
    base = Path(args.demo, "models", "base") if args.demo else Path(p.base_model)
    adapters = [(a, str(Path(args.demo, "adapters", a) if args.demo else p.adapters[a].path)) for a in f.adapters]
    data = {a: (Path(args.demo, "data", a) if args.demo else p.adapters[a].data) for a in f.adapters}
    valid = {a: valid_split(data[a], a) for a in f.adapters}
    ev = EvalSettings.of(p.eval, str(args.params))
    section = {**(raw.get("search") or {}), "fusion": args.fusion}
    if args.max_examples:
        section["max_examples"] = args.max_examples
    s = settings(section, "params.yaml: search")
    score = dict(max_examples=s["max_examples"] or ev.max_examples, max_tokens=ev.max_tokens,
                 batch_size=ev.batch_size)
    return base, adapters, data, valid, f.spec, ev, s, score


def evaluation(args) -> dict:
    import numpy as np

    from dataclasses import replace

    from pipeline.evaluate import encode_sets, load_examples, load_model, score_sets
    from pipeline.fuse import fuse
    from pipeline.live import Evaluator, Sources

    base, adapters, _, valid, spec, _, _, score = _setup(args)
    paths = [p for _, p in adapters]
    rng = np.random.default_rng(0)
    points = [[round(float(w), 3) for w in rng.uniform(0.0, 1.5, len(paths))] for _ in range(args.runs + 1)]

    t = time.perf_counter()
    evaluator = Evaluator(base, valid, **score)
    sources = Sources(paths)
    once = time.perf_counter() - t
    disk = {"fuse": [], "load": [], "score": []}
    memory = {"fuse": [], "load": [], "score": []}
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        for i, w in enumerate(points):
            cand = replace(spec, weights=w)
            # on disk: what every evaluation of the search did before
            t0 = time.perf_counter()
            fuse(paths, Path(tmp) / "candidate", cand)
            t1 = time.perf_counter()
            sets = {task: load_examples(path, score["max_examples"]) for task, path in valid.items()}
            model, tok = load_model(base, Path(tmp) / "candidate")
            encoded = encode_sets(tok, sets, valid)
            t2 = time.perf_counter()
            on_disk = score_sets(model, tok, sets, encoded, max_tokens=score["max_tokens"],
                                 batch_size=score["batch_size"], where=valid)
            t3 = time.perf_counter()
            del model
            # in memory
            t4 = time.perf_counter()
            fused = sources.fuse(cand)
            t5 = time.perf_counter()
            in_memory = evaluator.score(fused)
            if in_memory != on_disk:
                raise SystemExit(f"scores differ at weights {w}:\n{on_disk}\n{in_memory}")
            if i == 0:
                continue  # warm-up
            for d, v in zip(("fuse", "load", "score"), (t1 - t0, t2 - t1, t3 - t2)):
                disk[d].append(v)
            memory["fuse"].append(t5 - t4)
            memory["load"].append(evaluator.timings["load"])
            memory["score"].append(evaluator.timings["score"])
    med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in (("disk", disk), ("memory", memory))}
    for name in med:
        med[name]["total"] = sum(med[name].values())
    return {"runs": args.runs, "once_seconds": once, "median": med,
            "ratio": {k: med["disk"][k] / med["memory"][k] if med["memory"][k] else None for k in med["disk"]}}


def backends(args) -> dict:
    from pipeline.search import run_search

    base, adapters, data, _, spec, ev, s, _ = _setup(args)
    s = {**s, "budget": args.budget, "enabled": True}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        for label, backend, workers in (("local", "local", None), ("ray, 1 worker", "ray", 1),
                                        ("ray, 2 workers", "ray", 2)):
            t = time.perf_counter()
            record = run_search(args.fusion, str(base), adapters, data, spec, ev,
                                {**s, "backend": backend, "workers": workers, "ray_address": None},
                                Path(tmp) / label.replace(" ", "_").replace(",", ""), log=lambda line: None)
            rows[label] = {"seconds": time.perf_counter() - t, "best": record["best"]["weights"],
                           "value": record["best"]["value"]}
    local = rows["local"]["seconds"]
    for r in rows.values():
        r["ratio_to_local"] = r["seconds"] / local
    same = len({json.dumps(r["best"]) for r in rows.values()}) == 1
    return {"budget": args.budget, "rows": rows, "same_best": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("evaluation", "backends"), default="evaluation")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--demo", type=Path, help="a built demo: models/base, adapters/NAME, data/NAME")
    ap.add_argument("--fusion", default="average")
    ap.add_argument("--runs", type=int, default=6, help="evaluations timed each way (after one warm-up)")
    ap.add_argument("--budget", type=int, default=12, help="search budget (part backends)")
    ap.add_argument("--max-examples", type=int, help="validation examples per task (default: the search's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.chdir(ROOT)
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    if args.part == "evaluation":
        r = evaluation(args)
        if args.json:
            print(json.dumps(r))
            return
        print(f"one search evaluation of {args.fusion} on the demo, median of {r['runs']} "
              f"({cores} cores, load {load:.1f}); model + sets loaded once in {r['once_seconds']:.2f} s")
        print(f"{'':8} {'on disk':>9} {'in memory':>10} {'ratio':>7}")
        for k in ("fuse", "load", "score", "total"):
            ratio = r["ratio"][k]
            print(f"{k:8} {r['median']['disk'][k]:>8.3f}s {r['median']['memory'][k]:>9.3f}s "
                  f"{'-' if ratio is None else f'{ratio:.2f}x':>7}")
        print("scores: identical on both paths")
    else:
        r = backends(args)
        if args.json:
            print(json.dumps(r))
            return
        print(f"weight search of {args.fusion}, budget {r['budget']} ({cores} cores, load {load:.1f}); "
              "wall time including start-up")
        for label, row in r["rows"].items():
            print(f"{label:16} {row['seconds']:>7.1f}s  {row['ratio_to_local']:.2f}x local   "
                  f"best {json.dumps(row['best'])} ({row['value']:.4f})")
        print("best weights: " + ("identical on every backend" if r["same_best"] else "DIFFER"))


if __name__ == "__main__":
    main()
