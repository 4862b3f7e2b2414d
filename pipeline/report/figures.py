"""The report's figures as PNG bytes (matplotlib, no display needed).

Each function takes the structure ``gather.collect`` returns (``weights_figure``: the rows of
``metrics.weight_rows``). PNGs carry no metadata, so the same data gives the same bytes.
"""

from __future__ import annotations

import re

from pipeline.report.formatting import fmt, pct

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
            ax.text(v, y, f" {pct(v) if key == 'accuracy' else fmt(v)}", va="center", fontsize=8)
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
            "mean cosine between sources": [_pair_mean(m.get("cosine")) for m in modules.values()],
            "sign-conflict rate": [_pair_mean(m.get("sign_conflict")) for m in modules.values()],
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


def _pair_mean(matrix) -> float | None:
    """Mean of the off-diagonal entries (i < j) of one module's pairwise matrix (cosine, sign
    conflict); a number stands for one pair. Undefined entries (``None``: a module one adapter of
    the pair does not change) are left out."""
    if matrix is None:
        return None
    if isinstance(matrix, (int, float)):
        return float(matrix)
    p = [matrix[i][j] for i in range(len(matrix)) for j in range(i + 1, len(matrix))
         if matrix[i][j] is not None]
    return sum(p) / len(p) if p else None
