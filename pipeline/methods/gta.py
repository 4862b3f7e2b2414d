"""DELLA and Model Breadcrumbs as mergekit 0.1.5 defines them: its generalized task arithmetic (GTA),
parametrised by how to sparsify (``della``: per-row magnitude-ranked keep probabilities with an L1
rescale; ``breadcrumbs``: drop the smallest entries and the largest outliers) and whether to elect
signs (on the WEIGHTED values, as mergekit does).

``della`` (election, divided by the sum of the agreeing weights), ``della_linear`` (weighted sum),
``breadcrumbs`` (weighted sum), ``breadcrumbs_ties`` (election, the agreeing weighted values summed,
not divided: mergekit's ``normalize: false``). mergekit's ``lambda`` is 1 (the weights scale).

Delta space: each present source's dense delta (out x in, float32), merged, re-factored to the output
rank (default: the largest input rank) by randomized SVD, as the other masking methods. Core space:
the same element-wise merge on the cores (:mod:`pipeline.methods.core_space`). The DELLA stream of
source ``i`` is ``source_rng(seed, name, i)``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from pipeline.errors import FusionError
from pipeline.methods.lowrank import FusedModule, refactor_dense
from pipeline.methods.ops import agreement, dense_delta, elect_sign, source_rng, svd_rng
from pipeline.methods.registry import ModuleParams

L1_EPS = 1e-7   # mergekit's rescaled_masked_tensor: no rescale when either L1 norm is below this

# method -> (sparsifier, elect a sign, divide by the sum of the agreeing weights)
KINDS = {
    "della": ("della", True, True),
    "della_linear": ("della", False, False),
    "breadcrumbs": ("breadcrumbs", False, False),
    "breadcrumbs_ties": ("breadcrumbs", True, False),
}


def stable_row_order(mag: np.ndarray) -> np.ndarray:
    """``np.argsort(mag, axis=1, kind="stable")``, at the speed of the default (vectorised) sort: that
    order, with only the rows that hold equal values sorted again stably (a fifth of the time on a
    Llama-1B MLP module, where a few rows in ten hold a tie in float32)."""
    order = np.argsort(mag, axis=1)
    s = np.take_along_axis(mag, order, axis=1)
    tied = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
    if tied.size:
        order[tied] = np.argsort(mag[tied], axis=1, kind="stable")
    return order


def della_probabilities(x: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """mergekit's ``della_magprune`` keep probabilities (the shape and float dtype of ``x`` (rows,
    cols)): in each row, ``density - epsilon + 2 epsilon (rank - 1) / (cols - 1)`` with rank 1 the
    smallest ``|x|`` (a stable sort breaks ties), computed in the order and precision mergekit uses;
    their mean over a row is ``density``. One column: ``density`` (mergekit's formula is 0/0 there)."""
    rows, cols = x.shape
    dt = x.dtype.type
    if cols == 1:
        return np.full(x.shape, dt(density))
    order = stable_row_order(np.abs(x))
    rank = np.empty(x.shape, x.dtype)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(cols, dtype=x.dtype), x.shape), axis=1)
    rank /= dt(cols - 1)
    rank *= dt(2)
    rank *= dt(epsilon)
    rank += dt(density - epsilon)
    return rank


def l1_rescale(x: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """``masked * |x|_1 / |masked|_1`` over the whole tensor (mergekit's ``rescale: true``), or
    ``masked`` as it is when either norm is below 1e-7."""
    before = float(np.abs(x).sum(dtype=np.float64))
    after = float(np.abs(masked).sum(dtype=np.float64))
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * masked.dtype.type(before / after)


def della_prune(x: np.ndarray, density: float, epsilon: float, rng: np.random.Generator | None = None,
                keep: np.ndarray | None = None) -> np.ndarray:
    """DELLA's MAGPRUNE: keep each entry with its ``della_probabilities`` (``u < p``, ``u`` uniform
    float32 draws of ``rng`` in row order; or the given ``keep`` mask), then the L1 rescale.
    ``density >= 1`` keeps everything, unscaled."""
    if density >= 1.0:
        return x
    check_della(density, epsilon)
    if keep is None:
        keep = rng.random(x.shape, dtype=np.float32) < della_probabilities(x, density, epsilon)
    return l1_rescale(x, np.where(keep, x, np.zeros((), x.dtype)))


def breadcrumbs_prune(x: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit 0.1.5's ``magnitude_outliers``, over the whole tensor: with ``n`` entries sorted by
    ``|x|`` ascending, keep the positions ``[n_bot, n_bot + int(density n))``, where
    ``n_bot = max(0, n - int(density n) - int(gamma n))``: the ``int(gamma n)`` largest are
    outliers (fewer when ``density + gamma > 1``), the smallest are dropped. Selected by value
    (``lo <= |x| <= hi``), so entries tied with a threshold are all kept. ``density >= 1`` keeps all."""
    if density >= 1.0:
        return x
    mag = np.abs(x).ravel()
    n = mag.size
    target = int(density * n)
    if target == 0:
        return np.zeros_like(x)
    n_bot = max(0, n - target - int(gamma * n))
    part = np.partition(mag, [n_bot, n_bot + target - 1])
    lo, hi = part[n_bot], part[n_bot + target - 1]
    a = np.abs(x)
    return np.where((a >= lo) & (a <= hi), x, np.zeros((), x.dtype))


def check_della(density: float, epsilon: float) -> None:
    if density < 1.0 and (density + epsilon >= 1.0 or density - epsilon <= 0.0):
        raise FusionError(f"della needs density - epsilon > 0 and density + epsilon < 1 (keep probabilities "
                          f"in (0, 1)), got density {density!r}, epsilon {epsilon!r}")


def check(n: int, p: ModuleParams) -> None:
    """The rule only della has (density 1 prunes nothing and is always allowed)."""
    check_della(p.density, p.epsilon)


def gta_merge(values: np.ndarray, weights: Sequence[float], method: str | None, normalize: bool) -> np.ndarray:
    """mergekit's GTA merge of the WEIGHTED sparsified values ``values`` (n, ...): with ``method``
    (``total`` = its ``sum``, ``frequency`` = its ``count``) the sign elected on them (a zero sum
    elects +), the agreeing values (zeros never agree) summed, and with ``normalize`` divided by
    the sum of the agreeing weights (0 divides by 1); without ``method`` the plain sum."""
    if method is None:
        return values.sum(axis=0)
    agree = agreement(values, elect_sign(values, method))
    total = np.where(agree, values, np.zeros((), values.dtype)).sum(axis=0)
    if not normalize:
        return total
    divisor = np.zeros(values.shape[1:], values.dtype)
    for i, w in enumerate(weights):
        divisor = divisor + np.where(agree[i], values.dtype.type(w), np.zeros((), values.dtype))
    return total / np.where(divisor == 0, np.ones((), values.dtype), divisor)


def merge(kind: str, tensors: Iterable[np.ndarray], weights: Sequence[float], p: ModuleParams,
          rngs: Sequence[np.random.Generator] | None = None) -> np.ndarray:
    """The method ``kind`` (a key of ``KINDS``) on the tensors (one per weight): sparsify each,
    weight it, merge. ``rngs[i]`` draws tensor i's DELLA mask."""
    sparsifier, elect, normalize = KINDS[kind]
    out = stack = None
    for i, (x, w) in enumerate(zip(tensors, weights)):
        if sparsifier == "della":
            x = della_prune(x, p.density, p.epsilon, rngs[i])
        else:
            x = breadcrumbs_prune(x, p.density, p.gamma)
        x = x * x.dtype.type(w)
        if elect:
            if stack is None:
                stack = np.empty((len(weights), *x.shape), x.dtype)
            stack[i] = x
        else:
            out = x if out is None else out + x
    if elect:
        return gta_merge(stack, weights, p.majority_sign_method, normalize)
    return out


def on_cores(kind: str):
    """The core-space function of ``kind`` (:mod:`pipeline.methods.core_space`): the same merge on the
    present sources' cores; source ``i``'s DELLA stream draws its core's mask."""
    from pipeline.methods.core_space import in_core_space

    def combine(ms, weights, p: ModuleParams, name: str, idx: Sequence[int]) -> np.ndarray:
        return merge(kind, ms, weights, p, [source_rng(p.seed, name, i) for i in idx])
    return in_core_space(combine)


def on_deltas(kind: str):
    """The delta-space function of ``kind``: the present sources' dense deltas (float32) merged, then a
    randomized SVD to the output rank."""
    def fuse(sources, shape, p: ModuleParams, name: str) -> FusedModule:
        idx = [i for i, s in enumerate(sources) if s is not None]
        deltas = (dense_delta(sources[i], shape) for i in idx)
        merged = merge(kind, deltas, [p.weights[i] for i in idx], p, [source_rng(p.seed, name, i) for i in idx])
        ranks = [sources[i][0].shape[0] for i in idx]
        rank = p.rank if p.rank is not None else max(ranks)
        return refactor_dense(merged, rank, svd_rng(p.seed, name), signal_rank=sum(ranks))
    return fuse
