"""Evaluation speed on the demo: batched loss and cached-KV greedy generation, examples per second.

Reads params.yaml (base model, the first adapter with prompt/completion data, eval settings),
loads the model with that adapter once, then times ``pipeline.evaluate.set_loss`` and
``pipeline.evaluate.greedy_generate`` on the adapter's evaluation set (the median of a few runs
after a warm-up). The demo is the one ``dvc repro`` built (the paths in params.yaml), or ``--demo
DIR`` (a directory with models/base, adapters/NAME, data/NAME); when neither exists it is built
into bench/.cache/demo first with ``pipeline.demo.build_demo`` (several minutes).

    python bench/eval_speed.py [--params params.yaml] [--demo DIR] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (fast BLAS for MLX before mlx is imported)
from pipeline.errors import FusionError  # noqa: E402
from pipeline.plan import eval_set  # noqa: E402


def time_evaluation(model, tokenizer, encoded: list, batch: int, max_tokens: int, runs: int):
    """Median seconds of scoring the loss of ``encoded`` and of greedy generation from their prompts,
    after one warm-up batch (graph compilation, caches): ``(loss_s, generate_s, texts)``."""
    from pipeline.evaluate import greedy_generate, set_loss

    prompts = [t[:s] for t, s, _ in encoded]
    set_loss(model, encoded[:batch], batch)
    greedy_generate(model, tokenizer, prompts[:batch], max_tokens, batch)
    loss_t, gen_t = [], []
    for _ in range(runs):
        t = time.perf_counter()
        set_loss(model, encoded, batch)
        loss_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        texts = greedy_generate(model, tokenizer, prompts, max_tokens, batch)
        gen_t.append(time.perf_counter() - t)
    return statistics.median(loss_t), statistics.median(gen_t), texts


def _shown(p: Path) -> str:
    p = p.resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--demo", type=Path, help="a built demo: models/base, adapters/NAME, data/NAME")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON line (for bench.py)")
    args = ap.parse_args()

    from pipeline.evaluate import encode_example, load_examples, load_model
    from pipeline.params import load_params, resolve

    raw = load_params(args.params)
    params = resolve(raw)
    here = args.params.resolve().parent

    def at(p: Path) -> Path:
        return p if p.is_absolute() else here / p

    base = at(Path(params.base_model))
    demo = args.demo
    if demo is None and not (base / "config.json").is_file():
        demo = ROOT / "bench" / ".cache" / "demo"
        if not (demo / "models" / "base" / "config.json").is_file():
            from pipeline.demo import DemoConfig, build_demo

            print(f"building the demo into {demo} (no model at {base})", file=sys.stderr, flush=True)
            build_demo(demo, DemoConfig.from_dict(raw.get("demo")))
    if demo is not None:
        base = demo / "models" / "base"
    ev = params.eval
    for name, decl in params.adapters.items():
        if decl.data is None:
            continue
        adapter = demo / "adapters" / name if demo is not None else at(decl.path)
        path = eval_set(demo / "data" / name if demo is not None else at(decl.data), name)
        examples = load_examples(path, ev["max_examples"])
        if "completion" in examples[0]:
            break
    else:
        raise SystemExit("no adapter with a prompt/completion evaluation set in params.yaml")

    model, tokenizer = load_model(base, adapter)
    encoded = [encode_example(tokenizer, ex) for ex in examples]
    bs, max_tokens = int(ev["batch_size"]), int(ev["max_tokens"])
    loss_s, gen_s, texts = time_evaluation(model, tokenizer, encoded, bs, max_tokens, args.runs)
    new_tokens = sum(len(tokenizer.encode(x)) for x in texts) + len(texts)  # + EOS each (at most)
    n = len(examples)
    result = {"model": _shown(base), "adapter": _shown(adapter),
              "task": path.parent.name if path.name in ("test.jsonl", "valid.jsonl") else path.stem,
              "examples": n, "batch_size": bs, "max_tokens": max_tokens,
              "loss_s": loss_s, "generate_s": gen_s, "loss_per_s": n / loss_s, "generate_per_s": n / gen_s,
              "tokens_per_s": new_tokens / gen_s}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{n} examples ({result['task']}), batch {bs}: loss {result['loss_per_s']:.0f} examples/s, "
              f"greedy generation {result['generate_per_s']:.1f} examples/s "
              f"({result['tokens_per_s']:.0f} tokens/s, up to {max_tokens} new tokens)")


if __name__ == "__main__":
    try:
        main()
    except FusionError as e:
        raise SystemExit(f"error: {e}")
