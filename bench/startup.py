"""Start-up time of the ``fusion`` command, side by side with ``python -c "import typer"``.

Each command runs as a fresh process, the commands interleaved round after round (the order
rotating), so that a busy machine slows all of them alike; prints the median wall time of each and
the ratio of ``fusion --help`` to ``import typer``. Also shown: ``import typer.rich_utils`` (the
part of typer that draws the help with rich; ``fusion --help`` cannot start faster than that), the
same help drawn plain by click (``TYPER_USE_RICH=0``), importing the command line, and
``fusion validate`` on two tiny adapters.

    .venv/bin/python bench/startup.py                 # 15 runs of each
    .venv/bin/python bench/startup.py --runs 31 --baseline main   # and the same with revision main
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
FUSION = str(Path(PY).parent / "fusion")
sys.path.insert(0, str(ROOT))

from bench.bench import revision_tree  # noqa: E402


def tiny_adapters(where: Path) -> list[str]:
    """Two small mlx-lm adapters (2 layers x 2 modules, rank 4) for ``fusion validate``."""
    import numpy as np

    from pipeline.writers import mlx_config, write_mlx

    paths = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        modules = {f"model.layers.{i}.self_attn.{m}": (rng.normal(size=(4, 64)).astype(np.float32),
                                                        rng.normal(size=(64, 4)).astype(np.float32))
                   for i in range(2) for m in ("q_proj", "v_proj")}
        out = where / f"adapter{seed}"
        out.mkdir()
        write_mlx(out, modules, mlx_config(4, 2.0, ["self_attn.q_proj", "self_attn.v_proj"], 2))
        paths.append(str(out))
    return paths


def commands(adapters: list[str], baseline: Path | None, rev: str) -> dict[str, tuple[list[str], dict]]:
    env = dict(os.environ)
    cmds = {
        'python -c "import typer"': ([PY, "-c", "import typer"], env),
        "import typer.rich_utils": ([PY, "-c", "import typer, typer.rich_utils"], env),
        'python -c "import pipeline.cli"': ([PY, "-c", "import pipeline.cli"], env),
        "fusion --help": ([FUSION, "--help"], env),
        "fusion --help, plain (TYPER_USE_RICH=0)": ([FUSION, "--help"], dict(env, TYPER_USE_RICH="0")),
        "fusion validate (2 tiny adapters)": ([FUSION, "validate", *adapters], env),
    }
    if baseline is not None:
        old = dict(env, PYTHONPATH=str(baseline) + os.pathsep + env.get("PYTHONPATH", ""))
        here = [PY, "-m", "pipeline.cli"]
        cmds["python -m pipeline.cli --help"] = (here + ["--help"], env)
        cmds[f"python -m pipeline.cli --help ({rev})"] = (here + ["--help"], old)
        cmds["python -m pipeline.cli validate"] = (here + ["validate", *adapters], env)
        cmds[f"python -m pipeline.cli validate ({rev})"] = (here + ["validate", *adapters], old)
    return cmds


def measure(cmds: dict[str, tuple[list[str], dict]], runs: int, cwd: Path) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cmds}
    names = list(cmds)
    for k in range(runs):
        for name in names[k % len(names):] + names[:k % len(names)]:
            cmd, env = cmds[name]
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="runs of each command (default 15)")
    ap.add_argument("--baseline", metavar="REV", help="also time the command line of git revision REV")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fusion-startup-") as tmp:
        work = Path(tmp)
        adapters = tiny_adapters(work)
        baseline = revision_tree(args.baseline, work / "baseline") if args.baseline else nullcontext((None, ""))
        with baseline as (tree, rev):
            times = measure(commands(adapters, tree, rev), args.runs, work)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    print(f"median wall time of {args.runs} interleaved runs each, {cores} cores, load {os.getloadavg()[0]:.1f}:")
    width = max(map(len, times))
    for name, ts in times.items():
        print(f"  {name:<{width}}  {statistics.median(ts):.3f} s")
    typer_s = statistics.median(times['python -c "import typer"'])
    ratio = statistics.median(times["fusion --help"]) / typer_s
    floor = statistics.median(times["import typer.rich_utils"]) / typer_s
    plain = statistics.median(times["fusion --help, plain (TYPER_USE_RICH=0)"]) / typer_s
    print(f"fusion --help / import typer: {ratio:.2f}x (importing typer's rich help alone: {floor:.2f}x; "
          f"plain help: {plain:.2f}x)")


if __name__ == "__main__":
    main()
