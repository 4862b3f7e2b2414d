"""KnOTS (``knots``, arXiv 2410.19735): the tasks' deltas in the shared basis of the SVD of their
concatenation, merged element-wise there with an inner method, exact without a dense matrix.

The SVD of ``[dW_1 ... dW_K]`` (out x K in) is ``U diag(s) [V_1^T ... V_K^T]``; task i is ``X_i = diag(s)
V_i^T = U^T dW_i`` (R' x in), and the result is ``U merge(X_1 .. X_K)``. With ``B_c = Q_B R_B`` (the stacked
B's) and ``A_i A_i^T = L_i L_i^T`` (an r_i x r_i Gram matrix), the left singular vectors and values are
those of ``Q_B C`` with the small ``C = R_B diag(L_1, ..., L_K)`` (``C C^T = Q_B^T (sum_i dW_i dW_i^T) Q_B``),
so ``U = Q_B W`` from ``svd(C) = W S Z^T`` and ``X_i = W^T R_B[:, I_i] A_i``. The merge is the project's
task-vector core (the numbers of :func:`pipeline.methods.ops.merge_task_vectors`, by the blocked kernel of
the masking methods): ``linear`` (magnitude pruning at ``density``, then the weighted sum), ``ties``,
``dare_linear``, ``dare_ties``, the DARE stream of source ``i`` being ``source_rng(seed, name, i)`` as for
``dare_*``.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.methods.dense import merge_dense
from pipeline.methods.lowrank import (REL_TOL, FusedModule, _from_svd, _keep_count, _triangular, stack_factors,
                                      zero_module)
from pipeline.methods.ops import source_rng
from pipeline.methods.registry import ModuleParams
from pipeline.methods.spectral import numerical_rank, qr_factors, svd

INNER = {"linear": ("magnitude", False), "ties": ("magnitude", True),
         "dare_linear": ("random", False), "dare_ties": ("random", True)}


def gram_factor(a: np.ndarray) -> np.ndarray:
    """An ``L`` with ``L L^T = A A^T`` (``a``: r x in): the transposed R of ``A^T = Q R``."""
    at = np.asarray(a, np.float64).T
    r = _triangular(at)
    return (r if r is not None else np.linalg.qr(at, mode="r")).T


def shared_basis(sources, shape):
    """``(left, C, present)``: ``left(x) = U x`` applies the left singular vectors ``U`` (out x R') of the
    present sources' concatenated deltas with singular values above ``REL_TOL * s_max`` (never formed),
    and ``C[j]`` (R' x r_j) gives ``X_j = U^T dW_j = C[j] @ A_j`` for the ``j``-th present source. Each
    component's sign makes the sum of its column of ``U`` positive."""
    present = [i for i, s in enumerate(sources) if s is not None]
    bc, _ = stack_factors(sources, [1.0] * len(sources), shape)
    rb, qb = qr_factors(bc)
    ranks = np.concatenate([[0], np.cumsum([sources[i][0].shape[0] for i in present])]).astype(int)
    cols = [slice(ranks[j], ranks[j + 1]) for j in range(len(present))]
    c = np.hstack([rb[:, cj] @ gram_factor(sources[i][0]) for cj, i in zip(cols, present)])
    w, s, _ = svd(c)
    w = w[:, :numerical_rank(s)]

    def left(x):
        return qb @ x if qb is not None else bc @ np.linalg.solve(rb, x)

    # the sign convention (a zero vote of the frequency election elects +, so the merge depends on it):
    # the column sums of U = Q_B W are (1^T Q_B) W
    sums = (qb.sum(axis=0) if qb is not None else np.linalg.solve(rb.T, bc.sum(axis=0))) @ w
    w = w * np.where(sums < 0, -1.0, 1.0)
    return (lambda x: left(w @ x)), [w.T @ rb[:, cj] for cj in cols], present, w.shape[1]


def isometry_product(left, m: np.ndarray, rank: int | None, shape) -> FusedModule:
    """The FusedModule of ``U m`` (``left(x) = U x``, ``U`` with orthonormal columns; ``m``: k x in),
    re-factored exactly as :func:`refactor_exact` does, without forming ``U``: ``m^T = Q R``, the SVD
    of the small ``R^T``, and ``U`` applied to its left singular vectors only."""
    mt = np.asarray(m, np.float64).T
    r = _triangular(mt)
    q = None
    if r is None:
        q, r = np.linalg.qr(mt)
    u, s, vt = svd(r.T)
    nz, k = _keep_count(s, rank, REL_TOL)
    if k == 0:
        return zero_module(shape)
    err = float(math.sqrt(np.sum(s[k:nz] ** 2) / np.sum(s[:nz] ** 2))) if k < nz else 0.0
    right = (q @ vt[:k].T if q is not None else mt @ np.linalg.solve(r, vt[:k].T)).T
    return _from_svd(left(u[:, :k]), s, right, k, shape, err)


def knots(sources, shape, p: ModuleParams, name: str) -> FusedModule:
    """KnOTS on one module: ``U merge_inner(X_i, w_i)``, re-factored exactly (or to ``rank``). The merge
    is the masking methods' blocked kernel (:func:`pipeline.methods.dense.merge_dense`, held equal to
    ``merge_task_vectors`` entry for entry) on the low-rank ``X_i = C_i A_i``, in float32."""
    left, cs, present, r = shared_basis(sources, shape)
    if r == 0:
        return zero_module(shape)
    sparsify, elect = INNER[p.inner_method]
    rngs = [source_rng(p.seed, name, i) for i in present] if sparsify == "random" else None
    xs = [(np.asarray(sources[i][0], np.float32), ci.astype(np.float32)) for ci, i in zip(cs, present)]
    merged, _ = merge_dense(xs, [float(p.weights[i]) for i in present], (r, shape[1]),
                            sparsify=sparsify, density=p.density,
                            elect=p.majority_sign_method if elect else None, consensus=p.consensus, rngs=rngs)
    return isometry_product(left, merged, p.rank, shape)
