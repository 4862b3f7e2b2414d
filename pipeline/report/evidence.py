"""The report's evidence: the league table, and how well each data-free signal predicts retention.

Both take the structure ``gather.collect`` returns.

- :func:`league`: per set of source adapters, one row per method (in the registry's order, then any
  other name), the method's best fusion chosen on the **validation** split (highest mean retention
  there; on the test split when no validation scores exist, which the row says), with its test
  retention per task, its random control, the joint-training baseline and its drift.
- :func:`signal_points` and :func:`predictive_power`: every evaluated fusion is a point
  ``(signal value, measured mean retention)``; per signal, the Spearman rank correlation over the
  fusions that have it, and their number; the same over the fusions and their random controls
  together (``with_controls``: random sources can look like learned ones to a signal that sees
  only geometry), and inside each set of sources (``within``). The best signal (largest
  correlation inside the sets of sources, over at least ``MIN_POINTS`` fusions, and at least
  ``MIN_RHO``) is fitted by least
  squares (``retention ~ a + b * signal``) so that a fusion not yet evaluated gets a predicted
  retention (:func:`predict`, used by ``fusion validate``), clipped to the range it was fitted on.
"""

from __future__ import annotations

import math

from pipeline.methods.registry import METHODS

MIN_POINTS = 4
TIE_TOL = 1e-9  # figures that agree to this (relative) rank as ties
MIN_RHO = 0.3   # a weaker rank correlation inside the source sets is no basis for a prediction

# name -> (description, how to read it from a fusion's signals summary and geometry summary)
SIGNALS = {
    "min_kept": "least share of a source's delta the fusion keeps, <dW_i, dW_F> / |dW_i|^2",
    "min_alignment": "least Iso-C alignment of a source with the fusion's top subspace",
    "energy_kept": "share of the fused delta's energy kept by re-factoring",
    "mean_overlap": "mean subspace overlap of the sources (column and row spaces)",
    "interference": "TSV-Merge singular task interference of the sources",
    "mean_cosine": "mean cosine between the sources' deltas",
    "sign_conflict": "mean sign-conflict rate between the sources",
}


def _pooled(stats: list[dict]) -> float | None:
    n = sum(s.get("modules") or 0 for s in stats)
    return sum(s["mean"] * s["modules"] for s in stats if s.get("modules")) / n if n else None


def signal_values(signals: dict | None, geometry: dict | None) -> dict[str, float | None]:
    """The value of each signal in ``SIGNALS`` for one fusion (None where it has none)."""
    s, g = signals or {}, geometry or {}
    pairs = g.get("pairs") or []
    return {
        "min_kept": s.get("min_kept"), "min_alignment": s.get("min_alignment"),
        "energy_kept": s.get("energy_kept"), "mean_overlap": s.get("mean_overlap"),
        "interference": s.get("interference"),
        "mean_cosine": _pooled([p["cosine"] for p in pairs]) if pairs else None,
        "sign_conflict": _pooled([p["sign_conflict"] for p in pairs]) if pairs else None,
    }


def signal_points(data: dict) -> list[dict]:
    """``[{"fusion", "kind" ("fusion" | "random control"), "retention", "sources", "signals": {...}}]``."""
    points = []
    for name, f in data["fusions"].items():
        if f["signals"]:
            points.append({"fusion": name, "kind": "fusion", "retention": f["retention"]["mean_retention"],
                           "sources": sorted(f["adapters"]), "signals": signal_values(f["signals"], f["geometry"])})
        c = f.get("control")
        if c and c.get("signals"):
            points.append({"fusion": name, "kind": "random control",
                           "retention": c["retention"]["mean_retention"], "sources": sorted(f["adapters"]),
                           "signals": signal_values(c["signals"], None)})
    return points


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank. Values within ``TIE_TOL`` (relative) of the
    smallest of a run are ties: the signals carry round-off of about 1e-14, and two fusions that
    both keep a source whole (alignment 1.0 and 0.9999999999999998) must not be ordered by it."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        first = values[order[i]]
        while j + 1 < len(order) and values[order[j + 1]] - first <= TIE_TOL * max(1.0, abs(first)):
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def _pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks); None when either side is constant."""
    x, y = list(x), list(y)
    return _pearson(ranks(x), ranks(y)) if len(x) >= 2 else None


def _pairs(points: list[dict], name: str) -> list[tuple[float, float]]:
    return [(p["signals"][name], p["retention"]) for p in points
            if p["signals"].get(name) is not None and p["retention"] is not None]


def predictive_power(points: list[dict]) -> dict:
    """``{"signals": {name: {"spearman", "n", "within": {"spearman", "n", "groups"},
    "with_controls": {"spearman", "n"}, "description"}}, "best", "fit", "points": n}``.

    ``spearman`` and ``n`` are over the points of kind ``"fusion"``; ``within`` is the correlation
    inside each set of sources (points with the same ``sources`` from the same ``report``, at least
    3 of them), averaged with each set's number of points as its weight. That is the question a
    prediction answers (which of these candidate fusions of my adapters keeps the most?), and a
    signal of the sources alone (overlap, cosine, ...) has no spread there, so it cannot win by
    telling a pair from a three-way fusion. The best signal has the largest ``within`` correlation
    over at least ``MIN_POINTS`` fusions; when that is at least ``MIN_RHO``, its least-squares fit over
    every fusion predicts, clipped to the range of retention it was fitted on (``fit["range"]``);
    ``best`` is None otherwise."""
    out = {}
    fusions = [p for p in points if p.get("kind", "fusion") == "fusion"]
    for name, description in SIGNALS.items():
        pairs, both = _pairs(fusions, name), _pairs(points, name)
        out[name] = {"spearman": spearman(*zip(*pairs)) if len(pairs) >= 2 else None, "n": len(pairs),
                     "within": _within(fusions, name),
                     "with_controls": {"spearman": spearman(*zip(*both)) if len(both) >= 2 else None,
                                       "n": len(both)},
                     "description": description}
    usable = [(n, s) for n, s in out.items() if s["within"]["spearman"] is not None and s["within"]["n"] >= MIN_POINTS]
    best = max(usable, key=lambda x: (x[1]["within"]["spearman"], x[1]["within"]["n"]), default=(None, None))[0]
    fit = None
    if best is not None and out[best]["within"]["spearman"] >= MIN_RHO:
        pairs = _pairs(fusions, best)
        xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((a - mx) ** 2 for a in xs)
        slope = sum((a - mx) * (b - my) for a, b in pairs) / sxx if sxx > 0 else 0.0
        fit = {"signal": best, "intercept": my - slope * mx, "slope": slope, "n": len(pairs),
               "range": [min(ys), max(ys)]}
    return {"signals": out, "best": best if fit else None, "fit": fit, "points": len(points)}


def _within(points: list[dict], name: str) -> dict:
    """Spearman of signal ``name`` with retention inside each set of sources, pooled by size."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p.get("report"), tuple(p.get("sources") or ())), []).append(p)
    total, weight, n_groups = 0.0, 0, 0
    for group in groups.values():
        pairs = _pairs(group, name)
        rho = spearman(*zip(*pairs)) if len(pairs) >= 3 else None
        if rho is not None:
            total, weight, n_groups = total + rho * len(pairs), weight + len(pairs), n_groups + 1
    return {"spearman": total / weight if weight else None, "n": weight, "groups": n_groups}


def predict(fit: dict | None, signals: dict | None, geometry: dict | None = None) -> float | None:
    """The retention the fitted best signal predicts for a fusion's signals (None without a fit),
    within the range of retention the fit was made on."""
    if not fit:
        return None
    x = signal_values(signals, geometry).get(fit["signal"])
    if x is None:
        return None
    y = fit["intercept"] + fit["slope"] * x
    lo, hi = fit.get("range") or (-math.inf, math.inf)
    return min(max(y, lo), hi)


def _method_order(names) -> list[str]:
    known = [m for m in METHODS if m in names]
    return known + sorted(n for n in names if n not in METHODS)


def league(data: dict) -> list[dict]:
    """Per set of sources (in first-seen order): ``{"adapters", "tasks", "rows", "joint",
    "routing_drift"}``; a row is ``{"method", "fusion", "candidates", "chosen_on", "valid_mean",
    "tasks": {task: retention}, "mean", "worst", "control_mean", "kl"}``."""
    groups: dict[tuple, list[str]] = {}
    for name, f in data["fusions"].items():
        groups.setdefault(tuple(f["adapters"]), []).append(name)
    out = []
    for adapters, names in groups.items():
        by_method: dict[str, list[str]] = {}
        for n in names:
            by_method.setdefault(str(data["fusions"][n]["settings"].get("method")), []).append(n)
        rows = []
        for method in _method_order(by_method):
            cands = by_method[method]
            valid = {n: data["fusions"][n]["valid_retention"] for n in cands}
            on_valid = all(v is not None and v["mean_retention"] is not None for v in valid.values())
            if on_valid:
                best = max(cands, key=lambda n: valid[n]["mean_retention"])
            else:
                best = max(cands, key=lambda n: _or(data["fusions"][n]["retention"]["mean_retention"]))
            f = data["fusions"][best]
            r = f["retention"]
            c = f.get("control")
            rows.append({
                "method": method, "fusion": best, "candidates": len(cands),
                "chosen_on": "only one" if len(cands) == 1 else ("valid" if on_valid else "test"),
                "valid_mean": valid[best]["mean_retention"] if valid[best] else None,
                "tasks": {t: x["retention"] for t, x in r["tasks"].items()},
                "mean": r["mean_retention"], "worst": r["worst_retention"],
                "control_mean": c["retention"]["mean_retention"] if c else None,
                "kl": (f.get("drift") or {}).get("kl"),
            })
        tasks = list(data["fusions"][names[0]]["retention"]["tasks"])
        joint = data["fusions"][names[0]].get("joint_retention")
        out.append({"adapters": list(adapters), "tasks": tasks, "rows": rows,
                    "joint": None if joint is None else {
                        "name": data["joint"]["name"], "mean": joint["mean_retention"],
                        "worst": joint["worst_retention"],
                        "tasks": {t: x["retention"] for t, x in joint["tasks"].items()},
                        "kl": (data["joint"].get("drift") or {}).get("kl")},
                    "source_kl": {a: (data["adapter_drift"].get(a) or {}).get("kl") for a in adapters}})
    return out


def _or(x, default=-math.inf):
    return default if x is None else x
