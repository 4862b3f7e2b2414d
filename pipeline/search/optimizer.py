"""Find fusion weights without gradients: CMA-ES over a fixed budget of evaluations.

``search(objective, x0, budget=..., seed=...)`` maximises any ``objective(x) -> float`` with the
``cma`` library's CMA-ES (ask/tell), inside ``bounds``. The budget counts calls of ``objective``
exactly (the start point is the first; a point already evaluated is looked up, not re-evaluated), and
the same ``seed`` and objective give the same trace. The result is never worse than the start.

The weights of a fusion of ``n`` adapters are a vector of ``n * groups`` numbers: one per adapter
(``groups == 1``) or, per adapter, ``groups`` control points spread evenly across the layers and
interpolated in between (the per-layer weight lists of ``pipeline.fuse``). ``weights_vector`` and
``vector_weights`` convert both ways.

Nothing here fuses or evaluates: the caller's objective does (``pipeline/search/run.py`` fuses
into a temporary directory and scores retention on the validation sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.errors import FusionError

OBJECTIVES = ("mean_retention", "worst_retention")
SETTINGS = {
    "enabled": False,           # run the search stage in `dvc repro` (the command always runs)
    "fusion": None,             # the fusion whose adapters and settings the search starts from
    "budget": 24,               # evaluations of the objective, the start point included
    "seed": 0,
    "bounds": [0.0, 1.5],       # range of every weight
    "layer_groups": 1,          # weights per adapter: 1, or G control points across the layers
    "objective": "mean_retention",
    "max_examples": None,       # validation examples per task per evaluation (None: eval.max_examples)
    "backend": "local",         # where evaluations run: local (this process) or ray
    "ray_address": None,        # the Ray cluster (None: a local Ray started for the run)
    "workers": None,            # Ray workers, one CPU and one loaded base model each (None: the cluster's CPUs)
}


@dataclass
class SearchResult:
    best: list[float]        # the best point found (rounded as evaluated)
    value: float             # its objective value
    start: list[float]
    start_value: float
    trace: list[dict]        # per evaluation: {"evaluation", "x", "value", "best"}

    @property
    def evaluations(self) -> int:
        return len(self.trace)


def settings(section: dict | None, where: str = "params.yaml: search") -> dict:
    """The ``search:`` section with defaults filled in; raise on unknown keys or bad values."""
    section = section or {}
    if not isinstance(section, dict):
        raise FusionError(f"{where}: expected a mapping")
    unknown = set(section) - set(SETTINGS)
    if unknown:
        raise FusionError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(SETTINGS)})")
    s = {**SETTINGS, **section}

    def whole(key: str, low: int) -> None:
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise FusionError(f"{where}.{key}: expected a whole number >= {low}, got {v!r}")

    whole("budget", 1)
    whole("seed", 0)
    whole("layer_groups", 1)
    if s["max_examples"] is not None:
        whole("max_examples", 1)
    if not isinstance(s["enabled"], bool):
        raise FusionError(f"{where}.enabled: expected true or false, got {s['enabled']!r}")
    b = s["bounds"]
    if (not isinstance(b, list) or len(b) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                             and math.isfinite(x) for x in b) or b[0] >= b[1]):
        raise FusionError(f"{where}.bounds: expected [LOW, HIGH] with LOW < HIGH, got {b!r}")
    s["bounds"] = [float(b[0]), float(b[1])]
    if s["objective"] not in OBJECTIVES:
        raise FusionError(f"{where}.objective: expected one of {', '.join(OBJECTIVES)}, got {s['objective']!r}")
    if s["fusion"] is not None and not isinstance(s["fusion"], str):
        raise FusionError(f"{where}.fusion: expected a fusion name, got {s['fusion']!r}")
    from pipeline.params import check_search_backend

    check_search_backend(s, where)
    return s


# ---------------------------------------------------------------------------- weights <-> vector


def weights_vector(weights: list, n: int, groups: int) -> list[float]:
    """A fusion's weights (one number, or one list across layers, per adapter) as a search vector."""
    if not isinstance(weights, list) or len(weights) != n:
        raise FusionError(f"expected {n} weights, got {weights!r}")
    x = []
    for w in weights:
        if isinstance(w, (list, tuple)):
            xs = np.linspace(0.0, 1.0, len(w)) if len(w) > 1 else np.zeros(1)
            points = np.interp(np.linspace(0.0, 1.0, groups), xs, np.asarray(w, dtype=np.float64))
            x += [float(p) for p in points]
        else:
            x += [float(w)] * groups
    return x


def vector_weights(x, n: int, groups: int) -> list:
    """A search vector back as fusion weights: ``[w, ...]`` or ``[[w_layer_group, ...], ...]``."""
    values = [float(v) for v in x]
    if len(values) != n * groups:
        raise FusionError(f"expected {n * groups} numbers for {n} adapters x {groups} layer groups")
    if groups == 1:
        return values
    return [values[i * groups:(i + 1) * groups] for i in range(n)]


# ---------------------------------------------------------------------------- the search


def search(objective: Callable[[list[float]], float] | None, x0, *, budget: int, seed: int = 0,
           bounds: tuple[float, float] = (0.0, 1.5), sigma: float | None = None, decimals: int = 3,
           on_evaluation: Callable[[dict], None] | None = None,
           population: Callable[[list[list[float]]], list[float]] | None = None) -> SearchResult:
    """Maximise ``objective`` from ``x0`` with CMA-ES, calling it at most ``budget`` times.

    Points are clipped to ``bounds`` and rounded to ``decimals`` before they are evaluated, so the
    reported best point is exactly one that was evaluated. ``sigma`` (the initial step) defaults to a
    quarter of the bounds' width. ``on_evaluation(row)`` is called after every evaluation with the
    trace row. Needs at least two dimensions (CMA-ES does not work in 1-D).

    ``population(points) -> values`` (instead of ``objective``) evaluates the new points of one
    generation at once, for example in parallel; values come back in the order of ``points``, so the
    trace, the points asked next and the result are the same as with ``objective`` point by point,
    whichever evaluation finishes first.
    """
    import cma

    lo, hi = float(bounds[0]), float(bounds[1])
    if budget < 1:
        raise FusionError(f"search budget must be at least 1, got {budget}")
    if len(x0) < 2:
        raise FusionError("the search needs at least two weights to tune (two adapters, or layer_groups > 1)")
    if population is None:
        if objective is None:
            raise FusionError("the search needs an objective or a population evaluator")

        def population(points):
            return [objective(list(x)) for x in points]

    def point(x) -> list[float]:
        return [round(min(max(float(v), lo), hi), decimals) for v in x]

    seen: dict[tuple, float] = {}
    trace: list[dict] = []

    def evaluate(points: list[list[float]]) -> None:
        """Evaluate the points not seen yet, in order, while the budget lasts."""
        new: list[list[float]] = []
        for x in points:
            key = tuple(x)
            if key in seen or any(key == tuple(y) for y in new):
                continue
            if len(trace) + len(new) >= budget:
                break
            new.append(list(x))
        values = list(population(new)) if new else []
        if len(values) != len(new):
            raise FusionError(f"the search's evaluator gave {len(values)} values for {len(new)} points")
        for x, value in zip(new, values):
            if value is None or not math.isfinite(value):
                raise FusionError(f"the search objective gave {value!r} at {list(x)}")
            value = float(value)
            seen[tuple(x)] = value
            best = max(value, trace[-1]["best"]) if trace else value
            row = {"evaluation": len(trace) + 1, "x": list(x), "value": value, "best": best}
            trace.append(row)
            if on_evaluation is not None:
                on_evaluation(row)

    start = point(x0)
    evaluate([start])
    start_value = seen[tuple(start)]
    # cma treats seed 0 as "seed from the clock"; shift so every seed is a fixed one.
    es = cma.CMAEvolutionStrategy(start, sigma or 0.25 * (hi - lo),
                                  {"bounds": [lo, hi], "seed": seed + 1, "verbose": -9})
    asks = 0
    while len(trace) < budget and not es.stop() and asks < 100 * budget:
        asks += 1
        xs = es.ask()
        points = [point(x) for x in xs]
        evaluate(points)
        if not all(tuple(x) in seen for x in points):
            break  # budget spent mid-generation
        es.tell(xs, [-seen[tuple(x)] for x in points])
    best_key = max(seen, key=lambda k: (seen[k], k == tuple(start)))
    return SearchResult(list(best_key), seen[best_key], start, start_value, trace)


def trace_figure(trace: list[dict], ylabel: str, title: str, start_value: float | None = None) -> bytes:
    """PNG of a search trace: each evaluation's value and the best so far (no metadata: same bytes)."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    xs = [r["evaluation"] for r in trace]
    ax.scatter(xs, [r["value"] for r in trace], s=18, color="#1f77b4", label="evaluation", zorder=3)
    ax.step(xs, [r["best"] for r in trace], where="post", color="#d62728", label="best so far")
    if start_value is not None:
        ax.axhline(start_value, color="#a0a0a0", linestyle="--", linewidth=1, label="start")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
