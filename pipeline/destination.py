"""Where the tool may write: the rules every output directory is checked against before any heavy work.

An output directory ``out`` is accepted when all of these hold, else one FusionError says which failed:
- it is not an input, not inside an input and does not contain an input (symlinks resolved);
- it is not the current directory or one of its parents;
- it does not exist, or is an empty directory, or is a directory this tool wrote: one holding its
  *record* file (``fusion.json`` of a fused adapter, ``conversion.json`` of a converted one; the
  stages' output directories hold theirs: ``baselines.json`` of the plans, ``best.json`` of a search,
  ``demo.json`` of the demo; in the real-model project ``model.json`` of its models and
  ``tasks.json`` of its data sets) that parses as this tool's record. Anything else (a file, a folder of someone's documents) is
  never replaced;
- its parent is a directory (or can be created) that this process can write to, probed by creating
  and removing a temporary directory there.
Temporary directories of runs that were killed (``.NAME.tmp-*`` beside ``out``, holding a
``.partial`` file with the pid of a process that is gone) are removed by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from pipeline.errors import FusionError

PARTIAL = ".partial"   # inside a temporary output directory: the pid of the process writing it


def _is_under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def is_record(path: Path, keys: Iterable[str]) -> bool:
    """Whether ``path`` is a JSON object holding every key of ``keys`` (a record this tool writes)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


# The records by which a directory is recognised as written by this tool: file name -> keys it holds.
RECORDS: dict[str, tuple[str, ...]] = {
    "fusion.json": ("method", "inputs", "output", "versions"),
    "conversion.json": ("converted_from", "layout", "written_by"),
    # the stages' output directories
    "baselines.json": ("base_model", "base", "eval", "tasks", "adapters"),   # validate: the plans
    "best.json": ("enabled",),                                               # search
    "demo.json": ("demo", "written_by"),                                     # demo
    "model.json": ("package", "version", "dtypes", "written_by"),            # real_model
    "tasks.json": ("tasks", "seed", "sizes", "written_by"),                  # real_tasks
}


def written_by_us(path: Path, record: str) -> bool:
    """Whether the directory ``path`` holds the record ``record`` (one of ``RECORDS``)."""
    return is_record(path / record, RECORDS[record])


def check_destination(out: str | Path, inputs: Iterable[str | Path] = (), *, record: str,
                      what: str = "output") -> Path:
    """Check ``out`` against the rules above (``record``: the file that proves a previous output of the
    same kind); return it resolved. Raises FusionError naming ``out`` and the rule it breaks."""
    given = Path(out)
    o = given.resolve()
    for p in inputs:
        r = Path(p).resolve()
        if o == r:
            raise FusionError(f"{given}: the {what} directory is one of the inputs ({p})")
        if _is_under(o, r):
            raise FusionError(f"{given}: the {what} directory is inside the input {p}; "
                              "nothing is ever written into an input")
        if _is_under(r, o):
            raise FusionError(f"{given}: the {what} directory contains the input {p}; "
                              "replacing it would delete the input")
    if _is_under(Path.cwd().resolve(), o):
        raise FusionError(f"{given}: the {what} directory is the current directory or one of its parents")
    if o.exists() or o.is_symlink():
        if not o.is_dir():
            raise FusionError(f"{given}: exists and is not a directory; it is never replaced "
                              f"(choose another {what} directory)")
        if any(o.iterdir()) and not written_by_us(o, record):
            raise FusionError(f"{given}: a non-empty directory this tool did not write (no {record}); "
                              f"it is never replaced: remove it yourself or choose another {what} directory")
    _probe_parent(given, o.parent)
    clean_leftovers(o)
    return o


def _probe_parent(given: Path, parent: Path) -> None:
    """Create ``parent`` if needed and check that a temporary directory can be made in it."""
    for p in [parent, *parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise FusionError(f"{given}: cannot be created: {p} is a file, not a directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise FusionError(f"{given}: cannot write in {parent} ({e.strerror or e})") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out: Path) -> list[Path]:
    """Remove temporary directories of killed runs writing ``out`` (their writer's pid is gone)."""
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    for tmp in parent.glob(f".{out.name}.tmp-*"):
        marker = tmp / PARTIAL
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue                         # not ours, or still being set up: leave it
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def start_partial(tmp: Path) -> None:
    """Mark ``tmp`` as a temporary output of this process (removed with it on success)."""
    (tmp / PARTIAL).write_text(f"{os.getpid()}\n")


def finish_partial(tmp: Path) -> None:
    (tmp / PARTIAL).unlink(missing_ok=True)


def safe_name(name: str, what: str, where: str = "params.yaml") -> str:
    """``name`` when it is a safe single path component (letters, digits, ``._-``, not starting with a
    dot or dash), else a FusionError: fusion and adapter names become directory names."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name) or len(name) > 128:
        raise FusionError(f"{where}: {what} name {name!r} is not a safe directory name "
                          "(use letters, digits, '_', '.', '-'; no '/', no leading '.' or '-')")
    return name

