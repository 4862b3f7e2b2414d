"""Spherical interpolation of the deltas (barycentric for three or more), exact through stacked factors.

Two sources: ``sin((1-t)th)/sin(th) dW_1 + sin(t th)/sin(th) dW_2``, the angle from Frobenius inner
products of the low-rank products (never a dense matrix), linear interpolation when nearly parallel
or when either delta is zero; the weights are not read. Three or more: pairwise slerps in adapter
order with the (non-negative) weights as barycentric coordinates; ``t`` is not read.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import FusionError
from pipeline.geometry import gram_matrix
from pipeline.methods.factor_space import in_factor_space
from pipeline.methods.lowrank import FusedModule, refactor_exact, stack_factors
from pipeline.methods.ops import slerp_coefficients
from pipeline.methods.registry import ModuleParams


def slerp(sources, shape, p: ModuleParams, name: str) -> FusedModule:
    coeffs = slerp_coefficients(gram_matrix(sources), p.weights, p.t)
    bc, ac = stack_factors(sources, coeffs, shape)
    return refactor_exact(bc, ac, p.rank)


def _interp(ts: list, p: ModuleParams) -> np.ndarray:
    flat = np.stack([x.ravel().astype(np.float64) for x in ts])
    c = slerp_coefficients(flat @ flat.T, p.weights, p.t)
    return np.tensordot(c, np.stack(ts).astype(np.float64), axes=1).astype(np.float32)


def _factors(As, Bs, p: ModuleParams, name: str):
    """The flattened A's and, separately, the flattened B's interpolated by the same rules."""
    return _interp(As, p), _interp(Bs, p)


slerp_factors = in_factor_space(_factors)


def check(n: int, p: ModuleParams) -> None:
    w = p.weights
    if any(x < 0 for x in w):
        raise FusionError(f"slerp weights are barycentric coordinates and cannot be negative, "
                          f"got {list(w)!r}")
    if n > 2 and sum(w) <= 0:
        raise FusionError(f"slerp of {n} adapters needs weights with a positive sum, got {list(w)!r}")
