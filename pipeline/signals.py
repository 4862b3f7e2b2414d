"""Quality signals of a fusion that need no evaluation data, computed from the factors.

A source is ``(A (r, in), B (out, r))`` with the scale folded into B (delta ``B @ A``) or None
(delta 0), as in :mod:`pipeline.geometry`; the fused module is the same kind of pair. Nothing here
forms a dense out x in matrix: every figure comes from QR of the factors and small r x r cores.

Per module (:func:`module_signals`):

- ``column_overlap`` / ``row_overlap`` (pairwise, sources): the principal angles between the
  column spaces of the two deltas (spans of the B's) and between their row spaces (spans of the
  A's); the overlap is the mean squared cosine of those angles, ``|Q_1^T Q_2|_F^2 / min(k_1, k_2)``
  (0 = orthogonal subspaces, 1 = one contains the other).
- ``interference`` (sources): TSV-Merge's singular task interference (arXiv 2412.00081),
  ``|(U^T U - I) S (V^T V - I)|_1`` over the concatenated singular vectors ``U = [U_1 .. U_K]``,
  ``V = [V_1 .. V_K]`` and ``S = diag(S_1 .. S_K)`` of the source deltas, divided by ``sum(S)``
  so that it does not grow with the deltas' size (0 when the sources' singular vectors are
  mutually orthogonal).
- ``kept`` (per source, fusion): how much of source i's delta the fused delta carries along it,
  ``<dW_i, dW_F> / |dW_i|^2`` (1: all of it, 0.5: half, 0 or below: cancelled).
- ``alignment`` (per source, fusion): the subspace alignment ratio of Iso-C (arXiv 2502.04959),
  ``|U_k U_k^T dW_i|_F / |dW_i|_F`` where ``U_k`` are the fewest left singular vectors of the
  fused delta that hold ``ALIGNMENT_ENERGY`` of its energy (1: the source's delta lies in the
  fusion's dominant output directions).
- ``energy_kept`` (fusion): the share of the fused delta's energy the written factors keep after
  re-factoring to the output rank, ``1 - error^2`` (the truncated SVD is an orthogonal projection).

:func:`summarize` pools modules into whole-fusion figures (``kept`` and ``alignment`` from sums of
squares over modules, i.e. over the whole adapter), and :func:`warnings` says in words what a user
should look at (a source the fusion cancels, two sources writing the same directions with opposite
signs). Everything returned is plain floats, lists and dicts (JSON-ready).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

ALIGNMENT_ENERGY = 0.95  # the fused delta's dominant subspace holds this share of its energy
RANK_TOL = 1e-9          # singular values below RANK_TOL * the largest are not directions
KEPT_WARNING = 0.25      # a source the fusion keeps less of than this is flagged
COSINE_WARNING = -0.5    # two sources whose deltas have a cosine below this are flagged


def _f64(source):
    return None if source is None else tuple(np.asarray(x, np.float64) for x in source)


def basis(m: np.ndarray) -> np.ndarray:
    """Orthonormal basis (n, k) of the column space of ``m`` (n, r): QR, then the SVD of the r x r
    triangle so that numerically dependent columns are dropped."""
    if m.shape[1] == 0:
        return m
    q, r = np.linalg.qr(m)
    u, s, _ = np.linalg.svd(r)
    if not s.size or s[0] == 0:
        return q[:, :0]
    return q @ u[:, : int(np.sum(s > RANK_TOL * s[0]))]


def lowrank_svd(source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``(U (out, k), s (k,), V (in, k))`` of ``B @ A`` from the factors (QR of B and of
    A^T, SVD of the r x r core), without the negligible singular values."""
    a, b = _f64(source)
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    keep = int(np.sum(s > RANK_TOL * s[0])) if s.size and s[0] > 0 else 0
    return qb @ u[:, :keep], s[:keep], qa @ vt[:keep].T


def overlap(q1: np.ndarray, q2: np.ndarray) -> float | None:
    """Mean squared cosine of the principal angles between two subspaces (orthonormal bases)."""
    k = min(q1.shape[1], q2.shape[1])
    if k == 0:
        return None
    return float(np.clip(np.sum((q1.T @ q2) ** 2) / k, 0.0, 1.0))


def principal_cosines(q1: np.ndarray, q2: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between two subspaces, largest first."""
    if min(q1.shape[1], q2.shape[1]) == 0:
        return np.zeros(0)
    return np.clip(np.linalg.svd(q1.T @ q2, compute_uv=False), 0.0, 1.0)


def interference(svds: Sequence) -> float | None:
    """TSV-Merge's singular task interference of the (U, s, V) of the present sources, per unit of
    singular value (``None`` with fewer than two sources)."""
    svds = [x for x in svds if x is not None and x[1].size]
    if len(svds) < 2:
        return None
    u = np.concatenate([x[0] for x in svds], axis=1)
    s = np.concatenate([x[1] for x in svds])
    v = np.concatenate([x[2] for x in svds], axis=1)
    eye = np.eye(s.size)
    sti = np.abs((u.T @ u - eye) @ (s[:, None] * (v.T @ v - eye))).sum()
    return float(sti / s.sum())


def _inner(s1, s2) -> float:
    return float(np.sum((s1[1].T @ s2[1]) * (s1[0] @ s2[0].T)))


def module_signals(sources: Sequence, fused=None, error: float | None = None) -> dict:
    """The signals of one module (see the module docstring); ``fused`` is the written ``(A, B)``
    (None: only the sources' signals), ``error`` its re-factoring error."""
    srcs = [_f64(s) for s in sources]
    n = len(srcs)
    cols = [None if s is None else basis(s[1]) for s in srcs]
    rows = [None if s is None else basis(s[0].T) for s in srcs]
    col_ov = [[None] * n for _ in range(n)]
    row_ov = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            if srcs[i] is None or srcs[j] is None:
                continue
            col_ov[i][j] = col_ov[j][i] = overlap(cols[i], cols[j])
            row_ov[i][j] = row_ov[j][i] = overlap(rows[i], rows[j])
    svds = [None if s is None else lowrank_svd(s) for s in srcs]
    out = {"column_overlap": col_ov, "row_overlap": row_ov, "interference": interference(svds),
           "source_energy": [0.0 if x is None else float(np.sum(x[1] ** 2)) for x in svds]}
    if fused is None:
        return out
    f = _f64(fused)
    uf, sf, _ = lowrank_svd(f)
    energy = np.cumsum(sf ** 2)
    k = int(np.searchsorted(energy, ALIGNMENT_ENERGY * energy[-1]) + 1) if sf.size else 0
    top = uf[:, :k]
    kept_num, aligned = [], []
    for s, e in zip(srcs, out["source_energy"]):
        if s is None or e == 0:
            kept_num.append(None)
            aligned.append(None)
            continue
        kept_num.append(_inner(s, f))
        p = top.T @ s[1]  # (k, r): the source's output directions in the fusion's top subspace
        aligned.append(float(max(np.sum((p.T @ p) * (s[0] @ s[0].T)), 0.0)))
    out.update({
        "kept": [None if x is None else x / e for x, e in zip(kept_num, out["source_energy"])],
        "alignment": [None if x is None else math.sqrt(min(x / e, 1.0))
                      for x, e in zip(aligned, out["source_energy"])],
        "kept_inner": kept_num, "aligned_energy": aligned, "alignment_rank": k,
        "energy_kept": None if error is None else float(max(0.0, 1.0 - error ** 2)),
    })
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(per_module: dict[str, dict], names: Sequence[str]) -> dict:
    """Whole-fusion signals from :func:`module_signals` results (extra keys ignored).

    ``adapters``: per source, ``kept`` (the whole adapter's ``<dW_i, dW_F> / |dW_i|^2``, summed over
    modules) and ``alignment`` (pooled the same way); ``pairs``: per pair, the mean column and row
    overlap over the modules both have; ``interference``: mean over modules; ``energy_kept``: the
    pooled share kept by re-factoring (weighted by the modules' energy); and the headline
    figures ``min_kept``, ``min_alignment``, ``mean_overlap`` (column and row overlaps of all pairs)."""
    mods = list(per_module.values())
    n = len(names)
    adapters = []
    for i, name in enumerate(names):
        e = sum(m["source_energy"][i] for m in mods)
        kept = [m["kept_inner"][i] for m in mods if m.get("kept_inner") and m["kept_inner"][i] is not None]
        al = [m["aligned_energy"][i] for m in mods
              if m.get("aligned_energy") and m["aligned_energy"][i] is not None]
        adapters.append({"name": name,
                         "kept": sum(kept) / e if kept and e > 0 else None,
                         "alignment": math.sqrt(min(sum(al) / e, 1.0)) if al and e > 0 else None})
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            pairs.append({"adapters": [names[i], names[j]],
                          "column_overlap": _mean(m["column_overlap"][i][j] for m in mods),
                          "row_overlap": _mean(m["row_overlap"][i][j] for m in mods)})
    kept_energy = [(m["energy_kept"], sum(m["source_energy"])) for m in mods if m.get("energy_kept") is not None]
    total = sum(w for _, w in kept_energy)
    overlaps = [p[k] for p in pairs for k in ("column_overlap", "row_overlap") if p[k] is not None]
    kept = [a["kept"] for a in adapters if a["kept"] is not None]
    aligned = [a["alignment"] for a in adapters if a["alignment"] is not None]
    return {
        "adapters": adapters,
        "pairs": pairs,
        "interference": _mean(m["interference"] for m in mods),
        "energy_kept": sum(x * w for x, w in kept_energy) / total if total > 0 else None,
        "min_kept": min(kept) if kept else None,
        "min_alignment": min(aligned) if aligned else None,
        "mean_overlap": float(np.mean(overlaps)) if overlaps else None,
    }


def warnings(summary: dict, geometry_summary: dict | None = None) -> list[str]:
    """What a user should look at before evaluating, in words (empty when nothing stands out)."""
    out = []
    for a in summary.get("adapters") or []:
        if a.get("kept") is not None and a["kept"] < KEPT_WARNING:
            out.append(f"the fusion keeps {a['kept']:.2f} of adapter {a['name']!r}'s delta "
                       f"(below {KEPT_WARNING}): its behaviour is largely cancelled")
    for p in (geometry_summary or {}).get("pairs") or []:
        mean = (p.get("cosine") or {}).get("mean")
        if mean is not None and mean < COSINE_WARNING:
            x, y = p["adapters"]
            out.append(f"adapters {x!r} and {y!r} write the same directions with opposite signs "
                       f"(mean cosine {mean:.2f})")
    return out
