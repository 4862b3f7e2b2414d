"""The random control of a fusion: the same fusion with each source replaced by a random adapter.

A source's random counterpart has the same modules and, per module, the same rank and the same
Frobenius norm of its delta ``s B A``, with directions drawn at random (Gaussian factors, seeded
by the fusion's ``seed`` and the adapter's name, so every run draws the same ones). Fusing those
with the fusion's own method and settings, and scoring the result like the fusion, shows how much
of the fusion's score comes from the sources' learned directions at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline import geometry
from pipeline.formats import read_adapter
from pipeline.writers import mlx_config, pad_rank, write_mlx


def control_rng(seed: int, adapter: str) -> np.random.Generator:
    """The random stream of one source's counterpart: from ``seed`` and the adapter's name."""
    digest = hashlib.sha256(adapter.encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def random_factors(source: str | Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module: (A (r, in), B (out, r))}`` (scale folded into B) with random directions and the
    source's per-module rank and delta norm."""
    a = read_adapter(source)
    out = {}
    for name in sorted(a.modules):
        fa, fb, s = a.factors(name)
        target = geometry.lowrank_norm((fa, fb * np.float32(s)))
        ra = rng.standard_normal(fa.shape)
        rb = rng.standard_normal(fb.shape)
        norm = geometry.lowrank_norm((ra, rb))
        rb = rb * (target / norm if norm > 0 else 0.0)
        out[name] = (ra.astype(np.float32), rb.astype(np.float32))
    return out


def write_random_adapter(source: str | Path, out: str | Path, rng: np.random.Generator) -> Path:
    """Write the random counterpart of ``source`` as an mlx-lm adapter in the directory ``out``."""
    src = read_adapter(source)
    modules = random_factors(source, rng)
    rank = max(a.shape[0] for a, _ in modules.values())
    modules = {k: pad_rank(a, b, rank) for k, (a, b) in modules.items()}
    keys = sorted({src.modules[k].key for k in modules})
    extra = {"model": src.base_model} if src.base_model else {}
    num_layers = src.num_layers if src.num_layers is not None else -1
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_mlx(out, modules, mlx_config(rank, 1.0, keys, num_layers, extra))
    return out
