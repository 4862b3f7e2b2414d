"""The frontier methods at real model sizes: each one's ``fusion fuse`` against the I/O floor of the same run.

For the Llama-3.2-1B-shaped rank-16 pair (and the Llama-3.1-8B one with ``--sizes 1b,8b``), from
bench/gen_adapters.py, it runs the I/O floor (bench/bench.py's: read the inputs, write an output of the
fused size) and each configuration of ``CONFIGS`` as separate processes, ``--runs`` times each, every run
of a configuration followed by a run of the floor, and prints the median wall time, its ratio to the
median of those interleaved floor runs (the machine's load drifts between configurations), the peak
memory and the largest re-factoring error the fuse recorded (every fuse asks for ``--rank 16``, as
bench/bench.py does). Uses bench/bench.py's helpers.
Then the math alone: each configuration's ``fuse_module`` over every module on one thread, in CPU
seconds (the steady figure when other jobs share the machine).

    python bench/frontier.py                       # 1B pair, 5 runs each (a few minutes)
    python bench/frontier.py --sizes 1b,8b --runs 3
    python bench/frontier.py --only tsv,knots      # a subset of CONFIGS, by label
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.bench import FLOOR, PY, Row, fuse_cmd, measure, run_env  # noqa: E402
from bench.gen_adapters import SIZES, adapter_bytes, make_adapter  # noqa: E402

# label -> (method, space, extra command-line arguments). Add a line per method or setting to time.
CONFIGS: dict[str, tuple[str, str, list[str]]] = {
    "linear": ("linear", "delta", []),          # today's exact method, for comparison
    "tsv": ("tsv", "delta", []),
    "iso_c": ("iso_c", "delta", []),
    "iso_cts": ("iso_cts", "delta", []),
    "knots ties": ("knots", "delta", ["--density", "0.5"]),
    "knots dare_ties": ("knots", "delta", ["--inner-method", "dare_ties", "--density", "0.5"]),
    # core space (cores of R x R, never out x in) for every element-wise method, and della / breadcrumbs
    # in delta space (dense, as ties)
    **{f"{m} core": (m, "core", [] if m == "linear" else ["--density", "0.5"])
       for m in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "della", "della_linear",
                 "breadcrumbs", "breadcrumbs_ties")},
    **{m: (m, "delta", ["--density", "0.5"]) for m in ("della", "della_linear", "breadcrumbs", "breadcrumbs_ties")},
}
TARGET = {"1b": 3.0, "8b": 2.0}   # x the I/O floor


def run(size: str, n: int, labels: list[str], runs: int, cache: Path, env: dict, work: Path) -> list[tuple]:
    paths = [make_adapter(cache / f"{size}-{i}", size, i) for i in range(n)]
    print(f"\n{size} x{n}: {n} adapters of {adapter_bytes(size) / 2**20:.0f} MiB ({SIZES[size][0]} shapes, rank 16)",
          flush=True)
    floor_py = work / "floor.py"
    floor_py.write_text(FLOOR)
    floor_cmd = [PY, str(floor_py), str(work / "floor.safetensors"), *[str(p / "adapters.safetensors") for p in paths]]
    floor = measure(Row(size, n, "I/O floor"), floor_cmd, runs, env)
    print(f"  {'I/O floor':18s} {floor.wall:6.2f} s  (before the configurations; each ratio below is to the "
          "floor runs interleaved with its own)", flush=True)
    rows = []
    for label in labels:
        method, space, extra = CONFIGS[label]
        out = work / "out"
        r, fl = Row(size, n, f"fuse {label}", space), Row(size, n, "I/O floor")
        for _ in range(runs):  # fuse and floor in turn: a ratio of two medians measured side by side
            measure(r, fuse_cmd(paths, out, method, space) + extra, 1, env)
            measure(fl, floor_cmd, 1, env)
        err = json.loads((out / "fusion.json").read_text())["output"]["max_error"]
        ratio = r.wall / fl.wall
        rows.append((size, n, label, r.wall, ratio, statistics.median(r.cpu), r.peak_mb, err))
        print(f"  {label:18s} {r.wall:6.2f} s  x{ratio:5.2f} floor ({fl.wall:.2f} s)  CPU "
              f"{statistics.median(r.cpu):5.2f} s  {r.peak_mb:5.0f} MB  max error {err:.3f}  "
              f"{'within' if ratio <= TARGET[size] else 'ABOVE'} {TARGET[size]:.0f}x", flush=True)
    return [(size, n, "I/O floor", floor.wall, 1.0, statistics.median(floor.cpu), floor.peak_mb, None)] + rows


def math_alone(size: str, n: int, labels: list[str], cache: Path, runs: int = 3) -> list[tuple]:
    """CPU seconds of each configuration's math alone: ``fuse_module`` over every module, one thread,
    the factors already in memory (best of ``runs``). On a shared machine this is the steady figure."""
    import time

    import numpy as np

    from pipeline.formats import read_adapter
    from pipeline.methods import ModuleParams, fuse_module
    from pipeline.threads import blas_threads

    ads = [read_adapter(make_adapter(cache / f"{size}-{i}", size, i)) for i in range(n)]
    mods = []
    for name in sorted(ads[0].modules):
        srcs = []
        for a in ads:
            A, B, s = a.factors(name)
            srcs.append((np.ascontiguousarray(A, np.float32), np.ascontiguousarray(B * np.float32(s))))
        info = ads[0].modules[name]
        mods.append((srcs, (info.out_features, info.in_features), name))
    flags = {"--inner-method": "inner_method", "--density": "density", "--common-fraction": "common_fraction",
             "--gamma": "gamma", "--epsilon": "epsilon", "--seed": "seed"}
    out = []
    with blas_threads(1):
        for label in labels:
            method, space, extra = CONFIGS[label]
            kw = {flags[k]: (v if k == "--inner-method" else float(v) if k != "--seed" else int(v))
                  for k, v in zip(extra[::2], extra[1::2])}
            p = ModuleParams(weights=(1.0,) * n, rank=16, space=space, **kw)
            best = float("inf")
            for _ in range(runs):
                c = time.process_time()
                for srcs, shape, name in mods:
                    fuse_module(srcs, shape, method, p, name)
                best = min(best, time.process_time() - c)
            out.append((size, n, label, best, len(mods)))
            print(f"  {label:18s} math alone {best:6.2f} s CPU ({len(mods)} modules, one thread)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1b", help="comma-separated: 1b, 8b")
    ap.add_argument("--adapters", type=int, default=2, help="number of adapters fused")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated labels of CONFIGS (default: all)")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    args = ap.parse_args()
    labels = [x for x in args.only.split(",") if x] or list(CONFIGS)
    for x in labels:
        if x not in CONFIGS:
            ap.error(f"unknown configuration {x!r} (known: {', '.join(CONFIGS)})")
    env = run_env()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    work = Path(tempfile.mkdtemp(prefix="fusion-frontier-"))
    rows, alone = [], []
    try:
        for size in [s for s in args.sizes.split(",") if s]:
            rows += run(size, args.adapters, labels, args.runs, args.cache, env, work)
            alone += math_alone(size, args.adapters, labels, args.cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| size | adapters | what | median wall (s) | x I/O floor | CPU (s) | peak RSS (MB) | max error |")
    print("|---|---|---|---|---|---|---|---|")
    for size, n, what, wall, ratio, cpu, mb, err in rows:
        print(f"| {size} | {n} | {what} | {wall:.2f} | {ratio:.2f} | {cpu:.2f} | {mb:.0f} | "
              f"{'' if err is None else f'{err:.3f}'} |")
    floor_cpu = {(r[0], r[1]): r[5] for r in rows if r[2] == "I/O floor"}
    print("\nThe math alone (`fuse_module` over every module, one thread, factors in memory, best of 3):\n")
    print("| size | adapters | what | CPU (s) | x the I/O floor's CPU |")
    print("|---|---|---|---|---|")
    for size, n, label, cpu, _ in alone:
        print(f"| {size} | {n} | {label} | {cpu:.2f} | {cpu / floor_cpu[(size, n)]:.2f} |")


if __name__ == "__main__":
    main()
