"""Core space and the mergekit methods (della, della_linear, breadcrumbs, breadcrumbs_ties) at real
model sizes: the real ``fusion fuse`` against the I/O floor of the same run, with bench.py's helpers
(the same adapters, floor, wrapper and table).

Every element-wise method in core space (``--space core``, cores of R x R, no out x in matrix) and
the new methods in delta space (dense, as ties), next to linear and ties in delta space for scale.
Output rank: core space's own default (exact), ``--rank 16`` in delta space as bench.py.

    python bench/core_space.py                       # 1B pair, 3 runs each
    python bench/core_space.py --sizes 1b,8b --runs 2
    python bench/core_space.py --methods ties,della --spaces core
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.bench import FLOOR, FUSION, PY, ROOT, Row, machine, measure, table  # noqa: E402
from bench.gen_adapters import SIZES, adapter_bytes, make_adapter  # noqa: E402

CORE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "della", "della_linear",
        "breadcrumbs", "breadcrumbs_ties")
DELTA = ("linear", "ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties")
DENSITY = 0.5
RANK = 16


def cmd(paths: list[Path], out: Path, method: str, space: str) -> list[str]:
    c = [*FUSION, "fuse", *map(str, paths), "--out", str(out), "--method", method, "--space", space]
    if method != "linear":
        c += ["--density", str(DENSITY)]
    if space == "delta":
        c += ["--rank", str(RANK)]
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1b", help="comma-separated: 1b, 8b (the pair of each)")
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration (the median is reported)")
    ap.add_argument("--methods", default=",".join(CORE))
    ap.add_argument("--spaces", default="core,delta")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--out", type=Path, default=HERE / "results-core.md")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    spaces = [s for s in args.spaces.split(",") if s]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    info = machine()
    load0 = os.getloadavg()
    started = time.time()
    print(f"machine: {info['cores']} cores ({info['cpu']}), {info['memory']}, load {load0[0]:.1f}", flush=True)
    rows: list[Row] = []
    floors: dict = {}
    work = Path(tempfile.mkdtemp(prefix="fusion-bench-core-"))
    try:
        for size in [s for s in args.sizes.split(",") if s]:
            paths = [make_adapter(args.cache / f"{size}-{i}", size, i) for i in range(2)]
            print(f"\n{size} x2: 2 adapters of {adapter_bytes(size) / 2**20:.0f} MiB ({SIZES[size][0]}, rank 16)",
                  flush=True)
            (work / "floor.py").write_text(FLOOR)
            fl = measure(Row(size, 2, "I/O floor"), [PY, str(work / "floor.py"), str(work / "floor.safetensors"),
                                                     *[str(p / "adapters.safetensors") for p in paths]],
                         max(args.runs, 3), env)
            floors[(size, 2)] = fl.wall
            rows.append(fl)
            print(f"  I/O floor              {fl.wall:7.2f} s  {fl.peak_mb:6.0f} MB", flush=True)
            delta_methods = [m for m in DELTA if m in methods or m in ("linear", "ties")]   # these two for scale
            for space in spaces:
                for method in methods if space == "core" else delta_methods:
                    r = Row(size, 2, f"fuse {method}", space)
                    out = work / f"{size}-{method}-{space}"
                    measure(r, cmd(paths, out, method, space), args.runs, env)
                    rec = json.loads((out / "fusion.json").read_text())
                    r.error = rec["output"]["max_error"]
                    r.note = f"rank {rec['output']['rank']}"
                    rows.append(r)
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"  {method:16s} {space:5s} {r.wall:7.2f} s  x{r.wall / fl.wall:5.2f}  {r.peak_mb:6.0f} MB"
                          f"  max error {r.error:.3f}  {r.note}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    lines = ["# Core space and the mergekit methods: fusion time against the I/O floor", "",
             f"`python bench/core_space.py --sizes {args.sizes} --runs {args.runs} --methods {args.methods} "
             f"--spaces {args.spaces}`; machine: {info['cores']} cores ({info['cpu']}), {info['memory']}; "
             f"load {load0[0]:.1f} at start, {load1[0]:.1f} at end; {(time.time() - started) / 60:.1f} min. "
             f"Density {DENSITY}; delta space at --rank {RANK}, core space at its exact default rank. "
             "Medians of separate processes; compare with the floor of the same run.", ""]
    lines += table(rows, floors)
    core = [r for r in rows if r.space == "core"]
    for size in sorted({r.size for r in core}):
        worst = max((r for r in core if r.size == size), key=lambda r: r.wall)
        ratio = worst.wall / floors[(size, 2)]
        lines += ["", f"- core space, {size} pair, within 3x of the I/O floor: {'met' if ratio <= 3 else 'NOT met'} "
                      f"(slowest: {worst.what}, {ratio:.2f}x; median of the core-space methods "
                      f"{statistics.median(r.wall for r in core if r.size == size) / floors[(size, 2)]:.2f}x)"]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
