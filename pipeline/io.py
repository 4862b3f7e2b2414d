"""File writes: every output of the package is written here, atomically.

- ``atomic_dir(out)``: build a directory in a hidden sibling, then rename it over ``out``.
- ``atomic_file(path)`` / ``write_file(path, content)``: one file through a hidden sibling and a rename.
- ``json_text(obj)`` / ``write_json(path, obj)``: indent 2, sorted keys, a trailing newline, so the
  same object gives the same bytes on every run.

A rename within one directory is atomic, so a reader (or an interrupted run) sees the old version or
the new one, never half of it. Temporary names start with a dot and are removed on failure; files
get the permissions ``open`` gives (the umask), directories 0755.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_serial = itertools.count()  # unique temporary names within one process, across threads


class atomic_dir:
    """``with atomic_dir(out) as tmp:`` write into ``tmp``; on success it replaces ``out``.

    The temporary directory is a hidden sibling of ``out``, so the final rename stays on one file
    system; an interrupted or failed write leaves ``out`` as it was (absent or the old version).
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def __enter__(self) -> Path:
        from pipeline.destination import clean_leftovers, start_partial

        self.out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        start_partial(self.tmp)   # a killed run's directory is recognised, and removed, by the next
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        from pipeline.destination import finish_partial

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(self.out)  # a write that failed (a full disk): name the output
            return False
        finish_partial(self.tmp)
        self.tmp.chmod(0o755)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return False


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """``with atomic_file(path) as tmp:`` write the file ``tmp``; on success it replaces ``path``
    (the folder is created). A link at ``path`` is replaced, never written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_serial)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)  # a write that failed (a full disk): name the output
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: str | Path, content: str | bytes) -> Path:
    """Write ``content`` (text is UTF-8) to ``path`` atomically; return ``path``."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    with atomic_file(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
    return Path(path)


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Copy the bytes of ``src`` to ``dst`` atomically; return ``dst``."""
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def json_text(obj, *, sort_keys: bool = True, ensure_ascii: bool = True, allow_nan: bool = True) -> str:
    """``obj`` as JSON indented by 2 with a trailing newline (sorted keys unless told otherwise)."""
    return json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
                      allow_nan=allow_nan) + "\n"


def write_json(path: str | Path, obj) -> Path:
    """``json_text(obj)`` written atomically to ``path``."""
    return write_file(path, json_text(obj))


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object per line (UTF-8 kept as is, ``\\n`` line ends), written atomically."""
    return write_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to a file another program owns (a CI job summary): one write call, not atomic."""
    with open(path, "a") as fh:
        fh.write(text)
