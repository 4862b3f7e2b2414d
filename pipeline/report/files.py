"""How the report's files reach the disk: JSON text in input order, and atomic writes."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.io import json_text, write_file


def to_json(obj) -> str:
    """Indented JSON, non-ASCII kept, NaN and infinities (not JSON) as null."""
    return json_text(_finite(obj), sort_keys=False, ensure_ascii=False, allow_nan=False)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_atomic(path: Path, content: bytes | str) -> Path:
    """Write through a temporary file and rename (``pipeline.io``), so a reader never sees half a file."""
    return write_file(path, content)
