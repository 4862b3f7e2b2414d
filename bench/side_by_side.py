"""One `fusion fuse` of the 1B (or 8B) pair by this checkout and by another git revision, and the I/O
floor, in turn, N rounds: medians measured side by side on a shared machine.

    python bench/side_by_side.py --rev 93333fb                       # linear, 11 rounds
    python bench/side_by_side.py --rev 93333fb --rounds 15 -- --method ties --space core --density 0.5
    python bench/side_by_side.py --rev HEAD~3 --size 8b --no-bytecode-cache

Arguments after ``--`` go to `fusion fuse` (default ``--method linear``; ``--rank 16`` is always
given). The revision is checked out with ``git worktree`` into a temporary directory and removed
after. Every command runs with Python's bytecode cache on (as ``bench.bench.run_env``), unless
``--no-bytecode-cache``, which also runs the revision once more without it, as this machine's
environment (``PYTHONDONTWRITEBYTECODE``) would.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.bench import FLOOR, PY, RANK, ROOT, revision_tree, run_env, run_measured, with_tree  # noqa: E402
from bench.gen_adapters import make_adapter  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else ["--method", "linear"]
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the git revision to compare with")
    ap.add_argument("--size", default="1b", help="1b or 8b")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="also time the revision with PYTHONDONTWRITEBYTECODE=1")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    args = ap.parse_args(argv)
    paths = [make_adapter(args.cache / f"{args.size}-{i}", args.size, i) for i in range(2)]
    with tempfile.TemporaryDirectory(prefix="fusion-side-") as tmp, \
            revision_tree(args.rev, Path(tmp) / "rev") as (tree, rev):
        work = Path(tmp)
        env = run_env()
        old = with_tree(env, tree)
        plain = work / "rev-plain"  # the revision's sources with no compiled modules beside them
        shutil.copytree(tree / "pipeline", plain / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([PY, "-m", "compileall", "-q", str(tree / "pipeline")], env=old, check=True,
                       stdout=subprocess.DEVNULL)
        variants = {"this checkout": (env, ROOT), f"{args.rev} ({rev})": (old, tree)}
        if args.no_bytecode_cache:
            variants[f"{args.rev}, no bytecode cache"] = (dict(with_tree(env, plain), PYTHONDONTWRITEBYTECODE="1"),
                                                          plain)
        out = work / "out"
        fuse = [PY, "-m", "pipeline.cli", "fuse", *map(str, paths), "--out", str(out), "--rank", str(RANK), *extra]
        floor_py = work / "floor.py"
        floor_py.write_text(FLOOR)
        floor = [PY, str(floor_py), str(work / "floor.safetensors"), *[str(p / "adapters.safetensors") for p in paths]]
        walls: dict[str, list[float]] = {k: [] for k in [*variants, "I/O floor"]}
        for _ in range(args.rounds):
            for name, (e, cwd) in variants.items():
                shutil.rmtree(out, ignore_errors=True)
                walls[name].append(run_measured(fuse, e, cwd)[0])
            walls["I/O floor"].append(run_measured(floor, env)[0])
    f = statistics.median(walls["I/O floor"])
    print(f"{args.size} pair, fusion fuse {' '.join(extra)} --rank {RANK}, {args.rounds} rounds:")
    for name, w in walls.items():
        print(f"  {name:32s} median {statistics.median(w):.3f} s  min {min(w):.3f} s  "
              f"x{statistics.median(w) / f:.2f} the floor")


if __name__ == "__main__":
    main()
