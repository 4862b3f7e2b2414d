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
``density`` is a fraction of the R_B x R_A entries of a core. The result depends on the basis up to
sign flips and permutations of its vectors (which change nothing), so the bases are the SVD's, of
the stored factors with the scale in B.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from pipeline.methods.lowrank import REL_TOL, FusedModule, _from_svd, _keep_count, zero_module
from pipeline.methods.registry import ModuleParams

# combine(cores, weights, p, name, idx) -> merged core; idx: the adapter indices of the cores
Combine = Callable[[list, list, ModuleParams, str, Sequence[int]], np.ndarray]


def bases(sources: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(Q_B (out, R_B), Q_A (in, R_A))`` of the present sources (float64)."""
    present = [s for s in sources if s is not None]
    b_stack = np.concatenate([np.asarray(s[1], np.float64) for s in present], axis=1)
    a_stack = np.concatenate([np.asarray(s[0], np.float64) for s in present], axis=0)
    q_b = np.linalg.svd(b_stack, full_matrices=False)[0]
    q_a = np.linalg.svd(a_stack, full_matrices=False)[2].T
    return q_b, q_a


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
        q_b, q_a = bases(sources)
        ms = cores([sources[i] for i in idx], q_b, q_a)
        merged = combine(ms, [p.weights[i] for i in idx], p, name, idx)
        return from_core(merged, q_b, q_a, p.rank, shape)
    return fuse
