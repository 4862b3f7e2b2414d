"""Spectral methods, exact on the stacked factors: TSV-Merge (``tsv``), Iso-C (``iso_c``), Iso-CTS
(``iso_cts``).

Every delta of a module lies in ``Q_B M_i Q_A^T``: ``B_c = [B_1 | ... ] = Q_B R_B`` and ``A_c^T =
[A_1; ...]^T = Q_A R_A`` are thin QRs of the stacked factors, and task i's core is ``M_i = R_B[:, I_i]
R_A[:, I_i]^T`` (R x R, R = the sum of the ranks; ``I_i`` its columns of the stack). The three methods
are built from SVDs, polar factors and sums, which commute with the orthonormal ``Q_B``, ``Q_A``: on the
cores and mapped back, they give exactly what they give on the dense deltas, at O((out + in) R^2).
The definitions follow ../shared/notes/frontier-methods.md (sections 1-3); docs/methods.md says where
they differ from the official code.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import FusionError
from pipeline.methods.lowrank import REL_TOL, FusedModule, _from_svd, stack_factors, triangular_gram, zero_module
from pipeline.methods.registry import ModuleParams


def numerical_rank(s: np.ndarray, ref: float | None = None) -> int:
    """How many of the (descending) singular values ``s`` exceed ``REL_TOL`` times ``ref`` (default
    the largest)."""
    ref = (s[0] if s.size else 0.0) if ref is None else ref
    return int(np.count_nonzero(s > REL_TOL * ref)) if ref > 0 else 0


def svd(x: np.ndarray):
    return np.linalg.svd(x, full_matrices=False)


def polar(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(U V^T, full)``: the polar factor of ``x`` from its thin SVD, on its nonzero singular
    values only (unique even when ``x`` is rank-deficient, where the full polar factor is not);
    ``full`` says whether ``x`` had full column rank (then ``U V^T`` has orthonormal columns)."""
    if x.shape[1] == 0:
        return x, True
    u, s, vt = svd(x)
    k = numerical_rank(s)
    return u[:, :k] @ vt[:k], k == x.shape[1]


def qr_factors(x: np.ndarray):
    """``(R, Q)`` of ``x = Q R``; Q is None when ``x R^-1`` stands for it (``_triangular``)."""
    return qr_gram(x)[:2]


def qr_gram(x: np.ndarray):
    """``(R, Q, G)``: :func:`qr_factors` and the Gram matrix ``x^T x`` when Q is None (else None)."""
    r, g = triangular_gram(x)
    if r is not None:
        return r, None, g
    q, r = np.linalg.qr(x)
    return r, q, None


class Basis:
    """The thin QR bases of a module's stacked factors (scale folded into B; missing sources left out)
    and the tasks' cores in them. ``present`` are the indices of the sources that have the module."""

    def __init__(self, sources, shape: tuple[int, int]):
        self.shape = shape
        self.present = [i for i, s in enumerate(sources) if s is not None]
        ranks = [sources[i][0].shape[0] for i in self.present]
        self.offsets = np.concatenate([[0], np.cumsum(ranks)]).astype(int)
        self.bc, ac = stack_factors(sources, [1.0] * len(sources), shape)
        self.act = ac.T
        self.rb, self.qb, self.gb = qr_gram(self.bc)
        self.ra, self.qa, self.ga = qr_gram(self.act)

    def cols(self, j: int) -> slice:
        """The stack's columns of the ``j``-th present source."""
        return slice(self.offsets[j], self.offsets[j + 1])

    def core(self, j: int, w: float = 1.0) -> np.ndarray:
        """``w M_j`` for the ``j``-th present source: ``Q_B^T (w dW) Q_A``."""
        c = self.cols(j)
        return (self.rb[:, c] * w) @ self.ra[:, c].T

    def weighted_sum(self, weights) -> np.ndarray:
        """``sum_i w_i M_i``, the core of the weighted sum of the deltas."""
        w = np.concatenate([np.full(self.offsets[j + 1] - self.offsets[j], float(weights[i]))
                            for j, i in enumerate(self.present)])
        return (self.rb * w) @ self.ra.T

    def left(self, x: np.ndarray) -> np.ndarray:
        """``Q_B x``."""
        return self.qb @ x if self.qb is not None else self.bc @ np.linalg.solve(self.rb, x)

    def right(self, x: np.ndarray) -> np.ndarray:
        """``Q_A x``."""
        return self.qa @ x if self.qa is not None else self.act @ np.linalg.solve(self.ra, x)

    def emit(self, u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int | None) -> FusedModule:
        """The FusedModule of ``Q_B u diag(s) vt Q_A^T`` (``u``, ``vt^T`` with orthonormal columns, ``s``
        >= 0), its components in order of preference: values ``<= REL_TOL * max(s)`` are zeros;
        ``rank`` keeps the first ``rank`` of the rest, with the error of those it drops."""
        if s.size == 0 or s.max() <= 0:
            return zero_module(self.shape)
        keep = s > REL_TOL * s.max()
        u, s, vt = u[:, keep], s[keep], vt[keep]
        k = s.size if rank is None else min(rank, s.size)
        err = float(math.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2))) if k < s.size else 0.0
        if self.qb is None and self.qa is None:  # Q = x R^-1: the factors' coordinates in the stacks
            lu, lv = np.linalg.solve(self.rb, u[:, :k]), np.linalg.solve(self.ra, vt[:k].T).T
            return _from_svd(self.bc @ lu, s, (self.act @ lv.T).T, k, self.shape, err,
                             (self.gb, self.ga, lu, lv))
        return _from_svd(self.left(u[:, :k]), s, self.right(vt[:k].T).T, k, self.shape, err)


def tsv(sources, shape, p: ModuleParams, name: str) -> FusedModule:
    """TSV-Merge: per task the top ``k = int(min(out, in) * (1/K))`` components (at most its rank;
    none at weight 0), singular values scaled by the weights, the concatenated singular vectors
    replaced by their polar factors: ``polar(U_cat) diag(w S) polar(V_cat)^T``."""
    basis = Basis(sources, shape)
    k = int(min(shape) * (1 / len(sources)))
    us, ss, vs = [], [], []
    for j, i in enumerate(basis.present):
        w = float(p.weights[i])
        if w == 0.0:
            continue
        u, s, vt = svd(basis.core(j))
        ki = min(numerical_rank(s), k)
        us.append(u[:, :ki])
        ss.append(w * s[:ki])
        vs.append(vt[:ki].T)
    if not ss or not sum(x.size for x in ss):
        return zero_module(shape)
    pu, _ = polar(np.hstack(us))
    pv, _ = polar(np.hstack(vs))
    u, s, vt = svd((pu * np.concatenate(ss)) @ pv.T)
    return basis.emit(u, s, vt, p.rank)


def iso_c(sources, shape, p: ModuleParams, name: str) -> FusedModule:
    """Iso-C: the weighted sum ``U S V^T`` with its nonzero spectrum made flat, ``mean(S) U V^T``
    (the mean over the R nonzero values)."""
    basis = Basis(sources, shape)
    u, s, vt = svd(basis.weighted_sum(p.weights))
    n = numerical_rank(s)
    if n == 0:
        return zero_module(shape)
    return basis.emit(u[:, :n], np.full(n, s[:n].sum() / n), vt[:n], p.rank)


def cts_sizes(n: int, k: int, fraction: float) -> tuple[int, int]:
    """(common size, per-task size) of Iso-CTS for a sum of rank ``n`` and ``k`` tasks, as the official
    code computes them (Python's ``round``, half to even)."""
    common0 = int(n * fraction)
    per_task = round((n - common0) / k)
    return n - k * per_task, per_task


def iso_cts(sources, shape, p: ModuleParams, name: str) -> FusedModule:
    """Iso-CTS: the top ``k_c`` directions of the weighted sum (the common subspace) plus, per task,
    the top ``n_ts`` of its residual outside them; the concatenated singular vectors orthogonalised by
    their polar factors; the spectrum flat at the mean of all kept singular values."""
    basis = Basis(sources, shape)
    u, s, vt = svd(basis.weighted_sum(p.weights))
    n = numerical_rank(s)
    if n == 0:
        return zero_module(shape)
    k_c, n_ts = cts_sizes(n, len(sources), p.common_fraction)
    if k_c < 0:
        raise FusionError(f"module {name}: iso_cts with common_fraction {p.common_fraction} gives "
                          f"{len(sources)} tasks {n_ts} directions each of the {n} the sum has, more "
                          f"than there are; raise common_fraction")
    uc = u[:, :k_c]
    us, ss, vs = [uc], [s[:k_c]], [vt[:k_c].T]
    for j, i in enumerate(basis.present):
        t = basis.core(j, float(p.weights[i]))
        norm = np.linalg.norm(t, 2) if t.size else 0.0
        ur, sr, vrt = svd(t - uc @ (uc.T @ t))
        kr = min(n_ts, numerical_rank(sr, norm))
        us.append(ur[:, :kr])
        ss.append(sr[:kr])
        vs.append(vrt[:kr].T)
    values = np.concatenate(ss)
    mean = float(values.mean())
    pu, full_u = polar(np.hstack(us))
    pv, full_v = polar(np.hstack(vs))
    if full_u and full_v:
        order = np.argsort(-values, kind="stable")   # rank keeps the strongest directions
        return basis.emit(pu[:, order], np.full(values.size, mean), pv[:, order].T, p.rank)
    u2, s2, vt2 = svd(mean * pu @ pv.T)              # tasks that share directions exactly
    return basis.emit(u2, s2, vt2, p.rank)
