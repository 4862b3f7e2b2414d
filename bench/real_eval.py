"""Evaluation speed on the real model (SmolLM2-135M-Instruct), 4-bit against float32.

For each prepared base model of the real-model project (``real/models/base-q4`` and
``real/models/base-float32``, built by its ``model`` stage) with the first adapter of
``real/params.yaml``, times ``pipeline.evaluate.set_loss`` (batched, masked loss) and
``pipeline.evaluate.greedy_generate`` (batched, KV cache) on that adapter's test split, and prints
the medians of ``--runs`` runs after a warm-up as examples per second.

    python bench/real_eval.py [--project real] [--examples 20] [--runs 3] [--dtypes q4 float32]
                              [--base-only] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (fast BLAS for MLX before mlx is imported)
from pipeline.errors import FusionError  # noqa: E402


def measure(base: Path, adapter: Path | None, data: Path, n: int, runs: int, batch: int, max_tokens: int,
            system: str | None) -> dict:
    from bench.eval_speed import time_evaluation
    from pipeline.evaluate import encode_example, load_examples, load_model

    examples = load_examples(data / "test.jsonl", n)
    model, tokenizer = load_model(base, adapter)
    encoded = [encode_example(tokenizer, ex, system) for ex in examples]
    loss_s, gen_s, texts = time_evaluation(model, tokenizer, encoded, batch, max_tokens, runs)
    hits = sum(t.strip() == ex["completion"].strip() for t, ex in zip(texts, examples))
    return {"model": base.name, "examples": len(examples), "batch_size": batch, "max_tokens": max_tokens,
            "loss_s": loss_s, "generate_s": gen_s, "loss_per_s": len(examples) / loss_s,
            "generate_per_s": len(examples) / gen_s, "accuracy": hits / len(examples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=ROOT / "real")
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON line per model")
    ap.add_argument("--dtypes", nargs="*", help="models to measure (default: model.dtypes)")
    ap.add_argument("--base-only", action="store_true", help="without the adapter")
    args = ap.parse_args()

    from pipeline.params import load_params

    raw = load_params(args.project / "params.yaml")
    ev = raw.get("eval") or {}
    name, decl = next(iter(raw["adapters"].items()))
    for dtype in args.dtypes or (raw.get("model") or {}).get("dtypes") or ["q4", "float32"]:
        base = args.project / "models" / f"base-{dtype}"
        if not (base / "config.json").is_file():
            raise FusionError(f"{base}: not built; run `dvc repro model` in {args.project}")
        adapter = None if args.base_only else args.project / decl["path"]
        r = measure(base, adapter, args.project / decl["data"], args.examples,
                    args.runs, int(ev.get("batch_size", 20)), int(ev.get("max_tokens", 12)),
                    ev.get("system_prompt"))
        r["adapter"] = None if args.base_only else name
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{dtype:>8}: {r['examples']} examples ({name}, {'base' if args.base_only else 'adapter'}), batch {r['batch_size']}: loss "
                  f"{r['loss_per_s']:.3g} examples/s, greedy generation {r['generate_per_s']:.3g} "
                  f"examples/s (up to {r['max_tokens']} new tokens; exact match {r['accuracy']:.0%})",
                  flush=True)


if __name__ == "__main__":
    try:
        main()
    except FusionError as e:
        raise SystemExit(f"error: {e}")
