"""What a fusion is asked to do: :class:`FusionSpec`, checked once, and resolved per module.

Parameter precedence, for each module: the first rule in ``rules`` whose ``match`` is a substring of
the module name (``self_attn``, ``mlp.down_proj``, ``layers.3.``) > the fusion's own value. The
parameters the registry declares ``per_layer`` (``weights`` per adapter, ``density``, ``t``) may be a
list of values spread evenly over the layers and linearly interpolated in between: ``density:
[0.3, 0.9]`` goes from 0.3 on the first layer to 0.9 on the last. The layers are 0..L-1 with L-1
the highest layer index any input adapts; a module outside the numbered layers takes the last value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from pipeline.errors import FusionError
from pipeline.methods.registry import PARAMS, SCHEDULED, SPACES, ModuleParams, check_params, get_method


@dataclass
class FusionSpec:
    """A method and its parameters (defaults: the registry's ``PARAMS``)."""
    method: str = "linear"
    weights: list | None = PARAMS["weights"].default
    density: float | list = PARAMS["density"].default
    majority_sign_method: str = PARAMS["majority_sign_method"].default
    consensus: str = PARAMS["consensus"].default
    t: float | list = PARAMS["t"].default
    rank: int | None = PARAMS["rank"].default
    space: str = PARAMS["space"].default
    seed: int = PARAMS["seed"].default
    common_fraction: float = PARAMS["common_fraction"].default
    inner_method: str = PARAMS["inner_method"].default
    epsilon: float = PARAMS["epsilon"].default
    gamma: float = PARAMS["gamma"].default
    rules: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _interp(value, pos: float, what: str):
    """A scalar, or a list of values spread over [0, 1] and interpolated at ``pos``."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise FusionError(f"{what}: empty list")
        if len(value) == 1:
            return float(value[0])
        xs = np.linspace(0.0, 1.0, len(value))
        return float(np.interp(pos, xs, np.asarray(value, dtype=np.float64)))
    return value


def _with_rule(spec: FusionSpec, rule: dict) -> FusionSpec:
    return replace(spec, **{k: v for k, v in rule.items() if k in SCHEDULED})


def module_params(spec: FusionSpec, name: str, layer: int | None, n_layers: int, n: int) -> ModuleParams:
    """Resolve the parameters one module is fused with (rules > fusion values; lists per layer)."""
    eff = spec
    for rule in spec.rules:
        if rule["match"] in name:
            eff = _with_rule(spec, rule)
            break
    pos = 1.0 if layer is None else (layer / (n_layers - 1) if n_layers > 1 else 0.0)
    weights = eff.weights if eff.weights is not None else get_method(spec.method).default_weights(n)
    return ModuleParams(
        weights=tuple(float(_interp(w, pos, "weights")) for w in weights),
        density=float(_interp(eff.density, pos, "density")),
        majority_sign_method=spec.majority_sign_method,
        consensus=spec.consensus,
        t=float(_interp(eff.t, pos, "t")),
        rank=spec.rank,
        seed=spec.seed,
        space=spec.space,
        common_fraction=spec.common_fraction,
        inner_method=spec.inner_method,
        epsilon=spec.epsilon,
        gamma=spec.gamma,
    )


def _numbers(v) -> bool:
    vals = v if isinstance(v, (list, tuple)) else [v]
    return bool(vals) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals)


def _check_shape(spec: FusionSpec, n: int, where: str) -> None:
    w = spec.weights
    if w is not None:
        if not isinstance(w, (list, tuple)) or len(w) != n:
            raise FusionError(f"{where}: {len(w) if isinstance(w, (list, tuple)) else 1} weights for "
                              f"{n} adapters: give one weight per adapter")
        for x in w:
            if not _numbers(x):
                raise FusionError(f"{where}: weights must be numbers (or a list per adapter), got {x!r}")
    for name in ("density", "t"):
        v = getattr(spec, name)
        if not _numbers(v):
            raise FusionError(f"{where}: {name} must be a number or a list of numbers, got {v!r}")


def check_spec(spec: FusionSpec, n: int, where: str = "fusion") -> None:
    """Every user mistake in ``spec`` for ``n`` adapters as a FusionError, before any heavy work:
    the spec's own types, then every value a module could see (list ends and each list element)."""
    try:
        get_method(spec.method)
    except FusionError as e:
        raise FusionError(f"{where}: {e}") from None
    if spec.space not in SPACES:
        raise FusionError(f"{where}: space must be one of {', '.join(SPACES)}, got {spec.space!r}")
    for name in ("common_fraction", "epsilon", "gamma"):
        if not _numbers(getattr(spec, name)) or isinstance(getattr(spec, name), (list, tuple)):
            raise FusionError(f"{where}: {name} must be a number, got {getattr(spec, name)!r}")
    if spec.rank is not None and (not isinstance(spec.rank, int) or isinstance(spec.rank, bool) or spec.rank < 1):
        raise FusionError(f"{where}: rank must be a positive integer, got {spec.rank!r}")
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool):
        raise FusionError(f"{where}: seed must be an integer, got {spec.seed!r}")
    _check_shape(spec, n, where)
    for i, rule in enumerate(spec.rules):
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str) or not rule["match"]:
            raise FusionError(f"{where}: rule {i + 1} needs a non-empty 'match' (a module-name substring)")
        unknown = set(rule) - {"match", *SCHEDULED}
        if unknown:
            raise FusionError(f"{where}: rule {rule['match']!r} sets {', '.join(sorted(unknown))}; "
                              f"rules may set {', '.join(SCHEDULED)}")
        _check_shape(_with_rule(spec, rule), n, f"{where}: rule {rule['match']!r}")
    try:
        for pos_spec in [spec] + [_with_rule(spec, r) for r in spec.rules]:
            for pos in (0.0, 1.0):
                check_params(spec.method, n, module_params(pos_spec, "", None if pos == 1.0 else 0, 2, n))
            for name in ("density", "t"):
                v = getattr(pos_spec, name)
                for x in (v if isinstance(v, (list, tuple)) else [v]):
                    check_params(spec.method, n,
                                 replace(module_params(pos_spec, "", None, 2, n), **{name: float(x)}))
    except FusionError as e:
        raise FusionError(f"{where}: {e}") from None
