"""Where the time of a fusion goes: the fuse loop of ``pipeline.fuse`` run on the main thread
under cProfile (worker threads are invisible to cProfile), one module after another: per module,
exactly what ``fuse`` runs (the method, the geometry figures and the quality signals).

    python bench/profile_fuse.py --size 1b --method ties --density 0.5 --rank 16 [--top 25]
    python bench/profile_fuse.py --size 1b --method linear --rank 16 --parts 5

``--parts N``: no profiler; the factors are read once, then each part of the per-module work (the
method, the Gram products of the stacked factors, the quality signals, the geometry figures) is
timed over every module, N times, and the median CPU milliseconds of each part are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.gen_adapters import make_adapter  # noqa: E402
from pipeline import geometry, signals  # noqa: E402
from pipeline.fuse import FusionSpec, _fuse_module, _module_order, module_params  # noqa: E402
from pipeline.methods import check_params, get_method, run_method  # noqa: E402
from pipeline.threads import blas_threads  # noqa: E402
from pipeline.validate import validate  # noqa: E402


def modules(paths, spec: FusionSpec):
    """(name, shape, sources with the scale folded in, resolved parameters) of every module."""
    checked = validate(paths, space=spec.space)
    srcs = checked.adapters
    info_of = {n: m for a in reversed(srcs) for n, m in a.modules.items()}
    n_layers = max(set().union(*(a.layers for a in srcs))) + 1
    out = []
    for name in sorted(info_of, key=_module_order):
        info = info_of[name]
        sources = []
        for a in srcs:
            A, B, s = a.factors(name)
            sources.append((A, B * np.float32(s)))  # fresh arrays, as fuse reads them
        p = module_params(spec, name, info.layer, n_layers, len(srcs))
        check_params(spec.method, len(srcs), p)
        out.append((name, (info.out_features, info.in_features), sources, p))
    return out


def parts(paths, spec: FusionSpec, reps: int) -> dict[str, float]:
    """Median CPU milliseconds of each part of the per-module work, summed over the modules."""
    mods = modules(paths, spec)
    method = get_method(spec.method)
    times: dict[str, list[float]] = {"method": [], "grams": [], "signals": [], "geometry": []}
    clock = time.process_time
    for _ in range(reps):
        acc = dict.fromkeys(times, 0.0)
        for name, shape, sources, p in mods:
            t0 = clock()
            result = run_method(method, sources, shape, p, name)
            fused = (np.asarray(result.a, np.float32), np.asarray(result.b, np.float32))
            t1 = clock()
            grams = geometry.JointGrams.of(sources, fused, result.span)
            t2 = clock()
            signals.module_signals(sources, fused, float(result.error), grams=grams)
            t3 = clock()
            geometry.module_geometry(sources, shape, name, grams=grams)
            t4 = clock()
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                acc[k] += dt
        for k in times:
            times[k].append(acc[k])
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def run(paths, spec: FusionSpec) -> None:
    method = get_method(spec.method)
    for name, shape, sources, p in modules(paths, spec):
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
    ap.add_argument("--parts", type=int, default=0, metavar="N",
                    help="time the method, Gram products, signals and geometry apart, N times (no profiler)")
    args = ap.parse_args()
    paths = [make_adapter(args.cache / f"{args.size}-{i}", args.size, i) for i in range(args.count)]
    spec = FusionSpec(method=args.method, density=args.density, rank=args.rank, space=args.space)
    if args.parts:
        with blas_threads(1):
            got = parts(paths, spec, args.parts)
        print(f"{args.method} ({args.space}) on {args.count} x {args.size}, one thread, median of {args.parts}: "
              + ", ".join(f"{k} {v:.0f} ms" for k, v in got.items()) + f" (total {sum(got.values()):.0f} ms CPU)")
        return
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
