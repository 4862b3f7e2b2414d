"""Collect the report's inputs into the one structure the writers use, checking them against each other.

``collect`` returns ``{"tasks", "task_of", "base", "adapters", "fusions", "tolerance", "base_model", "joint",
"base_drift", "adapter_drift", "generations"}``; each fusion carries its adapters, resolved settings,
scores, retention (``pipeline.evaluate.retention``), the fuse record (``info``), its per-module figures
(``modules``), its stored geometry summary (``geometry``, ``pipeline.geometry.summarize`` as the fuse
step recorded it) and signals (``signals``, ``pipeline.signals.summarize``), its drift, its retention
on the validation splits, its random control and the joint-training baseline's retention on its
tasks. Nothing here runs a model.
"""

from __future__ import annotations

from pipeline.errors import FusionError
from pipeline.evaluate import retention

GENERATIONS = "generations"  # the key of an evaluation's free-form answers: not a task name
DRIFT, VALID = "drift", "valid"  # its off-task drift and its validation-split scores: not tasks either
NOT_TASKS = (GENERATIONS, DRIFT, VALID)


def collect(params: dict, baselines: dict, evals: dict, infos: dict, tasks_of: dict,
            tolerance: float, controls: dict | None = None, joint: str | None = None) -> dict:
    """Check the inputs against each other and compute retention: the one structure the writers use.

    ``controls``: per fusion, its random control's record (``pipeline.stages.control``);
    ``joint``: the declared adapter that is the joint-training baseline (None: none). Retention on
    the validation splits (``valid_retention``) is computed where the evaluations carry them."""
    if not params:
        raise FusionError("no fusions to report")
    base = _tasks_only(baselines.get("base") or {})
    adapters = {name: _tasks_only(ev) for name, ev in (baselines.get("adapters") or {}).items()}
    task_of = {name: tasks_of.get(name, name) for name in adapters}
    raw_adapters = baselines.get("adapters") or {}
    if joint is not None and joint not in adapters:
        raise FusionError(f"joint: no baseline evaluation of the joint-training adapter {joint!r}")
    controls = controls or {}
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
        valid_ret = None
        if VALID in evals[name] and all(VALID in (raw_adapters.get(a) or {}) for a in sources):
            try:
                valid_ret = retention(evals[name][VALID], {a: raw_adapters[a][VALID] for a in sources},
                                      {a: task_of[a] for a in sources},
                                      (baselines.get("base") or {}).get(VALID) or {}, tolerance)
            except FusionError:
                valid_ret = None  # some task has no validation split
        control = None
        if controls.get(name):
            c = controls[name]
            control = {"retention": retention(c["scores"], {a: adapters[a] for a in sources},
                                              {a: task_of[a] for a in sources}, base, tolerance),
                       "drift": c.get("drift"), "signals": c.get("signals"), "seed": c.get("seed")}
        joint_ret = None
        if joint is not None:
            joint_ret = retention(adapters[joint], {a: adapters[a] for a in sources},
                                  {a: task_of[a] for a in sources}, base, tolerance)
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
            "drift": evals[name].get(DRIFT),
            "valid_retention": valid_ret,
            "control": control,
            "joint_retention": joint_ret,
            "signals": info.get("signals") or {},
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
        "joint": None if joint is None else {"name": joint, "eval": adapters[joint],
                                             "drift": (raw_adapters.get(joint) or {}).get(DRIFT)},
        "base_drift": (baselines.get("base") or {}).get(DRIFT),
        "adapter_drift": {a: (ev or {}).get(DRIFT) for a, ev in raw_adapters.items()},
        "generations": {
            "base": (baselines.get("base") or {}).get(GENERATIONS) or {},
            **{f"adapter {a}": (ev or {}).get(GENERATIONS) or {}
               for a, ev in (baselines.get("adapters") or {}).items()},
            **{f"fusion {n}": f["generations"] for n, f in fusions.items()},
        },
    }


def _tasks_only(ev: dict) -> dict:
    return {t: m for t, m in ev.items() if t not in NOT_TASKS}


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


def lm_eval_scores(lm_eval: dict | None, fusions: list[str]) -> dict | None:
    """The lm-eval scores by model (``{"tasks", "base", "adapters": {name: ...}, "fusions": {name: ...}}``,
    each ``{task: {metric: value}}``), or None when no lm-eval task was run; a fusion without its
    scores while the baselines have them is refused."""
    base = (lm_eval or {}).get("baselines") or {}
    if not base.get("tasks"):
        return None
    out = {"tasks": list(base["tasks"]), "base": base["base"]["scores"],
           "adapters": {a: r["scores"] for a, r in base["adapters"].items()}, "fusions": {}}
    for name in fusions:
        record = (lm_eval.get("fusions") or {}).get(name) or {}
        if record.get("tasks") != base["tasks"]:
            raise FusionError(f"fusion {name!r}: its lm-eval scores are missing or for other tasks than the "
                              "baselines' (run the lm_eval stages)")
        out["fusions"][name] = record["scores"]
    return out
