"""Quality signals of a fusion that need no evaluation data, computed from the factors.

A source is ``(A (r, in), B (out, r))`` with the scale folded into B (delta ``B @ A``) or None
(delta 0), as in :mod:`pipeline.geometry`; the fused module is the same kind of pair. Nothing here
forms a dense out x in matrix: every figure comes from the Gram matrices of the stacked factors
(:class:`pipeline.geometry.JointGrams`, the one product that grows with the module; none at all
where the method hands over its own Gram matrices of the sources and the fused factors'
coordinates in them, :meth:`~pipeline.geometry.JointGrams.of`) and r x r arithmetic on their blocks: each delta's thin SVD ``U = B xb``, ``V = A^T xa`` by
:func:`factor_svd`, and products of singular vectors as ``xb_i^T (B_i^T B_j) xb_j``.

Per module (:func:`module_signals`):

- ``column_overlap`` / ``row_overlap`` (pairwise, sources): the principal angles between the
  column spaces of the two deltas (spans of their left singular vectors, the B's when the A's
  have full rank) and between their row spaces (right singular vectors); the overlap is the mean squared cosine of those angles, ``|Q_1^T Q_2|_F^2 / min(k_1, k_2)``
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
  fused delta that hold ``ALIGNMENT_ENERGY`` of its energy, with every singular value tied with the
  last of them (``TIE_TOL``; a flat spectrum, as Iso-C writes, has no smaller dominant subspace)
  (1: the source's delta lies in the fusion's dominant output directions).
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

from pipeline import geometry

ALIGNMENT_ENERGY = 0.95  # the fused delta's dominant subspace holds this share of its energy
RANK_TOL = 1e-6          # singular values below RANK_TOL * the largest are not directions
TIE_TOL = 1e-6           # singular values this close (relatively) to the k-th are tied with it
ORTHO_TOL = 1e-11        # a Cholesky basis is used when orthonormal to this (else eigh)
KEPT_WARNING = 0.25      # a source the fusion keeps less of than this is flagged
COSINE_WARNING = -0.5    # two sources whose deltas have a cosine below this are flagged


def _half(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a factor ``X`` (n, r) known only by its Gram matrix ``g = X^T X``: ``(F (r, k),
    R (k, r))`` with ``Q = X F`` an orthonormal basis of its column space and ``X = Q R``
    (up to the directions dropped as round-off).

    Fast path: the Cholesky factor ``g = L L^T`` gives ``F = L^-T``, ``R = L^T``, kept when
    ``Q^T Q = F^T g F`` is the identity to ``ORTHO_TOL`` (a well-conditioned factor, as trained
    LoRA factors are). Otherwise ``g`` is scaled to unit diagonal (so columns of very different
    norms do not hide one another) and ``eigh`` decides the directions: an eigenvalue counts when
    its square root is above ``RANK_TOL`` times the largest (a Gram matrix carries round-off of
    about 1e-16 of its largest eigenvalue, so this resolves singular values a hundred times below
    the threshold)."""
    r = g.shape[0]
    try:
        low = np.linalg.cholesky(g)
        f = np.linalg.inv(low).T
        check = f.T @ g @ f
        check.flat[:: r + 1] -= 1.0
        if np.abs(check).max() <= ORTHO_TOL:
            return f, low.T
    except np.linalg.LinAlgError:
        pass
    d = np.sqrt(np.clip(np.diag(g), 0.0, None))
    live = d > 0
    if not live.any():
        return np.zeros((r, 0)), np.zeros((0, r))
    dl = d[live]
    lam, w = np.linalg.eigh(g[np.ix_(live, live)] / np.outer(dl, dl))
    keep = lam > (RANK_TOL ** 2) * lam[-1]
    lam, w = lam[keep][::-1], w[:, keep][:, ::-1]
    root = np.sqrt(lam)
    f = np.zeros((r, lam.size))
    f[live] = w / (dl[:, None] * root)
    rr = np.zeros((lam.size, r))
    rr[:, live] = (w * root).T * dl
    return f, rr


def factor_svd(gb: np.ndarray, ga: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of one delta ``B @ A`` from its Gram blocks ``gb = B^T B``, ``ga = A A^T``:
    ``(xb (r, k), s (k,), xa (r, k))`` with ``U = B xb`` and ``V = A^T xa`` (orthonormal columns)
    and ``B A = U diag(s) V^T``, without the negligible singular values (``RANK_TOL``)."""
    fb, rb = _half(gb)
    fa, ra = _half(ga)
    r = gb.shape[0]
    if not fb.shape[1] or not fa.shape[1]:
        return np.zeros((r, 0)), np.zeros(0), np.zeros((r, 0))
    u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
    k = int(np.sum(s > RANK_TOL * s[0])) if s[0] > 0 else 0
    return fb @ u[:, :k], s[:k], fa @ vt[:k].T


class _Singular:
    """The thin SVDs of every pair of a :class:`~pipeline.geometry.JointGrams` and the products
    of their singular vectors: with ``X_b = blockdiag(xb_i)``, ``M_b = X_b^T gb`` holds every
    ``U_i^T B_j`` and ``UU = M_b X_b`` every ``U_i^T U_j`` (likewise ``VV`` for the V's), two
    products in all instead of one per pair."""

    def __init__(self, grams: geometry.JointGrams):
        self.svds = [None if sl is None else factor_svd(grams.gb[sl, sl], grams.ga[sl, sl])
                     for sl in grams.spans]
        self.cols: list[slice | None] = []
        c0 = 0
        for x in self.svds:
            self.cols.append(None if x is None else slice(c0, c0 + x[1].size))
            c0 += 0 if x is None else x[1].size
        rows = grams.gb.shape[0]
        xb, xa = np.zeros((rows, c0)), np.zeros((rows, c0))
        for x, sl, cl in zip(self.svds, grams.spans, self.cols):
            if x is not None:
                xb[sl, cl], xa[sl, cl] = x[0], x[2]
        self.mb = xb.T @ grams.gb
        self.uu = self.mb @ xb
        self.vv = xa.T @ grams.ga @ xa

    def overlaps(self, i: int, j: int) -> tuple[float | None, float | None]:
        """Column and row overlap of deltas i and j: mean squared cosine of the principal angles,
        ``|Q_i^T Q_j|_F^2 / min(k_i, k_j)``."""
        ci, cj = self.cols[i], self.cols[j]
        k = min(ci.stop - ci.start, cj.stop - cj.start)
        if k == 0:
            return None, None
        return (float(np.clip(np.sum(self.uu[ci, cj] ** 2) / k, 0.0, 1.0)),
                float(np.clip(np.sum(self.vv[ci, cj] ** 2) / k, 0.0, 1.0)))

    def interference(self, n: int) -> float | None:
        """TSV-Merge's singular task interference of the first ``n`` pairs (the sources), per
        unit of singular value (``None`` with fewer than two present)."""
        idx = [i for i in range(n) if self.svds[i] is not None and self.svds[i][1].size]
        if len(idx) < 2:
            return None
        cols = np.concatenate([np.arange(self.cols[i].start, self.cols[i].stop) for i in idx])
        uu, vv = self.uu[np.ix_(cols, cols)], self.vv[np.ix_(cols, cols)]
        s = np.concatenate([self.svds[i][1] for i in idx])
        uu.flat[:: s.size + 1] -= 1.0
        vv.flat[:: s.size + 1] -= 1.0
        return float(np.abs(uu @ (s[:, None] * vv)).sum() / s.sum())


def module_signals(sources: Sequence, fused=None, error: float | None = None,
                   grams: geometry.JointGrams | None = None) -> dict:
    """The signals of one module (see the module docstring); ``fused`` is the written ``(A, B)``
    (None: only the sources' signals), ``error`` its re-factoring error. ``grams``: the
    :class:`~pipeline.geometry.JointGrams` of ``[*sources, fused]`` (or of ``sources`` alone
    when ``fused`` is None), if the caller already has it."""
    n = len(sources)
    pairs = [*sources, fused] if fused is not None else list(sources)
    grams = grams or geometry.JointGrams(pairs)
    sv = _Singular(grams)
    col_ov = [[None] * n for _ in range(n)]
    row_ov = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            if sv.svds[i] is not None and sv.svds[j] is not None:
                col_ov[i][j], row_ov[i][j] = col_ov[j][i], row_ov[j][i] = sv.overlaps(i, j)
    energy = [0.0 if x is None else float(np.sum(x[1] ** 2)) for x in sv.svds]
    out = {"column_overlap": col_ov, "row_overlap": row_ov, "interference": sv.interference(n),
           "source_energy": energy[:n]}
    if fused is None:
        return out
    sf = sv.svds[n][1]
    cum = np.cumsum(sf ** 2)
    k = int(np.searchsorted(cum, ALIGNMENT_ENERGY * cum[-1]) + 1) if sf.size else 0
    if k:  # singular values tied with the k-th span no one subspace: all of them count
        k = int(np.count_nonzero(sf >= sf[k - 1] * (1.0 - TIE_TOL)))
    top = sv.cols[n].start
    inner = grams.inner_matrix()
    kept_num, aligned = [], []
    for i in range(n):
        if sv.svds[i] is None or energy[i] == 0:
            kept_num.append(None)
            aligned.append(None)
            continue
        kept_num.append(float(inner[i, n]))
        # the source's output directions in the fusion's top subspace: U_k^T B_i (k, r)
        p = sv.mb[top:top + k, grams.spans[i]]
        aligned.append(float(max(np.sum((p.T @ p) * grams.blocks(i, i)[1]), 0.0)))
    out.update({
        "kept": [None if x is None else x / e for x, e in zip(kept_num, energy)],
        "alignment": [None if x is None else math.sqrt(min(x / e, 1.0)) for x, e in zip(aligned, energy)],
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
