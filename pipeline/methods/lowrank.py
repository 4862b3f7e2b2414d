"""Low-rank linear algebra: stacked factors, exact re-factoring without a dense matrix, and the
randomized SVD of a dense module, each returning a :class:`FusedModule`.

Contract of a :class:`FusedModule`: ``a`` (r, in) and ``b`` (out, r) float32 with the fused delta
``b @ a``; the singular values sit in ``b`` (``b = U S``, ``a = V^T`` with orthonormal rows), each
component's sign fixed so the largest-magnitude entry of its row of ``a`` is positive; ``rank ==
a.shape[0]``; an exactly zero delta is one zero pair (rank 1, error 0.0). Singular values
``<= REL_TOL * s_max`` are round-off and dropped without counting as error. See docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

REL_TOL = 1e-6          # singular values <= REL_TOL * s_max are zeros
OVERSAMPLE = 10         # extra columns of the randomized SVD's test matrix
POWER_ITERS = 3         # power iterations of the randomized SVD
SIGNAL_ITERS = 1        # power iterations when the sketch spans the sources' whole rank
ERR_FORMULA = 0.1       # re-factoring errors above this come from the singular values
COND_MAX = 1e8          # exact re-factoring solves with R when cond(R) is at most this,
COND_GRAM = 100.0       # and takes R from the Gram matrix when cond is at most this
BLOCK = 1 << 17         # entries per row block of the dense path (512 KiB of float32)


@dataclass
class Span:
    """The fused factors as combinations of the present sources' stacked factors ``S_B = [B_1 | ..]``
    (out, R) and ``S_A = [A_1; ..]`` (R, in), scale folded into B, no weights: ``b = S_B tb`` and
    ``a = ta S_A`` before their rounding to float32, with the Gram matrices ``gb = S_B^T S_B`` and
    ``ga = S_A S_A^T`` (float64) the method computed anyway. Every inner product of the sources and
    the fusion then follows in R x R arithmetic (:meth:`pipeline.geometry.JointGrams.of`)."""
    gb: np.ndarray  # (R, R)
    ga: np.ndarray  # (R, R)
    tb: np.ndarray  # (R, rank)
    ta: np.ndarray  # (rank, R)


@dataclass
class FusedModule:
    a: np.ndarray   # (r, in) float32
    b: np.ndarray   # (out, r) float32   -> fused delta = b @ a
    rank: int       # == a.shape[0]
    error: float    # |dW - b @ a| / |dW| versus the method's exact result (0.0 if exact or dW == 0)
    span: Span | None = None  # where the method knows them: the factors in the sources' span


def stack_factors(sources: Sequence, coeffs: Sequence[float], shape: tuple[int, int],
                  dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """``B_c = [c_1 B_1 | ...]`` (out, R) and ``A_c = [A_1; ...]`` (R, in) over present sources,
    so ``B_c @ A_c = sum_i c_i B_i A_i``."""
    out, fin = shape
    present = [(s, float(c)) for s, c in zip(sources, coeffs) if s is not None]
    if not present:
        return np.zeros((out, 0), dtype), np.zeros((0, fin), dtype)
    ranks = [s[0].shape[0] for s, _ in present]
    bc = np.empty((out, sum(ranks)), dtype)
    ac = np.empty((sum(ranks), fin), dtype)
    r0 = 0
    for (s, c), r in zip(present, ranks):
        block = bc[:, r0:r0 + r]
        block[...] = s[1]  # converted in place: no float64 temporary of the source
        block *= c
        ac[r0:r0 + r] = s[0]
        r0 += r
    return bc, ac


def _signs(vt: np.ndarray) -> np.ndarray:
    """+-1 per row of ``vt``: the sign that makes the row's largest-magnitude entry positive."""
    idx = np.argmax(np.abs(vt), axis=1)
    return np.where(vt[np.arange(vt.shape[0]), idx] < 0, -1.0, 1.0)


def zero_module(shape: tuple[int, int]) -> FusedModule:
    out, fin = shape
    return FusedModule(np.zeros((1, fin), np.float32), np.zeros((out, 1), np.float32), 1, 0.0)


def _keep_count(s: np.ndarray, rank: int | None, tol: float) -> tuple[int, int]:
    """(significant, kept): singular values above tol * s_max, and those kept under ``rank``."""
    if s.size == 0 or s[0] <= 0:
        return 0, 0
    nz = int(np.count_nonzero(s > tol * s[0]))
    return nz, nz if rank is None else min(nz, rank)


def _from_svd(u, s, vt, k: int, shape, error: float, lift=None) -> FusedModule:
    """The FusedModule of ``u[:, :k] diag(s) vt[:k]`` with the sign convention. ``lift``: ``(gb, ga,
    lu, lv)`` with ``u[:, :k] = S_B lu`` and ``vt[:k] = lv S_A`` (see :class:`Span`), or None."""
    if k == 0:
        return zero_module(shape)
    sgn = _signs(vt[:k])
    # b = U_k S_k with the signs, written straight into float32 (no float64 temporary of out x k)
    b = np.empty((u.shape[0], k), np.float32)
    np.multiply(u[:, :k], s[:k] * sgn, out=b, casting="same_kind")
    a = np.empty((k, vt.shape[1]), np.float32)
    np.multiply(vt[:k], sgn[:, None], out=a, casting="same_kind")
    span = None
    if lift is not None:
        gb, ga, lu, lv = lift
        span = Span(gb, ga, lu * (s[:k] * sgn), lv * sgn[:, None])
    return FusedModule(a, b, k, error, span)


def _cond(r: np.ndarray) -> float:
    sv = np.linalg.svd(r, compute_uv=False)
    return float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf


def _triangular(x: np.ndarray) -> np.ndarray | None:
    """:func:`triangular_gram`'s ``R``."""
    return triangular_gram(x)[0]


def triangular_gram(x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(R, x^T x)``: an upper-triangular ``R`` with ``x = Q R`` (``x``: n x R float64, Q with
    orthonormal columns, never formed) and ``cond(R) <= COND_MAX``, or None when ``x`` is too close to
    rank-deficient for that (or has fewer rows than columns).

    ``R`` is the Cholesky factor of ``x^T x`` when ``cond(x) <= COND_GRAM`` (its error, about
    ``cond^2 * 1e-16``, is then far below float32's rounding; a Gram product costs a fifth of a
    Householder QR), else the R of a Householder QR (error about ``cond * 1e-16``). The Gram
    matrix is None for a wide ``x``."""
    n, k = x.shape
    if n < k:
        return None, None
    g = x.T @ x
    try:
        r = np.linalg.cholesky(g).T
        if _cond(r) <= COND_GRAM:
            return r, g
    except np.linalg.LinAlgError:
        pass
    r = np.linalg.qr(x, mode="r")
    return (r if _cond(r) <= COND_MAX else None), g


def refactor_exact(bc: np.ndarray, ac: np.ndarray, rank: int | None = None,
                   tol: float = REL_TOL, coeffs: np.ndarray | None = None) -> FusedModule:
    """Re-factor ``bc @ ac`` ((out, R) @ (R, in)) without forming it: QR of both factors, SVD of
    the small core; exact smaller rank (s <= tol * s_max dropped as zeros), or the best rank-r
    approximation when ``rank`` is smaller, with its relative error.

    Only the triangular factors are needed (``bc = Q_b R_b``, ``ac^T = Q_a R_a``, see
    ``_triangular``): with the core ``R_b R_a^T = U S V^T``, the outputs are
    ``Q_b U = bc R_b^-1 U`` and ``V^T Q_a^T = (ac^T R_a^-1 V)^T``, two small triangular solves and
    two skinny products (forming Q costs three times as much as R). A factor that is (nearly)
    rank-deficient (an adapter fused with itself, a zero weight) has no usable R^-1: then both Q
    are formed by Householder QR, as the dense reference does.

    ``coeffs`` (R,): ``bc``'s columns are the sources' stacked B's times these (nonzero), as
    :func:`stack_factors` makes them; the result then carries its :class:`Span`."""
    shape = (bc.shape[0], ac.shape[1])
    if bc.shape[1] == 0:
        return zero_module(shape)
    bc = np.asarray(bc, dtype=np.float64)
    act = np.asarray(ac, dtype=np.float64).T
    rb, gb = triangular_gram(bc)
    ra, ga = triangular_gram(act) if rb is not None else (None, None)
    fast = ra is not None
    if not fast:
        qb, rb = np.linalg.qr(bc)
        qa, ra = np.linalg.qr(act)
    u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
    nz, k = _keep_count(s, rank, tol)
    err = 0.0
    if k < nz:
        err = float(math.sqrt(np.sum(s[k:nz] ** 2) / np.sum(s[:nz] ** 2)))
    if k == 0:
        return zero_module(shape)
    lift = None
    if fast:
        lu = np.linalg.solve(rb, u[:, :k])
        lv = np.linalg.solve(ra, vt[:k].T).T
        left = bc @ lu                # Q_b U_k
        right = (act @ lv.T).T        # V_k^T Q_a^T
        if coeffs is not None and np.all(coeffs != 0):
            lift = (gb / np.outer(coeffs, coeffs), ga, coeffs[:, None] * lu, lv)
    else:
        left, right = qb @ u[:, :k], vt[:k] @ qa.T
    return _from_svd(left, s, right, k, shape, err, lift)


def column_coeffs(sources: Sequence, coeffs: Sequence[float]) -> np.ndarray:
    """The scale of each column of :func:`stack_factors`' ``B_c``: ``c_i`` repeated ``r_i`` times
    over the present sources."""
    return np.concatenate([np.full(s[0].shape[0], float(c)) for s, c in zip(sources, coeffs) if s is not None]
                          or [np.zeros(0)])


def _orth(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the columns of ``y`` (float64 QR), returned as float32."""
    return np.linalg.qr(y.astype(np.float64))[0].astype(np.float32)


def randomized_svd(m: np.ndarray, rank: int, rng: np.random.Generator, n_iter: int = POWER_ITERS,
                   oversample: int = OVERSAMPLE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD ``(u (out, k), s (k,), vt (k, in))`` of ``m`` (float64 outputs), Halko et
    al.: Gaussian test matrix with ``oversample`` extra columns, ``n_iter`` power iterations
    with QR in between. Falls back to a full SVD when the sketch would not be smaller."""
    out, fin = m.shape
    k = min(rank, out, fin)
    ell = k + oversample
    if ell >= min(out, fin):
        u, s, vt = np.linalg.svd(np.asarray(m, dtype=np.float64), full_matrices=False)
        return u[:, :k], s[:k], vt[:k]
    m = np.asarray(m, dtype=np.float32)
    omega = rng.standard_normal((fin, ell), dtype=np.float32)
    q = _orth(m @ omega)                      # (out, ell)
    for _ in range(n_iter):
        q = _orth(m.T @ q)                    # (in, ell)
        q = _orth(m @ q)                      # (out, ell)
    small = (q.T @ m).astype(np.float64)      # (ell, in)
    u, s, vt = np.linalg.svd(small, full_matrices=False)
    return q.astype(np.float64) @ u[:, :k], s[:k], vt[:k]


def row_step(fin: int) -> int:
    """Rows per block of the blocked dense path: about ``BLOCK`` entries, so a block stays in cache."""
    return max(1, BLOCK // max(1, fin))


def sum_squares(x: np.ndarray) -> float:
    """Sum of squares of a float32 block (a BLAS dot), as a Python float."""
    x = x.ravel()
    return float(np.dot(x, x))


def _frob2(x: np.ndarray) -> float:
    """Squared Frobenius norm, in row blocks."""
    step = row_step(x.shape[1]) if x.ndim == 2 else max(1, x.shape[0])
    return sum(sum_squares(np.ascontiguousarray(x[i:i + step], np.float32)) for i in range(0, x.shape[0], step))


def _residual_error(m: np.ndarray, a: np.ndarray, b: np.ndarray, norm2: float | None = None) -> float:
    """|m - b @ a| / |m|, row block by row block (``b @ a`` is never formed whole)."""
    total = _frob2(m) if norm2 is None else norm2
    if total == 0.0:
        return 0.0
    out, fin = m.shape
    step = row_step(fin)
    buf = np.empty((min(step, out), fin), np.float32)
    res = 0.0
    for r0 in range(0, out, step):
        d = buf[:min(out, r0 + step) - r0]
        np.matmul(b[r0:r0 + step], a, out=d)
        np.subtract(m[r0:r0 + step], d, out=d)
        res += sum_squares(d)
    return math.sqrt(res / total)


def refactor_dense(m: np.ndarray, rank: int, rng: np.random.Generator,
                   tol: float = REL_TOL, norm2: float | None = None,
                   signal_rank: int | None = None) -> FusedModule:
    """Rank-``rank`` factors of the dense ``m`` by randomized SVD, with the measured error.

    ``norm2`` is ``|m|^2`` when the caller already has it. ``signal_rank`` is the rank of the
    structure ``m`` was made from (the sum of the sources' ranks, before masking): the sketch then
    spans all of it, ``max(rank, signal_rank) + OVERSAMPLE`` columns, and one power iteration is
    enough (``SIGNAL_ITERS``). A sketch narrower than that structure has to separate directions of
    nearly equal weight by power iterations alone, which is where three iterations of a
    ``rank + 10`` sketch still left errors up to 1% above the optimum on masked merges of random
    adapters of Llama sizes, against under 0.1% for the wider sketch with one iteration, at less
    cost. Without ``signal_rank``: ``rank + OVERSAMPLE`` columns and ``POWER_ITERS`` iterations.

    The error: when it is large (at least ``ERR_FORMULA``, the usual case after masking), from the
    singular values, ``|m - Q Q^T m_k|^2 = |m|^2 - sum of the kept s^2`` (Q has orthonormal
    columns), which saves a pass over ``m``; when it is small, where that difference would lose
    its digits, from the residual itself, row block by row block."""
    m = np.asarray(m, np.float32)
    if norm2 is None:
        norm2 = _frob2(m)
    if norm2 == 0.0 and not np.any(m):
        return zero_module(m.shape)
    if signal_rank is None:
        u, s, vt = randomized_svd(m, rank, rng)
    else:
        k = min(rank, *m.shape)
        u, s, vt = randomized_svd(m, rank, rng, n_iter=SIGNAL_ITERS,
                                  oversample=max(k, signal_rank) - k + OVERSAMPLE)
    _, k = _keep_count(s, None, tol)
    fm = _from_svd(u, s, vt, k, m.shape, 0.0)
    err2 = 1.0 - float(np.sum(s[:k] ** 2)) / norm2 if norm2 > 0.0 else 0.0
    if err2 >= ERR_FORMULA ** 2:
        fm.error = math.sqrt(err2)
    else:
        fm.error = _residual_error(m, fm.a, fm.b, norm2 if norm2 > 0.0 else None)
    return fm
