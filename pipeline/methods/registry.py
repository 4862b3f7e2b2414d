"""The method registry: every fusion method by name, with what it reads and the functions that run it.

A :class:`Method` carries its behaviour: ``delta`` (and ``factors``, when it has a factor-space
form) fuse one module; ``default_weight`` and ``uses_weights`` say how it reads the weights; ``check``
holds the rules only it has. Everything that names methods (the command line's ``--method`` list and
help, default weights, params validation, the report's wording, the weight search) reads this
registry. Adding a method is one function plus one :func:`register` call.

A module function takes ``(sources, shape, p, name)``: ``sources[i]`` is ``(A (r_i, in), B (out, r_i))``
with the adapter's scale folded into ``B`` (or ``None`` for a source lacking the module), ``shape`` is
``(out, in)``, ``p`` the module's :class:`ModuleParams`, ``name`` the module name (it seeds random
streams). It returns a :class:`pipeline.methods.lowrank.FusedModule`.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass
from functools import cache
from typing import Callable

from pipeline.errors import FusionError

SIGN_METHODS = ("total", "frequency")
CONSENSUS = ("peft", "mergekit")
SPACES = ("delta", "factors", "core")
INNER_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Param:
    """A fusion parameter: its default and whether it may vary per layer (a list interpolated across
    the layers) and per module (set by a rule)."""
    name: str
    default: object
    help: str
    per_layer: bool = False


PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("weights", None, "one per adapter; negative subtracts; a list per adapter varies by layer",
          per_layer=True),
    Param("density", 1.0, "fraction of entries kept, in (0, 1]", per_layer=True),
    Param("majority_sign_method", "total", "sign election: total or frequency"),
    Param("consensus", "peft", "TIES convention: peft (elect on the unweighted values, divide by the "
          "number agreeing) or mergekit (elect on the weighted values, divide by the sum of the "
          "agreeing weights)"),
    Param("t", 0.5, "slerp position between two adapters, in [0, 1] (0 = the first)", per_layer=True),
    Param("rank", None, "output rank; null = the method's default"),
    Param("space", "delta", "delta (exact), factors (per-tensor average of lora_a / lora_b) or core "
          "(element-wise methods on the cores in the SVD bases of the stacked factors)"),
    Param("seed", 0, "seed of random masks and the randomized SVD"),
    Param("common_fraction", 0.8, "iso_cts: fraction of the spectrum given to the common subspace, in (0, 1]"),
    Param("inner_method", "ties", "knots: the element-wise merge in the shared basis: linear, ties, "
          "dare_linear or dare_ties"),
    Param("epsilon", 0.15, "della: spread of the keep probabilities around density, >= 0"),
    Param("gamma", 0.01, "breadcrumbs: fraction of the largest entries removed as outliers, in [0, 1)"),
)}
SCHEDULED = tuple(p.name for p in PARAMS.values() if p.per_layer)


@dataclass(frozen=True)
class ModuleParams:
    """The parameters one module is fused with (lists already interpolated at its layer)."""
    weights: tuple[float, ...]      # one per source, negative allowed
    density: float = 1.0            # (0, 1]
    majority_sign_method: str = "total"   # "total" | "frequency"
    consensus: str = "peft"         # "peft" | "mergekit"
    t: float = 0.5                  # slerp
    rank: int | None = None         # output rank; None = method default
    seed: int = 0
    space: str = "delta"            # "delta" | "factors" | "core"
    common_fraction: float = 0.8    # iso_cts
    inner_method: str = "ties"      # knots
    epsilon: float = 0.15           # della
    gamma: float = 0.01             # breadcrumbs


ModuleFn = Callable[[list, tuple, ModuleParams, str], object]


@dataclass(frozen=True)
class Method:
    """A registry entry: what a method is called, what it reads, what it guarantees, how it runs."""
    name: str
    summary: str
    params: tuple[str, ...]            # the parameters it reads (keys of PARAMS)
    delta: ModuleFn                    # fuse one module in delta space
    exact: bool                        # exact in delta space (no dense matrix, no sampling)
    factors: ModuleFn | None = None    # fuse one module in factor space; None = not offered
    core: ModuleFn | None = None       # fuse one module in core space; None = not offered
    default_weight: str = "one"        # "mean": 1/N each (an average); "one": 1 each
    min_adapters: int = 1
    max_adapters: int | None = None
    check: Callable[[int, ModuleParams], None] | None = None   # rules only this method has
    weights_ignored_for: int | None = None   # number of adapters at which the weights are not read

    @property
    def spaces(self) -> tuple[str, ...]:
        return ("delta",) + (("factors",) if self.factors is not None else ()) + \
            (("core",) if self.core is not None else ())

    def default_weights(self, n: int) -> list[float]:
        return [1.0 / n] * n if self.default_weight == "mean" else [1.0] * n

    def uses_weights(self, n: int) -> bool:
        """Whether fusing ``n`` adapters reads the weights (slerp of two reads ``t`` instead)."""
        return n != self.weights_ignored_for


METHODS: dict[str, Method] = {}


class lazy:
    """``module.attr`` (or ``module.attr(*args)`` when ``args`` are given), imported on first call, so
    that the registry (and the command line's help, which lists it) loads without numpy."""

    def __init__(self, module: str, attr: str, *args):
        self.module, self.attr, self.args = module, attr, args

    @cache
    def _target(self):
        fn = getattr(importlib.import_module(self.module), self.attr)
        return fn(*self.args) if self.args else fn

    def __call__(self, *a, **kw):
        return self._target()(*a, **kw)

    def __repr__(self) -> str:
        return f"lazy({self.module}.{self.attr}{self.args or ''})"


def register(method: Method) -> Method:
    """Add ``method`` to the registry (replacing one of the same name) and return it."""
    unknown = set(method.params) - set(PARAMS)
    if unknown:
        raise ValueError(f"method {method.name!r} reads unknown parameter(s) {sorted(unknown)}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``, or a FusionError listing the known ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise FusionError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def method_list(conjunction: str = "or") -> str:
    """``linear, concat, ... or magnitude_prune``: the registered names, for help texts."""
    names = list(METHODS)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


def method_help() -> str:
    """One paragraph per registered method, ``name (spaces): summary``, for the command line's help."""
    return "\n\n".join(f"{m.name} ({', '.join(m.spaces)} space): {m.summary}." for m in METHODS.values())


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_params(method: str, n_sources: int, p: ModuleParams) -> None:
    """Raise FusionError for any user mistake in ``method``/``p``; cheap, call it before the math."""
    m = get_method(method)
    if p.space not in SPACES:
        raise FusionError(f"space must be one of {', '.join(SPACES)}, got {p.space!r}")
    if p.space not in m.spaces:
        raise FusionError(f"method {method!r} works in {' or '.join(m.spaces)} space, not space {p.space!r}")
    if n_sources < m.min_adapters:
        raise FusionError(f"method {method!r} needs at least {m.min_adapters} adapters, got {n_sources}")
    if m.max_adapters is not None and n_sources > m.max_adapters:
        raise FusionError(f"method {method!r} takes at most {m.max_adapters} adapters, got {n_sources}")
    w = p.weights
    if not isinstance(w, (tuple, list)) or len(w) != n_sources:
        got = len(w) if isinstance(w, (tuple, list)) else "no list of"
        raise FusionError(f"{got} weights for {n_sources} adapters: give one weight per adapter")
    if not all(_is_real(x) and math.isfinite(x) and abs(x) <= FLOAT32_MAX for x in w):
        raise FusionError(f"weights must be finite numbers (in float32, where the math runs), got {list(w)!r}")
    if not _is_real(p.density) or not (0.0 < p.density <= 1.0):
        raise FusionError(f"density must be in (0, 1], got {p.density!r}")
    if not _is_real(p.t) or not (0.0 <= p.t <= 1.0):
        raise FusionError(f"t must be in [0, 1], got {p.t!r}")
    if p.majority_sign_method not in SIGN_METHODS:
        raise FusionError(f"majority_sign_method must be 'total' or 'frequency', "
                          f"got {p.majority_sign_method!r}")
    if p.consensus not in CONSENSUS:
        raise FusionError(f"consensus must be 'peft' or 'mergekit', got {p.consensus!r}")
    if p.rank is not None and (not _is_int(p.rank) or p.rank < 1):
        raise FusionError(f"rank must be a positive integer, got {p.rank!r}")
    if not _is_int(p.seed) or p.seed < 0:
        raise FusionError(f"seed must be a non-negative integer, got {p.seed!r}")
    if not _is_real(p.common_fraction) or not (0.0 < p.common_fraction <= 1.0):
        raise FusionError(f"common_fraction must be in (0, 1], got {p.common_fraction!r}")
    if p.inner_method not in INNER_METHODS:
        raise FusionError(f"inner_method must be one of {', '.join(INNER_METHODS)}, got {p.inner_method!r}")
    if not _is_real(p.epsilon) or not (0.0 <= p.epsilon < 1.0):
        raise FusionError(f"epsilon must be in [0, 1), got {p.epsilon!r}")
    if not _is_real(p.gamma) or not (0.0 <= p.gamma < 1.0):
        raise FusionError(f"gamma must be in [0, 1), got {p.gamma!r}")
    if m.check is not None:
        m.check(n_sources, p)
