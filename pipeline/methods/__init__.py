"""Fusion methods: the math of one module at a time, in numpy, with no file I/O.

``fuse_module(sources, shape, method, p, name)`` fuses one module with a registered method. Files:
``registry`` (Method, Param, ModuleParams, the checks; the module-function contract), ``catalog`` (the
registered methods), ``ops`` (the small reference operations), ``lowrank`` (stacked factors, exact
re-factoring, randomized SVD), ``dense`` (the blocked kernels of the masking methods),
``factor_space``, ``core_space``, and one file per method family (``task_vectors``, ``slerp``,
``gta``). docs/methods.md explains the math. Importing this package is cheap (no numpy); the math loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Sequence

from pipeline.errors import FusionError
from pipeline.methods import catalog  # noqa: F401  (registers the methods)
from pipeline.methods.registry import (CONSENSUS, METHODS, PARAMS, SCHEDULED, SIGN_METHODS, SPACES,
                                       Method, ModuleParams, Param, check_params, get_method, lazy,
                                       method_list, register)

_HEAVY = {
    "pipeline.methods.ops": ("agreement", "dare_mask", "dense_delta", "disjoint_mean", "elect_sign",
                             "keep_count", "merge_task_vectors", "prune_magnitude", "slerp_coefficients",
                             "slerp_pair", "source_rng", "svd_rng", "ties_merge"),
    "pipeline.methods.lowrank": ("REL_TOL", "FusedModule", "_triangular", "randomized_svd", "refactor_dense",
                                 "refactor_exact", "stack_factors", "zero_module"),
    "pipeline.methods.dense": ("magnitude_threshold", "merge_dense"),
    "numpy": (),
}
_WHERE = {name: mod for mod, names in _HEAVY.items() for name in names}


def __getattr__(name: str):
    if name == "np":
        return importlib.import_module("numpy")
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'pipeline.methods' has no attribute {name!r}")


def check_sources(sources: Sequence, shape: tuple[int, int], name: str) -> None:
    """FusionError unless every present source is ``(A (r, in), B (out, r))`` for ``shape`` (out, in)."""
    out, fin = shape
    for i, s in enumerate(sources):
        if s is None:
            continue
        a, b = s
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fin or b.shape[0] != out or a.shape[0] != b.shape[1]:
            raise FusionError(f"module {name}: adapter {i + 1} has factors A {tuple(a.shape)}, "
                              f"B {tuple(b.shape)}; expected A (r, {fin}) and B ({out}, r)")


def run_method(m: Method, sources: Sequence, shape: tuple[int, int], p: ModuleParams, name: str):
    """Fuse one module with ``m``, its parameters already checked (``check_params``): a FusedModule."""
    check_sources(sources, shape, name)
    if p.space == "factors":
        return m.factors(sources, shape, p, name)
    if all(s is None for s in sources):
        from pipeline.methods.lowrank import zero_module

        return zero_module(shape)
    if p.space == "core":
        return m.core(sources, shape, p, name)
    return m.delta(sources, shape, p, name)


def fuse_module(sources: Sequence, shape: tuple[int, int], method: str, p: ModuleParams, name: str):
    """Fuse one module: ``sources[i]`` is ``(A (r_i, in), B (out, r_i))`` with the scale folded
    into B, or None; ``shape`` is (out, in); ``name`` seeds the random streams."""
    check_params(method, len(sources), p)
    return run_method(METHODS[method], sources, shape, p, name)


__all__ = ["CONSENSUS", "METHODS", "PARAMS", "SCHEDULED", "SIGN_METHODS", "SPACES", "Method", "ModuleParams",
           "Param", "check_params", "check_sources", "fuse_module", "get_method", "lazy", "method_list", "register",
           "run_method", *_WHERE]
