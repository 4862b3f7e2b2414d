"""Write up evaluated fusions: DVC metrics, DVC plot data, and a human report (Markdown and HTML).

Everything comes in as plain dicts (JSON already loaded); nothing here runs a model. Inputs of
``write_report``:

``params``: the resolved settings of each fusion (``params.yaml`` after defaults are applied)::

    {FUSION: {"adapters": [ADAPTER, ...], "method": "ties", "weights": [1.0, 1.0],
              "density": 0.5, "rank": 8, "seed": 0, ...}}

  ``adapters`` is required; every other key is shown as given (lists and dicts compactly).

``baselines``: ``evaluate`` results of the base model and of each adapter on its own::

    {"base": {TASK: METRICS, ..., "generations": GENERATIONS},
     "adapters": {ADAPTER: {TASK: METRICS, ..., "generations": GENERATIONS}}}

``evals``: ``evaluate`` results of each fusion, same shape: ``{FUSION: {TASK: METRICS, ...,
"generations": GENERATIONS}}``. ``METRICS`` is ``{"loss", "perplexity", "accuracy" (or None),
"n"}`` as returned by ``pipeline.evaluate.evaluate``. ``GENERATIONS`` (optional) maps each free-form
prompt to the model's answer: ``dict(zip(prompts, generate_samples(...)))``. The key
``"generations"`` is therefore not a task name.

``infos`` (optional per fusion): what the fuse step recorded::

    {FUSION: {
        "method": "ties",
        "params": {...},                       # resolved settings, shown when params lacks a key
        "inputs": [{"name": ADAPTER, "path": "adapters/up", "sha256": HEX}, ...],  # fusion order
        "output": {"path": "fused/NAME", "sha256": HEX,       # of adapters.safetensors
                   "config_sha256": HEX},                    # of adapter_config.json (optional)
        "modules": {MODULE: {
            "rank": 8,                         # output rank of the module
            "error": 0.01,                     # relative re-factoring error |dW - dW_r| / |dW|
            "cosine": [[1.0, 0.1], [0.1, 1.0]],  # cosine of the sources' deltas (k x k; a float for k = 2)
            "sign_conflict": 0.3,              # fraction of entries whose signs disagree between sources
            "norms": [1.2, 0.9],               # Frobenius norm of each source's delta, in inputs order
            "fused_norm": 1.4}}}}              # Frobenius norm of the fused delta
  Every key is optional; what is missing is left out of the report.

``tasks_of``: the task of each adapter (``{ADAPTER: TASK}``); an adapter without an entry has the task
of its own name.

Files written under ``out_dir`` (paths relative to it, see ``REPORT_FILES``): ``metrics.json``,
``headline.json`` (mean and worst retention per fusion, for narrow tables),
``plots/accuracy.json``, ``plots/loss.json``, ``plots/retention.json``, ``figures/scores.png``,
``plots/weights.json``, ``figures/retention.png``, ``figures/geometry.png`` (when any fusion has
module geometry), ``figures/weights.png`` (when any fusion gives its adapters weights),
``report.md`` and ``report.html``. ``dvc_plots`` gives the ``plots:`` entries for ``dvc.yaml``.
Same inputs give byte-identical files: no timestamps, PNGs without metadata, JSON in input order.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from pathlib import Path

from pipeline.errors import FusionError
from pipeline.evaluate import ROUTING_TOLERANCE, retention

GENERATIONS = "generations"
REPORT_FILES = {
    "metrics": "metrics.json",
    "headline": "headline.json",
    "accuracy_plot": "plots/accuracy.json",
    "loss_plot": "plots/loss.json",
    "retention_plot": "plots/retention.json",
    "weights_plot": "plots/weights.json",
    "scores_figure": "figures/scores.png",
    "retention_figure": "figures/retention.png",
    "geometry_figure": "figures/geometry.png",
    "weights_figure": "figures/weights.png",
    "markdown": "report.md",
    "html": "report.html",
}
# Settings shown first, in this order; other keys follow alphabetically.
SETTING_ORDER = ["method", "weights", "density", "majority_sign_method", "t", "rank", "space", "seed"]


# ---------------------------------------------------------------------------- public API


def write_report(out_dir: str | Path, params: dict, baselines: dict, evals: dict,
                 infos: dict | None = None, *, tasks_of: dict | None = None,
                 tolerance: float = ROUTING_TOLERANCE,
                 title: str = "Adapter fusion report") -> dict[str, Path]:
    """Write metrics, plot data, figures and the report under ``out_dir``; return their paths by role."""
    out = Path(out_dir)
    data = collect(params, baselines, evals, infos or {}, tasks_of or {}, tolerance)
    written: dict[str, Path] = {}

    def put(role: str, content: bytes | str) -> None:
        written[role] = _write(out / REPORT_FILES[role], content)

    put("metrics", _json(metrics(data)))
    put("headline", _json(headline(data)))
    plots = plot_rows(data)
    for role, rows in plots.items():
        put(role, _json(rows))
    figures = {"scores_figure": scores_figure(data), "retention_figure": retention_figure(data)}
    if any(f["modules"] for f in data["fusions"].values()):
        figures["geometry_figure"] = geometry_figure(data)
    if plots["weights_plot"]:
        figures["weights_figure"] = weights_figure(plots["weights_plot"], list(data["fusions"]))
    for role, png in figures.items():
        put(role, png)
    blocks = report_blocks(data, {role: REPORT_FILES[role] for role in figures}, title)
    put("markdown", to_markdown(blocks))
    put("html", to_html(blocks, title, {REPORT_FILES[r]: png for r, png in figures.items()}))
    return written


def dvc_plots(reports_dir: str = "reports") -> list[dict]:
    """The ``plots:`` entries of ``dvc.yaml`` for the plot data ``write_report`` writes.

    Each row of the data is one bar (``label`` = "task | model"); DVC colours and offsets the bars
    by revision, so ``dvc plots diff`` and experiments compare side by side.
    """
    d = reports_dir.rstrip("/")
    return [
        {f"{d}/{REPORT_FILES['accuracy_plot']}": {
            "template": "bar_horizontal", "x": "accuracy", "y": "label",
            "title": "Exact-match accuracy per task", "x_label": "accuracy", "y_label": "task | model"}},
        {f"{d}/{REPORT_FILES['loss_plot']}": {
            "template": "bar_horizontal", "x": "loss", "y": "label",
            "title": "Loss per task (lower is better)", "x_label": "loss", "y_label": "task | model"}},
        {f"{d}/{REPORT_FILES['retention_plot']}": {
            "template": "bar_horizontal", "x": "retention", "y": "label",
            "title": "Retention of each source adapter's score (1 = as good as the adapter alone)",
            "x_label": "retention", "y_label": "fusion | task"}},
        {f"{d}/{REPORT_FILES['weights_plot']}": {
            "template": "scatter", "x": "weight", "y": "retention",
            "title": "Retention on a task against the weight of its adapter (a sweep - dvc plots diff)",
            "x_label": "weight of the task's adapter", "y_label": "retention"}},
    ]


# ---------------------------------------------------------------------------- gathering


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


# ---------------------------------------------------------------------------- metrics and plot data


def metrics(data: dict) -> dict:
    """``metrics.json``: nested so ``dvc metrics show`` reads as a table; ``None`` values left out."""
    def scores(m: dict) -> dict:
        return _drop_none({"accuracy": m.get("accuracy"), "loss": m.get("loss")})

    fusions = {}
    for name, f in data["fusions"].items():
        r = f["retention"]
        tasks = {t: _drop_none({"accuracy": x["accuracy"], "loss": x["loss"], "retention": x["retention"]})
                 for t, x in r["tasks"].items()}
        tasks.update({t: scores(f["eval"][t]) for t in f["other_tasks"]})
        fusions[name] = _drop_none({
            "mean_retention": r["mean_retention"],
            "worst_retention": r["worst_retention"],
            "worse_than_routing": r["worse_than_routing"],
            "tasks": tasks,
        })
    return {
        "fusions": fusions,
        "base": {t: scores(m) for t, m in data["base"].items()},
        "adapters": {a: {t: scores(m) for t, m in ev.items()} for a, ev in data["adapters"].items()},
    }


def headline(data: dict) -> dict:
    """``headline.json``: each fusion's mean and worst retention under short names, a second DVC
    metrics file narrow enough for ``dvc metrics show`` and ``dvc exp show`` to read at a glance."""
    return {name: _drop_none({"mean": f["retention"]["mean_retention"], "worst": f["retention"]["worst_retention"]})
            for name, f in data["fusions"].items()}


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
        if s.get("method") == "slerp" and len(f["adapters"]) == 2:
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


# ---------------------------------------------------------------------------- figures

_FUSION_COLOURS = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_BASE_COLOUR, _ADAPTER_COLOUR = "#a0a0a0", "#1f77b4"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _colour(model: str, fusion_names: list[str]) -> str:
    if model == "base":
        return _BASE_COLOUR
    if model.startswith("adapter "):
        return _ADAPTER_COLOUR
    return _FUSION_COLOURS[fusion_names.index(model[len("fusion "):]) % len(_FUSION_COLOURS)]


def scores_figure(data: dict) -> bytes:
    """Per task: the base, the task's own adapter(s) and every fusion; accuracy and loss panels."""
    fusion_names = list(data["fusions"])
    groups = []  # (task, [(model, metrics)])
    for task in data["tasks"]:
        models = [("base", data["base"].get(task))]
        models += [(f"adapter {a}", ev.get(task)) for a, ev in data["adapters"].items()
                   if data["task_of"].get(a) == task]
        models += [(f"fusion {n}", f["eval"].get(task)) for n, f in data["fusions"].items()]
        groups.append((task, [(m, x) for m, x in models if x is not None]))
    has_acc = any(x.get("accuracy") is not None for _, ms in groups for _, x in ms)
    panels = (["accuracy"] if has_acc else []) + ["loss"]
    nbars = sum(len(ms) for _, ms in groups) + len(groups)
    fig = _figure(5.0 * len(panels) + 1.5, 1.0 + 0.28 * nbars)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    ticks, labels, pos = [], [], 0.0
    layout = []
    for task, ms in groups:
        for model, m in ms:
            layout.append((pos, model, m))
            ticks.append(pos)
            labels.append(f"{task} | {model}")
            pos += 1
        pos += 0.8
    for ax, key in zip(axes, panels):
        for y, model, m in layout:
            v = m.get(key)
            if v is None:
                ax.text(0, y, " no answers (text set)", va="center", fontsize=8, color="#707070")
                continue
            ax.barh(y, v, color=_colour(model, fusion_names), height=0.8)
            ax.text(v, y, f" {_fmt_num(v, key)}", va="center", fontsize=8)
        ax.set_title(key if key == "accuracy" else "loss (lower is better)")
        ax.margins(x=0.18)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ticks, labels, fontsize=8)
    axes[0].invert_yaxis()  # shared: first task on top
    return _png(fig)


def retention_figure(data: dict) -> bytes:
    """Retention per fusion and task, with routing (1.0) and the tolerance marked."""
    rows = [(f"{n} | {t}", x["retention"], n) for n, f in data["fusions"].items()
            for t, x in f["retention"]["tasks"].items()]
    fusion_names = list(data["fusions"])
    fig = _figure(7.5, 1.0 + 0.32 * max(len(rows), 1))
    ax = fig.subplots()
    for y, (label, v, n) in enumerate(rows):
        if v is not None:
            ax.barh(y, v, color=_colour(f"fusion {n}", fusion_names), height=0.7)
            ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=1, label="routing (each task to its own adapter)")
    ax.axvline(1.0 - data["tolerance"], color="black", lw=1, ls="--", label="routing - tolerance")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([1.1] + [r[1] * 1.15 for r in rows if r[1] is not None]))
    ax.set_title("retention (fusion / source adapter, on the adapter's task)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def weights_figure(rows: list[dict], fusion_names: list[str]) -> bytes:
    """Retention on each task against the weight of the task's adapter (``weight_rows``):
    colour = fusion, marker = task."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    markers = "os^Dvx*P"
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    for r in rows:
        ax.scatter(r["weight"], r["retention"], color=_colour(f"fusion {r['fusion']}", fusion_names),
                   marker=markers[tasks.index(r["task"]) % len(markers)], s=40, alpha=0.85, zorder=3)
    for n in dict.fromkeys(r["fusion"] for r in rows):  # legend: colours, then markers
        ax.scatter([], [], color=_colour(f"fusion {n}", fusion_names), marker="o", label=n)
    for i, task in enumerate(tasks):
        ax.scatter([], [], color="#606060", marker=markers[i % len(markers)], label=f"task {task}")
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xlabel("weight of the task's adapter in the fusion")
    ax.set_ylabel("retention on the task")
    ax.set_ylim(bottom=min([0.0] + [r["retention"] for r in rows]) - 0.05,
                top=max([1.0] + [r["retention"] for r in rows]) + 0.05)
    ax.set_title("retention against weight")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return _png(fig)


def geometry_figure(data: dict) -> bytes:
    """Per fusion and module: mean cosine between sources, sign-conflict rate, re-factoring error."""
    fusions = [(n, f["modules"]) for n, f in data["fusions"].items() if f["modules"]]
    fig = _figure(9.0, 0.9 + 2.6 * len(fusions))
    axes = fig.subplots(len(fusions), 1, squeeze=False)[:, 0]
    for ax, (name, modules) in zip(axes, fusions):
        xs = range(len(modules))
        series = {
            "mean cosine between sources": [_mean_cos(m.get("cosine")) for m in modules.values()],
            "sign-conflict rate": [_mean_cos(m.get("sign_conflict")) for m in modules.values()],
            "re-factoring error": [m.get("error") for m in modules.values()],
        }
        for (label, ys), marker in zip(series.items(), "osx"):
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker=marker, ms=3, lw=1, label=label)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{name}: geometry per module ({len(modules)} modules, in file order)", fontsize=10)
        if len(modules) <= 24:
            ax.set_xticks(list(xs), [_short_module(m) for m in modules], rotation=60, ha="right",
                          fontsize=7)
        else:
            ax.set_xlabel("module index")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return _png(fig)


def _short_module(name: str) -> str:
    return re.sub(r"^(base_model\.model\.)?model\.layers\.", "L", name)


def _pairwise(cos) -> list[float]:
    """Off-diagonal entries (i < j) of a pairwise matrix (cosine, sign conflict); a number is one pair."""
    if cos is None:
        return []
    if isinstance(cos, (int, float)):
        return [float(cos)]
    return [cos[i][j] for i in range(len(cos)) for j in range(i + 1, len(cos))]


def _mean_cos(cos) -> float | None:
    p = _pairwise(cos)
    return sum(p) / len(p) if p else None


def geometry_summary(modules: dict) -> dict:
    """Whole-adapter figures from per-module geometry (``None`` where the fuse step gave nothing)."""
    ranks = [m["rank"] for m in modules.values() if m.get("rank") is not None]
    cos = [c for m in modules.values() for c in _pairwise(m.get("cosine"))]
    conflict = [c for m in modules.values() for c in _pairwise(m.get("sign_conflict"))]
    errors = [m["error"] for m in modules.values() if m.get("error") is not None]
    norms = [m["norms"] for m in modules.values() if m.get("norms")]
    fused = [m["fused_norm"] for m in modules.values() if m.get("fused_norm") is not None]
    k = max((len(n) for n in norms), default=0)
    return {
        "modules": len(modules),
        "rank": (min(ranks), max(ranks)) if ranks else None,
        "mean_cosine": sum(cos) / len(cos) if cos else None,
        "max_abs_cosine": max(abs(c) for c in cos) if cos else None,
        "sign_conflict": sum(conflict) / len(conflict) if conflict else None,
        "mean_error": sum(errors) / len(errors) if errors else None,
        "max_error": max(errors) if errors else None,
        # total Frobenius norm over modules: sqrt of the sum of squared module norms
        "norms": [math.sqrt(sum(n[i] ** 2 for n in norms if i < len(n))) for i in range(k)] or None,
        "fused_norm": math.sqrt(sum(x * x for x in fused)) if fused else None,
    }


# ---------------------------------------------------------------------------- report content
# A report is a list of blocks rendered twice (Markdown, HTML) so both say the same thing:
#   ("h", level, text) ("p", parts) ("list", [parts]) ("table", header, rows) ("img", alt, path)
# where parts is a list of str | ("code", str) | ("b", str), and table cells are parts or str.


def report_blocks(data: dict, figures: dict[str, str], title: str) -> list:
    fusions = data["fusions"]
    tol = data["tolerance"]
    blocks: list = [("h", 1, title)]
    n_adapters = len({a for f in fusions.values() for a in f["adapters"]})
    blocks.append(("p", [f"{len(fusions)} fusion(s) of {n_adapters} adapter(s), evaluated on "
                         f"{len(data['tasks'])} task(s) against the base model and each source adapter "
                         "on its own task."]))

    # headline
    best = best_fusions(data)
    items = []
    for key, objective in (("mean_retention", "mean retention"), ("worst_retention", "worst-task retention")):
        if best[key]:
            name, value = best[key]
            items.append([f"Best by {objective}: ", ("b", name), f" ({value:.3f})."])
    for name, f in fusions.items():
        items.append(_routing_sentence(name, f["retention"], tol))
    blocks.append(("list", items))

    # what was fused how
    blocks.append(("h", 2, "Fusions"))
    keys = _setting_keys([f["settings"] for f in fusions.values()])
    header = ["fusion", "adapters"] + keys + ["output rank"]
    rows = []
    for name, f in fusions.items():
        geo = geometry_summary(f["modules"])
        rank = geo["rank"]
        rows.append([[("b", name)], " + ".join(f["adapters"])]
                    + [_fmt_setting(f["settings"].get(k)) for k in keys]
                    + ["–" if rank is None else (str(rank[0]) if rank[0] == rank[1] else f"{rank[0]}–{rank[1]}")])
    blocks.append(("table", header, rows))

    # scores
    blocks.append(("h", 2, "Scores"))
    blocks.append(("p", ["Retention is the fusion's score on a task divided by the source adapter's score "
                         "on that task: exact-match accuracy where the task has answers, else "
                         "source loss / fusion loss. 1.0 means the fusion does as well as routing the task "
                         "to its own adapter. Gain is over the base model (accuracy in points; loss as "
                         "base loss - fusion loss, so positive is better)."]))
    for name, f in fusions.items():
        r = f["retention"]
        blocks.append(("h", 3, name))
        rows = []
        for task, x in r["tasks"].items():
            rows.append([task, x["adapter"],
                         _pct(x["base_accuracy"]), _pct(x["source_accuracy"]), [("b", _pct(x["accuracy"]))],
                         _fmt(x["base_loss"]), _fmt(x["source_loss"]), [("b", _fmt(x["loss"]))],
                         [("b", _fmt(x["retention"], 3))] + ([f" ({x['retention_kind']})"]
                                                             if x["retention_kind"] == "loss" else []),
                         _gain_pts(x["accuracy_gain"]), _signed(x["loss_gain"])])
        for task in f["other_tasks"]:
            m, b = f["eval"][task], data["base"].get(task, {})
            rows.append([task, "–", _pct(b.get("accuracy")), "–", _pct(m.get("accuracy")),
                         _fmt(b.get("loss")), "–", _fmt(m.get("loss")), "–",
                         _gain_pts(_diff(m.get("accuracy"), b.get("accuracy"))),
                         _signed(_diff(b.get("loss"), m.get("loss")))])
        blocks.append(("table", ["task", "source adapter", "base acc", "source acc", "fusion acc",
                                 "base loss", "source loss", "fusion loss", "retention",
                                 "acc gain", "loss gain"], rows))
        blocks.append(("p", [f"Mean retention {_fmt(r['mean_retention'], 3)}, worst "
                             f"{_fmt(r['worst_retention'], 3)}. "] + _routing_sentence(name, r, tol)))
    blocks.append(("img", "Scores per task: base, source adapter and fusions", figures["scores_figure"]))
    blocks.append(("img", "Retention per fusion and task", figures["retention_figure"]))
    if "weights_figure" in figures:
        blocks.append(("p", ["Retention on each task against the weight its adapter has in the fusion "
                             "(per-layer weights: their mean). Across a sweep of experiments, ",
                             ("code", "dvc plots diff"), " overlays the runs on the same axes (",
                             ("code", "reports/plots/weights.json"), ")."]))
        blocks.append(("img", "Retention against weight", figures["weights_figure"]))

    # baselines
    blocks.append(("h", 2, "Baselines"))
    header = ["model"] + [t for t in data["tasks"]]
    rows = [["base"] + [_score_cell(data["base"].get(t)) for t in data["tasks"]]]
    rows += [[f"adapter {a}" + (f" (task {data['task_of'][a]})" if data["task_of"][a] != a else "")]
             + [_score_cell(ev.get(t)) for t in data["tasks"]] for a, ev in data["adapters"].items()]
    blocks.append(("table", header, rows))
    blocks.append(("p", ["Each cell: exact-match accuracy / loss (loss alone for text sets); "
                         "n = examples scored."]))

    # geometry
    with_geo = {n: geometry_summary(f["modules"]) for n, f in fusions.items() if f["modules"]}
    if with_geo:
        blocks.append(("h", 2, "Geometry"))
        blocks.append(("p", ["Computed from the adapters alone, per module: cosine similarity between the "
                             "sources' weight deltas (0 = unrelated directions, so they interfere little), "
                             "the fraction of entries whose signs disagree, the Frobenius norms, and the "
                             "relative error of re-factoring the fused delta to the output rank."]))
        rows = []
        for name, g in with_geo.items():
            srcs = fusions[name]["adapters"]
            norms = ", ".join(f"{a} {_fmt(v)}" for a, v in zip(srcs, g["norms"] or []))
            rows.append([[("b", name)], str(g["modules"]), _fmt(g["mean_cosine"], 3),
                         _fmt(g["max_abs_cosine"], 3), _pct(g["sign_conflict"]), norms or "–",
                         _fmt(g["fused_norm"]), _fmt(g["mean_error"], 4), _fmt(g["max_error"], 4)])
        blocks.append(("table", ["fusion", "modules", "mean cosine", "max |cosine|", "sign conflicts",
                                 "source norms", "fused norm", "mean re-factoring error",
                                 "max re-factoring error"], rows))
        blocks.append(("img", "Geometry per module", figures["geometry_figure"]))

    # generations
    gens = data["generations"]
    prompts: list[str] = []
    for g in gens.values():
        prompts += [p for p in g if p not in prompts]
    if prompts:
        blocks.append(("h", 2, "Sample generations"))
        blocks.append(("p", ["Greedy answers to the free-form prompts."]))
        models = [m for m, g in gens.items() if g]
        rows = [[[("code", p)]] + [_sample_cell(gens[m].get(p)) for m in models] for p in prompts]
        blocks.append(("table", ["prompt"] + models, rows))

    # hashes
    rows = []
    for name, f in fusions.items():
        info = f["info"]
        for item in info.get("inputs") or []:
            rows.append([name, f"input {item.get('name', '')}".strip(), [("code", str(item.get("path", "–")))],
                         [("code", str(item.get("sha256", "–")))]])
        output = info.get("output") or {}
        for key, role in (("sha256", "output"), ("config_sha256", "output config")):
            if key in output:
                rows.append([name, role, [("code", str(output.get("path", f"fused/{name}")))],
                             [("code", str(output[key]))]])
    if rows:
        blocks.append(("h", 2, "Reproducibility"))
        blocks.append(("p", ["SHA-256 of the fused inputs and outputs: the same inputs and settings give "
                             "the same output bytes."]))
        blocks.append(("table", ["fusion", "role", "path", "sha256"], rows))
    return blocks


def _routing_sentence(name: str, r: dict, tol: float) -> list:
    if r["mean_retention"] is None:
        return [("b", name), ": no retention could be computed (no source scores)."]
    if r["worse_than_routing"]:
        worst = ", ".join(f"{t} ({r['tasks'][t]['retention']:.3f})" for t in r["regressions"])
        return [("b", name), f" is worse than routing each task to its own adapter: retention below "
                f"{1 - tol:.2f} on {worst}."]
    return [("b", name), f" is as good as routing each task to its own adapter (retention at least "
            f"{1 - tol:.2f} on every task)."]


def _setting_keys(settings: list[dict]) -> list[str]:
    """Keys with a value in some fusion: preferred ones first, then alphabetical."""
    present = {k for s in settings for k, v in s.items() if v not in (None, [], {}, "")}
    return [k for k in SETTING_ORDER if k in present] + sorted(present - set(SETTING_ORDER))


def _fmt_setting(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(", ", ": "))
    return str(v)


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def _fmt_num(x: float, key: str) -> str:
    return _pct(x) if key == "accuracy" else _fmt(x)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _gain_pts(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f} pts"


def _signed(x) -> str:
    return "–" if x is None else f"{x:+.3f}"


def _diff(a, b):
    return None if a is None or b is None else a - b


def _score_cell(m: dict | None) -> str:
    if m is None:
        return "–"
    acc = m.get("accuracy")
    loss = f"loss {_fmt(m.get('loss'))}"
    n = f" (n={m['n']})" if "n" in m else ""
    return (loss if acc is None else f"{_pct(acc)} / {loss}") + n


def _sample_cell(text: str | None) -> list:
    if text is None:
        return ["–"]
    if not text.strip():
        return ["(empty)"]
    return [("code", text)]


# ---------------------------------------------------------------------------- rendering


def _visible(s: str) -> str:
    """Control characters (model output can hold any byte) shown as escapes."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)


def _md_inline(part) -> str:
    if isinstance(part, str):
        s = _visible(part)
        s = re.sub(r"([\\`*|<>])", r"\\\1", s)
        # _ only starts or ends emphasis next to a non-word character
        return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", s)
    kind, text = part
    text = _visible(text)
    if kind == "code":
        text = text.replace("|", "\\|")  # GitHub splits cells on | even inside code
        fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
        pad = " " if text.startswith("`") or text.endswith("`") or text != text.strip() else ""
        return f"{fence}{pad}{text}{pad}{fence}"
    return f"**{_md_inline(text)}**"


def _md_parts(parts) -> str:
    if isinstance(parts, str):
        parts = [parts]
    return "".join(_md_inline(p) for p in parts).replace("\n", "<br>")


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + _md_parts([b[2]]))
        elif kind == "p":
            out.append(_md_parts(b[1]))
        elif kind == "list":
            out.append("\n".join("- " + _md_parts(item) for item in b[1]))
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_parts([h]) for h in header) + " |",
                     "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(_md_parts(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{_md_parts([b[1]])}]({b[2]})")
    return "\n\n".join(out) + "\n"


def _html_parts(parts) -> str:
    if isinstance(parts, str):
        parts = [parts]
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(html.escape(_visible(p)))
        elif p[0] == "code":
            out.append(f"<code>{html.escape(_visible(p[1]))}</code>")
        else:
            out.append(f"<strong>{_html_parts([p[1]])}</strong>")
    return "".join(out).replace("\n", "<br>")


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.5; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
table { border-collapse: collapse; margin: 1em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #eff1f3; border-radius: 4px; padding: 1px 4px; font-size: 90%; white-space: pre-wrap;
       word-break: break-all; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def to_html(blocks: list, title: str, images: dict[str, bytes]) -> str:
    """A self-contained page: images embedded as data URIs, no external resources."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{_html_parts([b[2]])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_html_parts(b[1])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_html_parts(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_html_parts([h])}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{_html_parts(c)}</td>" for c in row) + "</tr>"
                           for row in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(images[b[2]]).decode("ascii")
            out.append(f'<img alt="{html.escape(b[1])}" src="data:image/png;base64,{data}">')
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- files


def _json(obj) -> str:
    return json.dumps(_finite(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _finite(obj):
    """NaN and infinities (not JSON) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write(path: Path, content: bytes | str) -> Path:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    os.replace(tmp, path)
    return path
