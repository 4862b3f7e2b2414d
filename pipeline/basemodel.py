"""The base model of a project: a local directory or a hub id, and what identifies its bytes.

``identity(base)`` is the record the validate stage puts in every scoring plan (``base`` in
``NAME.eval.json`` and ``baselines.json``, and ``base.json`` beside them), so a plan's bytes change when
the base model's do and DVC re-runs what scores on it:
- a local directory: ``{"path", "files": {name: sha256}}``, every file under it;
- a hub id (``org/name``): ``{"id", "revision", "files"}``, the commit that the Hugging Face cache
  resolves it to (downloading it once with a network, as mlx-lm does) and that snapshot's files
  (their blob names: the hub's content hashes).
``model_path(base, record)`` is the directory the scoring stages load: the local directory after
checking that its files still hash as recorded, or the snapshot of the recorded revision, so a score
is always of the model the plan names.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import FusionError


def is_hub_id(base: str) -> bool:
    """Whether ``base`` names a hub repository (``org/name``) rather than a local directory (the
    rule ``pipeline.evaluate.load_model`` uses: anything path-like or existing is local)."""
    text = str(base)
    return not (Path(text).exists() or text.startswith(("/", "./", "../", "~")) or text.count("/") != 1)


def resolve_hub(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (None: the one the hub's main
    branch points at, as mlx-lm loads it), fetched once into the Hugging Face cache when missing;
    its name is the commit."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as e:  # not cached offline, not found, no network, ...
        at = f" at revision {revision}" if revision else ""
        raise FusionError(f"base_model {repo_id}{at}: not a local directory, and not found on the hub "
                          f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None


def _files(root: Path, hub: bool) -> dict[str, str]:
    from pipeline.formats import sha256_file

    files = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        # a hub snapshot's files are links to blobs named by their content hash (sha256 for weights)
        files[rel.as_posix()] = (Path(os.readlink(f)).name if hub and f.is_symlink() else sha256_file(f))
    return files


def identity(base: str) -> dict:
    """The record that identifies the base model's bytes (see the module docstring); FusionError when
    a local directory is missing or holds no config.json."""
    if is_hub_id(base):
        snapshot = resolve_hub(base)
        return {"id": base, "revision": snapshot.name, "files": _files(snapshot, hub=True)}
    p = Path(base)
    if not (p / "config.json").is_file():
        raise FusionError(f"base_model {base}: not a model directory (no config.json)")
    return {"path": base, "files": _files(p, hub=False)}


def model_path(base: str, record: dict) -> str:
    """The directory to load for the plan's base model ``base`` and its ``record`` (``identity``):
    FusionError when the local directory's files changed since the plan was made."""
    if "revision" in record:
        return str(resolve_hub(record["id"], record["revision"]))
    if "files" in record:
        now = identity(base)["files"]
        changed = sorted(n for n in set(now) | set(record["files"]) if now.get(n) != record["files"].get(n))
        if changed:
            raise FusionError(f"base_model {base}: {changed[0]} changed since the validate stage recorded it"
                              f"{f' ({len(changed)} files)' if len(changed) > 1 else ''}: run dvc repro "
                              "(the plans must be made again before scoring)")
    return str(base)


def describe(record: dict) -> str:
    """One line for a report: the hub id at its revision, or the local directory."""
    if "revision" in record:
        return f"{record['id']} at revision {record['revision']}"
    return str(record.get("path") or record.get("id"))
