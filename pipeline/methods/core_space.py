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


class Basis:
    """All ``min(n, R)`` left singular vectors ``Q`` (n, k) of a stacked factor ``x`` (n, R), float64,
    singular values descending, each sign fixed by its right singular vector ``v_j`` (``x v_j =
    s_j q_j``): the largest-magnitude entry of ``v_j`` is positive (a small vector, so the
    convention is cheap).

    A tall ``x`` with ``cond(x) <= COND_GRAM`` is known by its Gram matrix ``g = x^T x`` and the
    small map ``w = V S^-1`` (R x k) from the eigenvectors of ``g``, with ``Q = x w`` never formed:
    ``Q^T x_cols = w^T g_cols`` and ``Q m = x (w m)`` (error about ``cond^2 * 1e-16``; the products
    of an n x R matrix are the Gram matrix and the final ``x (w m)``). Anything else
    (rank-deficient, ill-conditioned, wide) holds ``Q`` itself, from the SVD of ``x``."""

    def __init__(self, x: np.ndarray):
        self.x, self.w, self.gram, self._q = x, None, None, None
        n, r = x.shape
        if n >= r > 0:
            g = x.T @ x
            w, v = np.linalg.eigh(g)
            w, v = w[::-1], v[:, ::-1]
            if w[-1] > 0 and w[-1] * COND_GRAM ** 2 >= w[0]:
                self.gram, self.w = g, (v * _signs(v.T)) / np.sqrt(w)
                return
        u, _, vt = np.linalg.svd(x, full_matrices=False)
        self._q = u * _signs(vt)

    @property
    def q(self) -> np.ndarray:
        """``Q`` itself (n, k)."""
        return self._q if self._q is not None else self.x @ self.w

    def t_cols(self, cols: slice) -> np.ndarray:
        """``Q^T x[:, cols]`` (k, |cols|): the stacked factor's columns in the basis."""
        if self.w is not None:
            return self.w.T @ self.gram[:, cols]
        return self._q.T @ self.x[:, cols]

    def apply(self, m: np.ndarray) -> np.ndarray:
        """``Q m`` (n, m.shape[1])."""
        return self.x @ (self.w @ m) if self.w is not None else self._q @ m

    def times(self, g: np.ndarray) -> "Basis":
        """The basis ``Q g`` (another basis of the same span when ``g`` is orthogonal: a sign flip,
        a permutation, a rotation)."""
        out = Basis.__new__(Basis)
        out.x, out.gram = self.x, self.gram
        out.w, out._q = (self.w @ g, None) if self.w is not None else (None, self._q @ g)
        return out


def left_singular_vectors(x: np.ndarray) -> np.ndarray:
    """``Q`` of :class:`Basis` for ``x`` (n, R), formed."""
    return Basis(x).q


def _signs(rows: np.ndarray) -> np.ndarray:
    """+1 / -1 per row: the sign of its largest-magnitude entry."""
    if rows.shape[0] == 0:
        return np.ones(0)
    top = rows[np.arange(rows.shape[0]), np.argmax(np.abs(rows), axis=1)]
    return np.where(top < 0, -1.0, 1.0)


def stacks(sources: Sequence) -> tuple[np.ndarray, np.ndarray, list[slice]]:
    """``[B_1 | ...]`` (out, R) and ``[A_1; ...]^T`` (in, R), float64, of the present sources, filled
    in place from the factors, and each present source's slice of the R columns."""
    present = [s for s in sources if s is not None]
    out, fin = present[0][1].shape[0], present[0][0].shape[1]
    total = sum(s[0].shape[0] for s in present)
    b_stack, a_stack = np.empty((out, total)), np.empty((total, fin))
    spans, r0 = [], 0
    for a, b in present:
        spans.append(slice(r0, r0 + a.shape[0]))
        b_stack[:, spans[-1]] = b
        a_stack[spans[-1]] = a
        r0 += a.shape[0]
    return b_stack, a_stack.T, spans


def basis_pair(b_stack: np.ndarray, a_stack_t: np.ndarray) -> tuple[Basis, Basis]:
    """The bases of the stacked B's (out, R) and of the stacked A's transposed (in, R): the
    definition of core space (the tests replace it to flip, permute or rotate the bases)."""
    return Basis(b_stack), Basis(a_stack_t)


def bases(sources: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(Q_B (out, R_B), Q_A (in, R_A))`` of the present sources (float64), formed: the left
    singular vectors of the stacked B's, the right singular vectors of the stacked A's, signs fixed
    as :class:`Basis` says. The signs matter only to a ``frequency`` election whose vote is tied
    (it elects +): flipping a basis vector flips every core's entries along it, which any other
    election and every sparsifier follow exactly."""
    b_stack, a_stack_t, _ = stacks(sources)
    q_b, q_a = basis_pair(b_stack, a_stack_t)
    return q_b.q, q_a.q


def cores(bb: Basis, ba: Basis, spans: Sequence[slice]) -> list[np.ndarray]:
    """``M_i = (Q_B^T B_i)(A_i Q_A)`` (R_B x R_A, float64) of each present source (``spans``: its
    columns of the stacks), from r x r products (:meth:`Basis.t_cols`)."""
    return [bb.t_cols(sl) @ ba.t_cols(sl).T for sl in spans]


def from_core(m: np.ndarray, bb: Basis, ba: Basis, rank: int | None,
              shape: tuple[int, int]) -> FusedModule:
    """The LoRA of ``Q_B m Q_A^T``: exact at the rank of ``m`` (singular values ``<= REL_TOL *
    s_max`` are zeros), or its best rank-``rank`` approximation with the relative error."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    nz, k = _keep_count(s, rank, REL_TOL)
    if k == 0:
        return zero_module(shape)
    err = float(math.sqrt(np.sum(s[k:nz] ** 2) / np.sum(s[:nz] ** 2))) if k < nz else 0.0
    lift = None
    if bb.w is not None and ba.w is not None:  # Q = x w: the factors' coordinates in the stacks
        lu, lv = bb.w @ u[:, :k], (ba.w @ vt[:k].T).T
        lift = (bb.gram, ba.gram, lu, lv)
        return _from_svd(bb.x @ lu, s, (ba.x @ lv.T).T, k, shape, err, lift)
    return _from_svd(bb.apply(u[:, :k]), s, ba.apply(vt[:k].T).T, k, shape, err)


def in_core_space(combine: Combine):
    """A module function from an element-wise merge ``combine`` of the present sources' cores.
    ``basis_pair`` is looked up at each call (the tests flip, permute and rotate the bases)."""
    def fuse(sources, shape, p: ModuleParams, name: str) -> FusedModule:
        idx = [i for i, s in enumerate(sources) if s is not None]
        b_stack, a_stack_t, spans = stacks(sources)
        bb, ba = basis_pair(b_stack, a_stack_t)
        merged = combine(cores(bb, ba, spans), [p.weights[i] for i in idx], p, name, idx)
        return from_core(merged, bb, ba, p.rank, shape)
    return fuse
