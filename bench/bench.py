"""Fusion at real model sizes: the real ``fusion`` command against the I/O floor.

Generates rank-16 adapters with the shapes of Llama-3.2-1B and Llama-3.1-8B (q, k, v, o, gate,
up, down on every layer, mlx-lm layout, fixed seeds; cached under bench/.cache), then for each
size, number of adapters, method and space runs ``fusion fuse`` as a separate process several
times and reports the median wall time and peak memory (the child's maximum resident set size),
next to the I/O floor measured the same way in the same run: a process that reads the inputs and
writes an output of the fused adapter's size with safetensors and nothing else. ``fusion
validate`` is timed the same way. For the masking methods it checks, on a few modules, the
re-factoring error recorded in ``fusion.json`` against the optimal rank-16 error from a full
SVD of the dense merge (computed here with the slow reference path). It prints the table and
writes it to bench/results.md.

    python bench/bench.py                 # the full run (about 15-30 minutes on 2 cores)
    python bench/bench.py --quick         # 1B pair, one run, a few methods (a minute or two)
    python bench/bench.py --sizes 1b --runs 5 --methods linear,ties
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.gen_adapters import SIZES, adapter_bytes, make_adapter, module_shapes  # noqa: E402

PY = sys.executable
_SCRIPT = Path(PY).parent / "fusion"    # the installed command line, as users run it
FUSION = [str(_SCRIPT)] if _SCRIPT.is_file() else [PY, "-m", "pipeline.cli"]
EXACT = ("linear", "concat", "slerp")
MASKING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
ALL_METHODS = EXACT + MASKING
DENSITY = 0.5
RANK = 16

FLOOR = r"""
import sys
from safetensors.numpy import load_file, save_file
out, inputs = sys.argv[1], sys.argv[2:]
tensors = [load_file(p) for p in inputs]
save_file(tensors[0], out)   # the fused adapter has the inputs' modules at rank 16: the same size
"""


@dataclass
class Row:
    size: str
    n: int
    what: str          # "I/O floor", "validate", or "fuse <method>"
    space: str = ""
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)   # KiB
    cpu: list[float] = field(default_factory=list)
    error: float | None = None
    note: str = ""

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def peak_mb(self) -> float:
        return max(self.rss) / 1024


# A child's ru_maxrss starts from the RSS of the process that spawned it (Linux folds the spawning
# address space's high-water mark in at exec), so every command runs under this small wrapper,
# started fresh: the figure is then the command's own peak (plus at most the wrapper's ~10 MB).
WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall": wall, "maxrss": u.ru_maxrss, "cpu": u.ru_utime + u.ru_stime,
                  "err": p.stderr.decode(errors="replace")[-3000:]}))
"""


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, int, float]:
    """Run ``cmd`` as a child of a fresh wrapper; return (wall seconds, peak RSS in KiB, CPU seconds)."""
    res = subprocess.run([PY, "-S", "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    if res.returncode != 0:
        raise RuntimeError(f"wrapper failed: {res.stderr[-2000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r['rc']}):\n{r['err']}")
    return r["wall"], r["maxrss"], r["cpu"]


def run_env() -> dict:
    """The environment the measured commands run in: the project first on PYTHONPATH, and Python's
    bytecode cache on, as on any installed copy. Some machines set PYTHONDONTWRITEBYTECODE (this
    project's CI does): every ``fusion`` command would then compile the project's modules again,
    about 0.07 s of a 1B fuse, which no user pays. The modules are compiled here once, first."""
    env = with_tree(dict(os.environ), ROOT)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "pipeline")], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return env


def measure(row: Row, cmd: list[str], runs: int, env: dict | None = None, cwd: Path | None = None) -> Row:
    for _ in range(runs):
        wall, rss, cpu = run_measured(cmd, env, cwd)
        row.walls.append(wall)
        row.rss.append(rss)
        row.cpu.append(cpu)
    return row


def fuse_cmd(paths: list[Path], out: Path, method: str, space: str) -> list[str]:
    cmd = [*FUSION, "fuse", *map(str, paths), "--out", str(out), "--method", method, "--space", space,
           "--rank", str(RANK)]
    if method in MASKING:
        cmd += ["--density", str(DENSITY)]
    return cmd


# --- optimality of the re-factoring ------------------------------------------------------------

def check_modules(size: str) -> list[str]:
    """A few modules whose full SVD is affordable: k_proj of the first layer, q_proj of the middle
    one and v_proj (8B) or o_proj (1B) of the last."""
    layers = SIZES[size][3]
    last = "v_proj" if size == "8b" else "o_proj"
    return ["model.layers.0.self_attn.k_proj", f"model.layers.{layers // 2}.self_attn.q_proj",
            f"model.layers.{layers - 1}.self_attn.{last}"]


# The masking methods: how each sparsifies and whether it elects signs (as registered in catalog.py).
MASKING = {"ties": ("magnitude", True), "dare_linear": ("random", False), "dare_ties": ("random", True),
           "magnitude_prune": ("magnitude", False)}


def optimality(paths: list[Path], out: Path, method: str, modules: list[str]) -> list[dict]:
    """For each module: the error fusion.json records, the error of the written factors against the
    dense merge (the slow reference path: ``merge_task_vectors`` on whole dense deltas), and the
    optimal rank-16 error from all singular values of that merge (float64)."""
    from pipeline.formats import read_adapter
    from pipeline.methods import dense_delta, merge_task_vectors, source_rng

    record = json.loads((out / "fusion.json").read_text())
    fused = read_adapter(out)
    srcs = [read_adapter(p) for p in paths]
    sparsify, elect = MASKING[method]
    p = record["params"]
    n = len(srcs)
    weights = p["weights"] or [1.0] * n
    rows = []
    for name in modules:
        sources = []
        for a in srcs:
            A, B, s = a.factors(name)
            sources.append((A, B * np.float32(s)))
        shape = (sources[0][1].shape[0], sources[0][0].shape[1])
        rngs = [source_rng(p["seed"], name, i) for i in range(n)] if sparsify == "random" else None
        merged = merge_task_vectors((dense_delta(s, shape) for s in sources), weights,
                                    sparsify=sparsify, density=p["density"],
                                    elect=p["majority_sign_method"] if elect else None,
                                    consensus=p.get("consensus", "peft"), rngs=rngs)
        d = merged.astype(np.float64)
        gram = d @ d.T if d.shape[0] <= d.shape[1] else d.T @ d
        s2 = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)
        optimal = math.sqrt(s2[RANK:].sum() / s2.sum())
        A, B, s = fused.factors(name)
        measured = float(np.linalg.norm(d - s * B.astype(np.float64) @ A.astype(np.float64)) / np.linalg.norm(d))
        rows.append({"module": name, "recorded": record["modules"][name]["error"], "measured": measured,
                     "optimal": optimal, "excess": measured / optimal - 1.0})
    return rows


# --- evaluation speed --------------------------------------------------------------------------

def eval_speed(demo: Path | None, timeout: float = 3600) -> dict:
    """Examples per second of batched loss and cached-KV greedy generation on the demo (a child
    process: bench/eval_speed.py, which builds the demo into bench/.cache/demo if there is none)."""
    cmd = [PY, str(HERE / "eval_speed.py"), "--json"] + (["--demo", str(demo)] if demo else [])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- reporting ---------------------------------------------------------------------------------

THREAD_CONFIGS = (("1 module at a time, OpenBLAS 2 threads", {"FUSION_THREADS": "1", "FUSION_BLAS_THREADS": "2"}),
                  ("1 module at a time, OpenBLAS 1 thread", {"FUSION_THREADS": "1", "FUSION_BLAS_THREADS": "1"}),
                  ("default: 1 module per core, OpenBLAS 1 thread", {}))


def thread_rows(args, env: dict, work: Path) -> list[Row]:
    """The 1B pair fused with linear and ties under three thread settings (what the fuse command
    picks by default, and the two it replaced)."""
    print("\nthreads (1b pair)", flush=True)
    paths = [make_adapter(args.cache / f"1b-{i}", "1b", i) for i in range(2)]
    rows = []
    for method in ("linear", "ties"):
        for label, extra in THREAD_CONFIGS:
            e = {k: v for k, v in env.items() if k not in ("FUSION_THREADS", "FUSION_BLAS_THREADS")}
            e.update(extra)
            r = measure(Row("1b", 2, f"fuse {method}", "delta", note=label),
                        fuse_cmd(paths, work / "threads", method, "delta"),
                        args.runs if method == "linear" else 1, e)
            rows.append(r)
            print(f"  {method:8s} {label:48s} {r.wall:7.2f} s  CPU {statistics.median(r.cpu):6.2f} s", flush=True)
    return rows


@contextmanager
def revision_tree(rev: str, where: Path):
    """``(tree, short hash)``: git revision ``rev`` checked out into ``where`` (a temporary
    worktree), removed after."""
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        yield where, subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, capture_output=True)


def with_tree(env: dict, tree: Path) -> dict:
    """``env`` with the package of ``tree`` first on PYTHONPATH."""
    return dict(env, PYTHONPATH=str(tree) + os.pathsep + env.get("PYTHONPATH", ""))


def baseline_rows(args, env: dict, work: Path) -> list[Row]:
    """The same commands run with the package of git revision ``args.baseline`` (a temporary
    worktree first on PYTHONPATH)."""
    with revision_tree(args.baseline, work / "baseline") as (tree, rev):
        e = with_tree(env, tree)
        paths = [make_adapter(args.cache / f"1b-{i}", "1b", i).resolve() for i in range(2)]
        rows = []
        print(f"\nbaseline {args.baseline} ({rev}), 1b pair", flush=True)
        for method, space in (("linear", "delta"), ("ties", "delta"), ("linear", "factors")):
            cmd = [PY, "-m", "pipeline.cli"] + fuse_cmd(paths, work / "base-out", method, space)[len(FUSION):]
            r = measure(Row("1b", 2, f"fuse {method}", space, note=f"revision {rev}"), cmd, 1, e, cwd=tree)
            rows.append(r)
            print(f"  {method:8s} {space:8s} {r.wall:7.2f} s  CPU {statistics.median(r.cpu):6.2f} s", flush=True)
        return rows


def machine() -> dict:
    import numpy

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cores": cores, "cpu": cpu, "memory": mem, "python": platform.python_version(),
            "numpy": numpy.__version__, "system": f"{platform.system()} {platform.release()}"}


def fmt_s(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def table(rows: list[Row], floors: dict) -> list[str]:
    lines = ["| size | adapters | what | space | runs | median wall (s) | x I/O floor | CPU (s) | peak RSS (MB) | max error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = floors.get((r.size, r.n))
        ratio = f"{r.wall / floor:.2f}" if floor and r.what != "I/O floor" else ("1.00" if r.what == "I/O floor" else "")
        err = "" if r.error is None else f"{r.error:.3f}"
        lines.append(f"| {r.size} | {r.n} | {r.what} | {r.space} | {len(r.walls)} | {fmt_s(r.wall)} | {ratio} | "
                     f"{fmt_s(statistics.median(r.cpu))} | {r.peak_mb:.0f} | {err} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1B pair, one run, linear/slerp/ties/dare_ties and factor-space linear")
    ap.add_argument("--sizes", default="1b,8b", help="comma-separated: 1b, 8b")
    ap.add_argument("--counts", default="2,4", help="numbers of adapters for the 1B size (8B: the pair only unless --counts-8b)")
    ap.add_argument("--counts-8b", default="2")
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration (1B pair)")
    ap.add_argument("--runs-many", type=int, default=2, help="runs per configuration (1B, 4 adapters)")
    ap.add_argument("--runs-8b", type=int, default=2, help="runs per exact / factor-space configuration on 8B")
    ap.add_argument("--runs-8b-masking", type=int, default=1, help="runs per masking configuration on 8B")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--spaces", default="delta,factors")
    ap.add_argument("--no-check", action="store_true", help="skip the full-SVD optimality check")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation speed on the demo")
    ap.add_argument("--demo", type=Path, help="a built demo for the evaluation speed (default: params.yaml's, "
                    "else built into bench/.cache/demo)")
    ap.add_argument("--no-threads", action="store_true", help="skip the thread-count comparison")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiles of where the time goes")
    ap.add_argument("--baseline", metavar="REV", help="also time the code of git revision REV (1B pair: "
                    "linear, ties, factor-space linear; one run each), e.g. the commit before a change")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--out", type=Path, default=HERE / "results.md")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.counts, args.runs = "1b", "2", 1
        args.methods = "linear,slerp,ties,dare_ties"
        args.spaces = "delta,factors"
        args.no_eval = True
        args.no_threads = True
        args.no_profile = True
    methods = [m for m in args.methods.split(",") if m]
    spaces = [s for s in args.spaces.split(",") if s]
    sizes = [s for s in args.sizes.split(",") if s]
    for m in methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m}")
    env = run_env()

    info = machine()
    started = time.time()
    load0 = os.getloadavg()
    print(f"machine: {info['cores']} cores ({info['cpu']}), {info['memory']}, load {load0[0]:.1f}", flush=True)
    rows: list[Row] = []
    floors: dict = {}
    checks: list[tuple] = []
    work = Path(tempfile.mkdtemp(prefix="fusion-bench-"))
    try:
        for size in sizes:
            counts = [int(c) for c in (args.counts if size == "1b" else args.counts_8b).split(",") if c]
            for n in counts:
                paths = [make_adapter(args.cache / f"{size}-{i}", size, i) for i in range(n)]
                big = size != "1b"
                runs = args.runs_8b if big else (args.runs if n == 2 else args.runs_many)
                out = work / f"{size}-{n}"
                label = f"{size} x{n}"
                print(f"\n{label}: {n} adapters of {adapter_bytes(size) / 2**20:.0f} MiB "
                      f"({SIZES[size][0]}, rank 16, 7 modules x {SIZES[size][3]} layers)", flush=True)
                floor_py = work / "floor.py"
                floor_py.write_text(FLOOR)
                fl = measure(Row(size, n, "I/O floor"), [PY, str(floor_py), str(work / "floor.safetensors"),
                                                         *[str(p / "adapters.safetensors") for p in paths]],
                             max(runs, 3), env)
                floors[(size, n)] = fl.wall
                rows.append(fl)
                print(f"  I/O floor          {fl.wall:7.2f} s  {fl.peak_mb:6.0f} MB", flush=True)
                v = measure(Row(size, n, "validate"), [*FUSION, "validate", *map(str, paths)], max(runs, 3), env)
                rows.append(v)
                print(f"  validate           {v.wall:7.2f} s  {v.peak_mb:6.0f} MB", flush=True)
                for space in spaces:
                    for method in methods:
                        if space == "factors" and method == "concat":
                            continue
                        r = Row(size, n, f"fuse {method}", space)
                        k = args.runs_8b_masking if (big and method in MASKING and space == "delta") else runs
                        measure(r, fuse_cmd(paths, out, method, space), k, env)
                        rec = json.loads((out / "fusion.json").read_text())
                        r.error = rec["output"]["max_error"]
                        rows.append(r)
                        print(f"  {method:16s} {space:7s} {r.wall:7.2f} s  x{r.wall / fl.wall:5.2f}  "
                              f"{r.peak_mb:6.0f} MB  max error {r.error:.3f}", flush=True)
                        if (method in MASKING and space == "delta" and not args.no_check
                                and (n == 2 or not big)):
                            mods = check_modules(size) if n == 2 else check_modules(size)[:1]
                            res = optimality(paths, out, method, mods)
                            for c in res:
                                checks.append((size, n, method, c))
                                print(f"    {c['module']}: error {c['measured']:.4f} (recorded {c['recorded']:.4f}), "
                                      f"optimal {c['optimal']:.4f}, excess {100 * c['excess']:.3f}%", flush=True)
        threads = [] if args.no_threads else thread_rows(args, env, work)
        rows += threads
        if args.baseline:
            rows += baseline_rows(args, env, work)
        prof = None if args.no_profile else profiles(args, env)
        if not args.no_eval:
            print("\nevaluation speed on the demo", flush=True)
        ev = None if args.no_eval else eval_speed(args.demo)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - started
    load1 = os.getloadavg()
    report(args, info, rows, floors, checks, ev, elapsed, load0, load1, prof)


def _threads_note() -> str:
    return ("`fusion fuse` runs one module per worker thread (as many as the cores this process may use; "
            "`FUSION_THREADS` overrides) with OpenBLAS held to one thread inside the fuse.")


PROFILES = (("linear", "delta", 12), ("linear", "factors", 8), ("ties", "delta", 12))


def profiles(args, env: dict) -> dict:
    """Where the time goes on the 1B pair: the import of the command line (median of 5, wall and
    CPU), and bench/profile_fuse.py (the fuse loop on one thread under cProfile, CPU seconds)."""
    print("\nprofiles (1b pair)", flush=True)
    imp = measure(Row("1b", 2, "import pipeline.cli"), [PY, "-c", "import pipeline.cli"], 5, env)
    out = {"import_wall": imp.wall, "import_cpu": statistics.median(imp.cpu), "runs": []}
    print(f"  import pipeline.cli {imp.wall:.2f} s wall, {statistics.median(imp.cpu):.2f} s CPU", flush=True)
    for method, space, top in PROFILES:
        res = subprocess.run([PY, str(HERE / "profile_fuse.py"), "--size", "1b", "--method", method, "--space", space,
                              "--density", str(DENSITY), "--rank", str(RANK), "--top", str(top), "--cache", str(args.cache)],
                             capture_output=True, text=True, env=env, cwd=ROOT)
        text = "\n".join(line for line in res.stdout.splitlines() if line.strip())
        out["runs"].append((method, space, text if res.returncode == 0 else res.stderr[-1500:]))
        print("  " + (text.splitlines() or ["?"])[0], flush=True)
    return out


def report(args, info, rows, floors, checks, ev, elapsed, load0, load1, prof=None) -> None:
    cmd = "python bench/bench.py " + " ".join(a for a in sys.argv[1:])
    lines = ["# Fusion benchmark results", "",
             f"Command: `{cmd.strip()}` (from the repository root, with the project's venv python).", "",
             f"Machine: **{info['cores']} cores** ({info['cpu']}), {info['memory']} RAM, {info['system']}, "
             f"Python {info['python']}, numpy {info['numpy']}. Load average at start {load0[0]:.1f}, "
             f"at end {load1[0]:.1f} (other jobs shared the machine: wall times are noisy; the ratios to the "
             f"I/O floor of the same run are what count). Whole run: {elapsed / 60:.1f} min.", "",
             f"Adapters: rank 16 on q, k, v, o, gate, up, down of every layer, float32, mlx-lm layout, random "
             f"factors from fixed seeds (`bench/gen_adapters.py`); 1B = Llama-3.2-1B shapes (hidden 2048, "
             f"intermediate 8192, 16 layers, k/v out 512, {adapter_bytes('1b') / 2**20:.0f} MiB each), "
             f"8B = Llama-3.1-8B shapes (4096, 14336, 32 layers, k/v out 1024, "
             f"{adapter_bytes('8b') / 2**20:.0f} MiB each). Every fuse runs `fusion fuse ... --rank {RANK}` "
             f"(masking methods with `--density {DENSITY}`) as a separate process; median of the runs. "
             f"I/O floor: a process that reads the inputs and writes one output of the fused size with "
             f"`safetensors.numpy` and nothing else. Peak RSS: the child's maximum resident set size "
             f"(memory-mapped input pages it touched count). {_threads_note()}", ""]
    main_rows = [r for r in rows if not r.note]
    lines += table(main_rows, floors)
    trows = [r for r in rows if r.note and not r.note.startswith("revision")]
    brows = [r for r in rows if r.note.startswith("revision")]
    if brows:
        lines += ["", f"The same commands with the package of {brows[0].note} (`--baseline`; one run each, 1B pair):", "",
                  "| method | space | wall (s) | x I/O floor | CPU (s) | now: median wall (s) |", "|---|---|---|---|---|---|"]
        for r in brows:
            now = [x for x in main_rows if x.size == "1b" and x.n == 2 and x.what == r.what and x.space == r.space]
            lines.append(f"| {r.what.split()[1]} | {r.space} | {fmt_s(r.wall)} | {r.wall / floors[('1b', 2)]:.2f} | "
                         f"{fmt_s(statistics.median(r.cpu))} | {fmt_s(now[0].wall) if now else ''} |")
    if trows:
        lines += ["", "Threads, 1B pair (same commands, `FUSION_THREADS` / `FUSION_BLAS_THREADS` set):", "",
                  "| method | threads | runs | median wall (s) | x I/O floor | CPU (s) |", "|---|---|---|---|---|---|"]
        for r in trows:
            lines.append(f"| {r.what.split()[1]} | {r.note} | {len(r.walls)} | {fmt_s(r.wall)} | "
                         f"{r.wall / floors[('1b', 2)]:.2f} | {fmt_s(statistics.median(r.cpu))} |")
    if checks:
        lines += ["", "Re-factoring error against the optimum (full SVD of the dense merge from the slow "
                  "reference path, float64) on sampled modules:", "",
                  "| size | adapters | method | module | error | recorded | optimal | excess |",
                  "|---|---|---|---|---|---|---|---|"]
        for size, n, method, c in checks:
            lines.append(f"| {size} | {n} | {method} | {c['module']} | {c['measured']:.4f} | {c['recorded']:.4f} | "
                         f"{c['optimal']:.4f} | {100 * c['excess']:.3f}% |")
    if ev is not None:
        lines += ["", "Evaluation on the demo (`bench/eval_speed.py`):", ""]
        if "error" in ev:
            lines.append(f"not measured: {ev['error']}")
        else:
            lines.append(f"model {ev['model']}, adapter {ev['adapter']}, {ev['examples']} examples of "
                         f"task {ev['task']}, batch size {ev['batch_size']}, {ev['max_tokens']} new tokens at most: "
                         f"batched loss **{ev['loss_per_s']:.0f} examples/s**, cached-KV greedy generation "
                         f"**{ev['generate_per_s']:.1f} examples/s** ({ev['tokens_per_s']:.0f} tokens/s).")
    if prof:
        lines += ["", "## Where the time goes (1B pair)", "",
                  f"Importing the command line (`python -c 'import pipeline.cli'`: typer, rich, numpy, the package) "
                  f"takes {prof['import_wall']:.2f} s wall, {prof['import_cpu']:.2f} s CPU (median of 5), against an "
                  f"I/O floor of {floors.get(('1b', 2), float('nan')):.2f} s for the whole of reading and writing; "
                  f"`fusion validate` (that import, the headers and the NaN/Inf scan) is in the table above. "
                  f"The fuse loop of each method on one thread under cProfile (`bench/profile_fuse.py`, CPU seconds):"]
        for method, space, text in prof["runs"]:
            lines += ["", f"{method}, {space} space:", "", "```", text, "```"]
    lines += ["", *targets(main_rows, floors, checks)]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.write_text(text)
    print(f"wrote {args.out}")


def targets(rows, floors, checks) -> list[str]:
    out = ["## Targets", ""]
    exact = [r for r in rows if r.size == "1b" and r.n == 2 and r.what.startswith("fuse")
             and (r.space == "factors" or r.what.split()[1] in EXACT)]
    if exact:
        worst = max(exact, key=lambda r: r.wall / floors[(r.size, r.n)])
        ratio = worst.wall / floors[(worst.size, worst.n)]
        out.append(f"- exact delta-space and all factor-space methods, 1B pair, within 3x of the I/O floor: "
                   f"{'met' if ratio <= 3 else 'NOT met'} (worst: {worst.what} {worst.space}, {ratio:.2f}x)")
    for size, limit in (("1b", 60), ("8b", 600)):
        mk = [r for r in rows if r.size == size and r.n == 2 and r.space == "delta" and r.what.split()[-1] in MASKING]
        if mk:
            worst = max(mk, key=lambda r: r.wall)
            out.append(f"- masking methods, {size} pair, under {limit} s: "
                       f"{'met' if worst.wall < limit else 'NOT met'} (slowest: {worst.what}, {worst.wall:.1f} s)")
    if checks:
        worst = max(c["excess"] for *_, c in checks)
        out.append(f"- re-factoring error within 1% of the optimal truncated-SVD error on sampled modules: "
                   f"{'met' if worst <= 0.01 else 'NOT met'} (worst excess {100 * worst:.3f}%)")
    v8 = [r for r in rows if r.size == "8b" and r.n == 2 and r.what == "validate"]
    if v8:
        out.append(f"- validate on the 8B pair under 2 s: {'met' if v8[0].wall < 2 else 'NOT met'} "
                   f"({v8[0].wall:.2f} s median, including the NaN/Inf scan of all tensor data)")
    mem = [r for r in rows if r.size == "8b" and r.n == 2 and r.what.startswith("fuse")]
    if mem:
        inputs = 2 * adapter_bytes("8b") / 2**20
        dense = max(o * i for i, o in module_shapes("8b").values()) * 4 / 2**20
        worst = max(mem, key=lambda r: r.peak_mb)
        base = min(r.peak_mb for r in rows if r.size == "8b" and r.what == "validate")
        extra = (worst.peak_mb - base - inputs - inputs / 2) / dense
        out.append(f"- peak memory on the 8B pair: {worst.peak_mb:.0f} MB at most ({worst.what} {worst.space}) = "
                   f"interpreter and libraries ({base:.0f} MB, the peak of `fusion validate`) + inputs "
                   f"{inputs:.0f} MB + output {inputs / 2:.0f} MB + {extra:.1f} x the largest dense module "
                   f"({dense:.0f} MB)")
    return out


if __name__ == "__main__":
    main()
