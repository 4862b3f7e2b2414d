"""Core space (``space: core``, Core Space merging, arXiv 2509.17786): element-wise methods on the small
core matrices of the sources in one shared basis, never on an out x in matrix.

With the scale folded into ``B_i``, ``Q_B`` is every left singular vector of the stacked
``[B_1 | ... | B_K]`` (out, R_B = min(out, sum r_i)) and ``Q_A`` every right singular vector of the
stacked ``[A_1; ...; A_K]`` (in, R_A = min(in, sum r_i)): float64 SVDs, no truncation, as the
official code. Every delta is ``dW_i = Q_B M_i Q_A^T`` with the core ``M_i = (Q_B^T B_i)(A_i Q_A)``
(R_B x R_A), so a merge of the cores maps back exactly: ``dW = Q_B M Q_A^T``, written as a LoRA from
the SVD of ``M`` (``b = Q_B U S``, ``a = V^T Q_A^T``), at the rank ``M`` has (or ``rank``, with the
Eckart-Young error). A source lacking the module (None) adds no columns and has a zero core.
Element-wise methods (TIES, DARE, magnitude pruning, DELLA, breadcrumbs) act on the cores' entries:
``density`` is a fraction of the R_B x R_A entries of a core. The result depends on the basis (not on
the signs of its vectors, except through a tied ``frequency`` vote, hence a fixed sign convention),
so the bases are the SVD's, of the stored factors with the scale in B.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from pipeline.methods.lowrank import COND_GRAM, REL_TOL, FusedModule, _from_svd, _keep_count, zero_module
from pipeline.methods.registry import ModuleParams

# combine(cores, weights, p, name, idx) -> merged core; idx: the adapter indices of the cores
Combine = Callable[[list, list, ModuleParams, str, Sequence[int]], np.ndarray]


def left_singular_vectors(x: np.ndarray) -> np.ndarray:
    """All ``min(n, R)`` left singular vectors ``u_j`` of ``x`` (n, R), float64, singular values
    descending, each sign fixed by its right singular vector ``v_j`` (``x v_j = s_j u_j``): the
    largest-magnitude entry of ``v_j`` is positive (a small vector, so the convention is cheap).

    A tall ``x`` with ``cond(x) <= COND_GRAM`` takes them from the eigenvectors of its Gram matrix,
    ``U = x V S^-1`` (error about ``cond^2 * 1e-16``; a third of the time of an SVD of ``x``,
    measured on Llama-1B shapes); anything else (rank-deficient, ill-conditioned, wide) from the SVD."""
    n, r = x.shape
    if n >= r > 0:
        w, v = np.linalg.eigh(x.T @ x)
        w, v = w[::-1], v[:, ::-1]
        if w[-1] > 0 and w[-1] * COND_GRAM ** 2 >= w[0]:
            v = v * _signs(v.T)
            return x @ (v / np.sqrt(w))
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u * _signs(vt)


def _signs(rows: np.ndarray) -> np.ndarray:
    """+1 / -1 per row: the sign of its largest-magnitude entry."""
    if rows.shape[0] == 0:
        return np.ones(0)
    top = rows[np.arange(rows.shape[0]), np.argmax(np.abs(rows), axis=1)]
    return np.where(top < 0, -1.0, 1.0)


def bases(sources: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(Q_B (out, R_B), Q_A (in, R_A))`` of the present sources (float64): the left singular vectors
    of the stacked B's, the right singular vectors of the stacked A's, signs fixed as
    :func:`left_singular_vectors` says. The signs matter only to a ``frequency`` election whose
    vote is tied (it elects +): flipping a basis vector flips every core's entries along it, which
    any other election and every sparsifier follow exactly."""
    present = [s for s in sources if s is not None]
    b_stack = np.concatenate([np.asarray(s[1], np.float64) for s in present], axis=1)
    a_stack = np.concatenate([np.asarray(s[0], np.float64) for s in present], axis=0)
    return left_singular_vectors(b_stack), left_singular_vectors(a_stack.T)


def cores(sources: Sequence, q_b: np.ndarray, q_a: np.ndarray) -> list[np.ndarray | None]:
    """``M_i = (Q_B^T B_i)(A_i Q_A)`` (R_B x R_A, float64) of each present source; None stays None."""
    return [None if s is None else (q_b.T @ np.asarray(s[1], np.float64)) @ (np.asarray(s[0], np.float64) @ q_a)
            for s in sources]


def from_core(m: np.ndarray, q_b: np.ndarray, q_a: np.ndarray, rank: int | None,
              shape: tuple[int, int]) -> FusedModule:
    """The LoRA of ``Q_B m Q_A^T``: exact at the rank of ``m`` (singular values ``<= REL_TOL *
    s_max`` are zeros), or its best rank-``rank`` approximation with the relative error."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    nz, k = _keep_count(s, rank, REL_TOL)
    if k == 0:
        return zero_module(shape)
    err = float(math.sqrt(np.sum(s[k:nz] ** 2) / np.sum(s[:nz] ** 2))) if k < nz else 0.0
    return _from_svd(q_b @ u[:, :k], s, vt[:k] @ q_a.T, k, shape, err)


def in_core_space(combine: Combine):
    """A module function from an element-wise merge ``combine`` of the present sources' cores.
    The bases are looked up at each call (the tests flip their signs)."""
    def fuse(sources, shape, p: ModuleParams, name: str) -> FusedModule:
        idx = [i for i, s in enumerate(sources) if s is not None]
        present = [(np.asarray(sources[i][0], np.float64), np.asarray(sources[i][1], np.float64)) for i in idx]
        q_b, q_a = bases(present)
        ms = cores(present, q_b, q_a)
        merged = combine(ms, [p.weights[i] for i in idx], p, name, idx)
        return from_core(merged, q_b, q_a, p.rank, shape)
    return fuse
