"""The report's machine-readable data: ``metrics.json``, ``headline.json`` and the DVC plot rows.

Each function takes the structure ``gather.collect`` returns and gives plain dicts and lists
(JSON-ready, in input order); ``None`` values are left out of the metrics files.
"""

from __future__ import annotations

from pipeline.methods.registry import METHODS


def metrics(data: dict) -> dict:
    """``metrics.json``: nested so ``dvc metrics show`` reads as a table; ``None`` values left out."""
    def scores(m: dict) -> dict:
        return _drop_none({"accuracy": m.get("accuracy"), "loss": m.get("loss")})

    fusions = {}
    bench = data.get("lm_eval")
    for name, f in data["fusions"].items():
        r = f["retention"]
        tasks = {t: _drop_none({"accuracy": x["accuracy"], "loss": x["loss"], "retention": x["retention"]})
                 for t, x in r["tasks"].items()}
        tasks.update({t: scores(f["eval"][t]) for t in f["other_tasks"]})
        c, j = f.get("control"), f.get("joint_retention")
        fusions[name] = _drop_none({
            "mean_retention": r["mean_retention"],
            "worst_retention": r["worst_retention"],
            "worse_than_routing": r["worse_than_routing"],
            "tasks": tasks,
            "valid_mean_retention": (f.get("valid_retention") or {}).get("mean_retention"),
            "random_control": _drop_none({"mean_retention": c["retention"]["mean_retention"],
                                          "worst_retention": c["retention"]["worst_retention"],
                                          "drift_kl": (c.get("drift") or {}).get("kl")}) if c else None,
            "joint_mean_retention": j["mean_retention"] if j else None,
            "drift": _drift(f.get("drift")),
            "signals": _drop_none({k: (f.get("signals") or {}).get(k)
                                   for k in ("min_kept", "min_alignment", "energy_kept", "mean_overlap",
                                             "interference")}) or None,
            "lm_eval": bench["fusions"][name] if bench else None,
        })
    power = data.get("power") or {}
    return _drop_none({
        "fusions": fusions,
        "base": {t: scores(m) for t, m in data["base"].items()},
        "adapters": {a: {t: scores(m) for t, m in ev.items()} for a, ev in data["adapters"].items()},
        "drift": _drop_none({"base": _drift(data.get("base_drift")),
                             **{a: _drift(d) for a, d in (data.get("adapter_drift") or {}).items()}}) or None,
        "lm_eval": {"base": bench["base"], "adapters": bench["adapters"]} if bench else None,
        "signals": _drop_none({name: _drop_none({"spearman": s["spearman"], "n": s["n"],
                                                 "spearman_within": s["within"]["spearman"],
                                                 "spearman_with_controls": s["with_controls"]["spearman"]})
                               for name, s in (power.get("signals") or {}).items()}) or None,
    })


def _drift(d: dict | None) -> dict | None:
    return None if not d else _drop_none({"kl": d.get("kl"), "loss": d.get("loss"),
                                          "agreement": d.get("agreement")})


def headline(data: dict) -> dict:
    """``headline.json``: each fusion's mean and worst retention, its random control's mean
    (``random``), the joint-training adapter's mean on the same tasks (``joint``) and its off-task
    drift (``kl``) under short names, a second DVC metrics file narrow enough for
    ``dvc metrics show`` and ``dvc exp show`` to read at a glance."""
    out = {}
    for name, f in data["fusions"].items():
        c, j = f.get("control"), f.get("joint_retention")
        out[name] = _drop_none({"mean": f["retention"]["mean_retention"], "worst": f["retention"]["worst_retention"],
                                "random": c["retention"]["mean_retention"] if c else None,
                                "joint": j["mean_retention"] if j else None,
                                "kl": (f.get("drift") or {}).get("kl")})
    return out


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def score_rows(data: dict) -> list[dict]:
    """One row per (task, model): the base, the adapters evaluated on the task, the fusions."""
    rows = []
    for task in data["tasks"]:
        models = [("base", "base", data["base"].get(task))]
        models += [(f"adapter {a}", "adapter", ev.get(task)) for a, ev in data["adapters"].items()]
        models += [(f"fusion {n}", "fusion", f["eval"].get(task)) for n, f in data["fusions"].items()]
        for model, kind, m in models:
            if m is None:
                continue
            rows.append({"label": f"{task} | {model}", "task": task, "model": model, "kind": kind,
                         "accuracy": m.get("accuracy"), "loss": m.get("loss")})
    return rows


def plot_rows(data: dict) -> dict[str, list[dict]]:
    """Rows of the DVC plot files, by role."""
    scores = score_rows(data)
    ret = [{"label": f"{n} | {t}", "fusion": n, "task": t, "adapter": x["adapter"],
            "retention": x["retention"], "kind": x["retention_kind"]}
           for n, f in data["fusions"].items() for t, x in f["retention"]["tasks"].items()]
    return {
        "accuracy_plot": [{k: r[k] for k in ("label", "task", "model", "kind", "accuracy")} for r in scores],
        "loss_plot": [{k: r[k] for k in ("label", "task", "model", "kind", "loss")} for r in scores],
        "retention_plot": ret,
        "weights_plot": weight_rows(data),
    }


def _weight_of(weights, k: int) -> float | None:
    """Adapter ``k``'s weight in a fusion's resolved ``weights`` (the mean of a per-layer list)."""
    if not isinstance(weights, list) or k >= len(weights):
        return None
    w = weights[k]
    if isinstance(w, list):
        w = sum(w) / len(w) if w and all(isinstance(x, (int, float)) for x in w) else None
    return float(w) if isinstance(w, (int, float)) else None


def weight_rows(data: dict) -> list[dict]:
    """Score against weight: one row per fusion and source task, ``weight`` being the weight of the
    task's adapter in the fusion. Fusions of the same adapters at other weights, or the same
    fusion across the runs of a ``dvc exp`` sweep (``dvc plots diff``), trace retention as a
    function of weight. SLERP of two adapters (positioned by t, not weights) is left out."""
    rows = []
    for n, f in data["fusions"].items():
        s = f["settings"]
        method = METHODS.get(s.get("method"))
        if method is not None and not method.uses_weights(len(f["adapters"])):
            continue
        for t, x in f["retention"]["tasks"].items():
            if x["adapter"] not in f["adapters"]:
                continue
            w = _weight_of(s.get("weights"), f["adapters"].index(x["adapter"]))
            if w is not None and x["retention"] is not None:
                rows.append({"label": f"{n} | {t}", "fusion": n, "task": t, "adapter": x["adapter"],
                             "method": s.get("method"), "weight": w, "retention": x["retention"],
                             "accuracy": x["accuracy"]})
    return rows
