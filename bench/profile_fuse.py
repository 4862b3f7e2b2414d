"""Where the time of a fusion goes: the fuse loop of ``pipeline.fuse`` run on the main thread
under cProfile (worker threads are invisible to cProfile), one module after another: per module,
exactly what ``fuse`` runs (the method, the geometry figures and the quality signals).

    python bench/profile_fuse.py --size 1b --method ties --density 0.5 --rank 16 [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.gen_adapters import make_adapter  # noqa: E402
from pipeline.fuse import FusionSpec, _fuse_module, _module_order, module_params  # noqa: E402
from pipeline.methods import check_params, get_method  # noqa: E402
from pipeline.threads import blas_threads  # noqa: E402
from pipeline.validate import validate  # noqa: E402


def run(paths, spec: FusionSpec) -> None:
    checked = validate(paths, space=spec.space)
    srcs = checked.adapters
    info_of = {n: m for a in reversed(srcs) for n, m in a.modules.items()}
    layers = set().union(*(a.layers for a in srcs))
    n_layers = max(layers) + 1
    method = get_method(spec.method)
    for name in sorted(info_of, key=_module_order):
        info = info_of[name]
        shape = (info.out_features, info.in_features)
        sources = []
        for a in srcs:
            A, B, s = a.factors(name)
            sources.append((A, B * np.float32(s)))
        p = module_params(spec, name, info.layer, n_layers, len(srcs))
        check_params(spec.method, len(srcs), p)
        _fuse_module(method, sources, shape, p, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b")
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--space", default="delta")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    args = ap.parse_args()
    paths = [make_adapter(args.cache / f"{args.size}-{i}", args.size, i) for i in range(args.count)]
    spec = FusionSpec(method=args.method, density=args.density, rank=args.rank, space=args.space)
    # CPU time, not wall time: on a shared machine the wall clock mostly measures the other jobs
    prof = cProfile.Profile(time.process_time)
    t, c = time.perf_counter(), time.process_time()
    with blas_threads(1):
        prof.runcall(run, paths, spec)
    total, cpu = time.perf_counter() - t, time.process_time() - c
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(args.top)
    print(f"{args.method} ({args.space}) on {args.count} x {args.size}, one thread: "
          f"{cpu:.2f} s CPU, {total:.2f} s wall (profile times are CPU seconds)")
    print(out.getvalue())


if __name__ == "__main__":
    main()
