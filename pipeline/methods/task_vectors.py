"""The task-vector family, one core parametrised by how to sparsify and whether to elect signs:
``linear`` (neither), ``magnitude_prune`` (magnitude), ``ties`` (magnitude + election),
``dare_linear`` (random), ``dare_ties`` (random + election).

Delta space: ``linear`` and ``concat`` are exact through the stacked factors; the masking methods form
each present source's dense delta block by block (:mod:`pipeline.methods.dense`), then re-factor the
merge to the output rank (default: the largest input rank) by randomized SVD, with its error. The
DARE stream of source ``i`` is ``source_rng(seed, name, i)``; the SVD's is ``svd_rng(seed, name)``.
"""

from __future__ import annotations

import numpy as np

from pipeline.methods.dense import merge_dense, workspace
from pipeline.methods.factor_space import in_factor_space
from pipeline.methods.lowrank import FusedModule, column_coeffs, refactor_dense, refactor_exact, stack_factors
from pipeline.methods.ops import merge_task_vectors, source_rng, svd_rng
from pipeline.methods.registry import ModuleParams


def linear(sources, shape, p: ModuleParams, name: str) -> FusedModule:
    """``sum_i w_i dW_i`` through the stacked factors, re-factored exactly (or to ``rank``)."""
    bc, ac = stack_factors(sources, p.weights, shape)
    return refactor_exact(bc, ac, p.rank, coeffs=column_coeffs(sources, p.weights))


def concat(sources, shape, p: ModuleParams, name: str) -> FusedModule:
    """The stacked factors of the weighted deltas as they are (rank = the sum of the ranks), re-factored
    only when ``rank`` asks for fewer."""
    bc, ac = stack_factors(sources, p.weights, shape)
    if p.rank is None or p.rank >= ac.shape[0]:
        return FusedModule(ac.astype(np.float32), bc.astype(np.float32), ac.shape[0], 0.0)
    return refactor_exact(bc, ac, p.rank)


def masked(sparsify: str | None, elect: bool):
    """The delta-space function of a masking method: merge the present sources' dense deltas, then a
    randomized SVD to the output rank."""
    def fuse(sources, shape, p: ModuleParams, name: str) -> FusedModule:
        idx = [i for i, s in enumerate(sources) if s is not None]
        rngs = [source_rng(p.seed, name, i) for i in idx] if sparsify == "random" else None
        merged, norm2 = merge_dense([sources[i] for i in idx], [p.weights[i] for i in idx], shape,
                                    sparsify=sparsify, density=p.density,
                                    elect=p.majority_sign_method if elect else None,
                                    consensus=p.consensus, rngs=rngs, out=workspace(shape))
        ranks = [sources[i][0].shape[0] for i in idx]
        rank = p.rank if p.rank is not None else max(ranks)
        return refactor_dense(merged, rank, svd_rng(p.seed, name), norm2=norm2, signal_rank=sum(ranks))
    return fuse


def on_factors(sparsify: str | None, elect: bool):
    """The factor-space function: the same sparsify / elect on each factor tensor (the DARE stream of
    source ``i`` draws A's mask, then B's)."""
    def combine(As, Bs, p: ModuleParams, name: str):
        rngs = [source_rng(p.seed, name, i) for i in range(len(As))] if sparsify == "random" else None
        kw = dict(sparsify=sparsify, density=p.density,
                  elect=p.majority_sign_method if elect else None, consensus=p.consensus, rngs=rngs)
        return merge_task_vectors(As, p.weights, **kw), merge_task_vectors(Bs, p.weights, **kw)
    return in_factor_space(combine)


def on_cores(sparsify: str | None, elect: bool):
    """The core-space function (:mod:`pipeline.methods.core_space`): the same sparsify / elect, in the
    fusion's ``consensus``, on the present sources' cores (source ``i``'s DARE stream draws its core's
    mask); ``linear`` (neither) is the weighted sum, exact."""
    from pipeline.methods.core_space import in_core_space

    def combine(ms, weights, p: ModuleParams, name: str, idx):
        rngs = [source_rng(p.seed, name, i) for i in idx] if sparsify == "random" else None
        return merge_task_vectors(ms, weights, sparsify=sparsify, density=p.density,
                                  elect=p.majority_sign_method if elect else None, consensus=p.consensus,
                                  rngs=rngs)
    return in_core_space(combine)
