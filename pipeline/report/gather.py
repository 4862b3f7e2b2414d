"""Collect the report's inputs into the one structure the writers use, checking them against each other.

``collect`` returns ``{"tasks", "task_of", "base", "adapters", "fusions", "tolerance", "base_model",
"generations"}``;
each fusion carries its adapters, resolved settings, scores, retention (``pipeline.evaluate.retention``),
the fuse record (``info``), its per-module figures (``modules``) and its stored geometry summary
(``geometry``, ``pipeline.geometry.summarize`` as the fuse step recorded it). Nothing here runs a model.
"""

from __future__ import annotations

from pipeline.errors import FusionError
from pipeline.evaluate import retention

GENERATIONS = "generations"  # the key of an evaluation's free-form answers: not a task name


def collect(params: dict, baselines: dict, evals: dict, infos: dict, tasks_of: dict,
            tolerance: float) -> dict:
    """Check the inputs against each other and compute retention: the one structure the writers use."""
    if not params:
        raise FusionError("no fusions to report")
    base = _tasks_only(baselines.get("base") or {})
    adapters = {name: _tasks_only(ev) for name, ev in (baselines.get("adapters") or {}).items()}
    task_of = {name: tasks_of.get(name, name) for name in adapters}
    fusions = {}
    for name, spec in params.items():
        sources = list(spec.get("adapters") or [])
        if not sources:
            raise FusionError(f"fusion {name!r}: no adapters listed")
        missing = [a for a in sources if a not in adapters]
        if missing:
            raise FusionError(f"fusion {name!r}: no baseline evaluation of adapter(s) {', '.join(missing)}")
        if name not in evals:
            raise FusionError(f"fusion {name!r}: no evaluation")
        ev = _tasks_only(evals[name])
        ret = retention(ev, {a: adapters[a] for a in sources}, {a: task_of[a] for a in sources},
                        base, tolerance)
        info = infos.get(name) or {}
        settings = {k: v for k, v in spec.items() if k != "adapters"}
        for k, v in (info.get("params") or {}).items():
            if k != "adapters":
                settings.setdefault(k, v)
        if "method" not in settings and "method" in info:
            settings["method"] = info["method"]
        fusions[name] = {
            "adapters": sources,
            "settings": settings,
            "eval": ev,
            "retention": ret,
            "other_tasks": [t for t in ev if t not in ret["tasks"]],
            "info": info,
            "modules": info.get("modules") or {},
            "geometry": info.get("geometry") or {},
            "generations": evals[name].get(GENERATIONS) or {},
        }
    tasks: list[str] = []
    for table in [base, *adapters.values(), *(f["eval"] for f in fusions.values())]:
        tasks += [t for t in table if t not in tasks]
    return {
        "tasks": tasks,
        "task_of": task_of,
        "base": base,
        "adapters": adapters,
        "fusions": fusions,
        "tolerance": tolerance,
        "base_model": baselines.get("base_model") or {},  # its identity (pipeline.basemodel)
        "generations": {
            "base": (baselines.get("base") or {}).get(GENERATIONS) or {},
            **{f"adapter {a}": (ev or {}).get(GENERATIONS) or {}
               for a, ev in (baselines.get("adapters") or {}).items()},
            **{f"fusion {n}": f["generations"] for n, f in fusions.items()},
        },
    }


def _tasks_only(ev: dict) -> dict:
    return {t: m for t, m in ev.items() if t != GENERATIONS}


def best_fusions(data: dict) -> dict[str, tuple[str, float] | None]:
    """``{objective: (fusion, value)}`` for the highest mean and the highest worst-task retention.

    Ties go to the fusion listed first; ``None`` when no fusion has the figure.
    """
    out = {}
    for key in ("mean_retention", "worst_retention"):
        best = None
        for name, f in data["fusions"].items():
            value = f["retention"][key]
            if value is not None and (best is None or value > best[1]):
                best = (name, value)
        out[key] = best
    return out
