"""The report's figures as PNG bytes (matplotlib, no display needed).

Each function takes the structure ``gather.collect`` returns (``weights_figure``: the rows of
``metrics.weight_rows``). PNGs carry no metadata, so the same data gives the same bytes.
"""

from __future__ import annotations

import re

from pipeline.report.formatting import fmt, pct

_FUSION_COLOURS = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_BASE_COLOUR, _ADAPTER_COLOUR, _JOINT_COLOUR = "#a0a0a0", "#1f77b4", "#17344f"


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
    if model.endswith("(joint training)"):
        return _JOINT_COLOUR
    if model.startswith("adapter "):
        return _ADAPTER_COLOUR
    return _FUSION_COLOURS[fusion_names.index(model[len("fusion "):]) % len(_FUSION_COLOURS)]


def scores_figure(data: dict) -> bytes:
    """Per task: the base, the task's own adapter(s), the joint-training adapter and every fusion;
    accuracy and loss panels."""
    fusion_names = list(data["fusions"])
    groups = []  # (task, [(model, metrics)])
    for task in data["tasks"]:
        models = [("base", data["base"].get(task))]
        models += [(f"adapter {a}", ev.get(task)) for a, ev in data["adapters"].items()
                   if data["task_of"].get(a) == task]
        if data.get("joint"):
            models.append((f"adapter {data['joint']['name']} (joint training)", data["joint"]["eval"].get(task)))
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


def source_pairs(data: dict) -> list[tuple[str, str, str, int, int]]:
    """Each pair of source adapters once: ``(a, b, fusion, i, j)``, the first fusion (with per-module
    figures) that fuses both and the pair's indices in it."""
    seen, out = set(), []
    for name, f in data["fusions"].items():
        if not f["modules"]:
            continue
        ad = f["adapters"]
        for i in range(len(ad)):
            for j in range(i + 1, len(ad)):
                key = frozenset((ad[i], ad[j]))
                if key not in seen and len(key) == 2:
                    seen.add(key)
                    out.append((ad[i], ad[j], name, i, j))
    return out


def geometry_figure(data: dict) -> bytes:
    """The sources' pairwise geometry per module, once per pair of adapters (cosine, sign conflicts,
    column- and row-space overlap), then what is specific to each fusion: the least share of a
    source it keeps, per module, and its re-factoring error."""
    pairs = source_pairs(data)
    fusions = [(n, f["modules"]) for n, f in data["fusions"].items() if f["modules"]]
    has_error = any((m.get("error") or 0) > 0 for _, mods in fusions for m in mods.values())
    n_panels = len(pairs) + 1 + has_error
    fig = _figure(9.0, 0.9 + 2.6 * n_panels)
    axes = list(fig.subplots(n_panels, 1, squeeze=False)[:, 0])
    for ax, (a, b, name, i, j) in zip(axes, pairs):
        modules = data["fusions"][name]["modules"]
        series = {
            "cosine": [_entry(m.get("cosine"), i, j) for m in modules.values()],
            "sign-conflict rate": [_entry(m.get("sign_conflict"), i, j) for m in modules.values()],
            "column-space overlap": [_entry(m.get("column_overlap"), i, j) for m in modules.values()],
            "row-space overlap": [_entry(m.get("row_overlap"), i, j) for m in modules.values()],
        }
        for (label, ys), marker in zip(series.items(), "osx^"):
            pts = [(x, y) for x, y in enumerate(ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker=marker, ms=3, lw=1, label=label)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"sources {a} and {b}: geometry per module ({len(modules)} modules)", fontsize=10)
        _module_ticks(ax, modules)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    names = [n for n, _ in fusions]
    ax = axes[len(pairs)]
    for name, modules in fusions:
        ys = [_least(m.get("kept")) for m in modules.values()]
        pts = [(x, y) for x, y in enumerate(ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1, label=name,
                    color=_colour(f"fusion {name}", names))
    ax.axhline(1.0, color="black", lw=0.5)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title("per fusion: least share of a source's delta kept, per module (<dW_i, dW_F> / |dW_i|²)",
                 fontsize=10)
    _module_ticks(ax, fusions[0][1] if fusions else {})
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        ax.text(0.5, 0.5, "no per-module signals recorded", transform=ax.transAxes, ha="center",
                color="#707070")
    if has_error:
        ax = axes[-1]
        for name, modules in fusions:
            ys = [m.get("error") for m in modules.values()]
            if any(y for y in ys if y is not None):
                ax.plot(range(len(ys)), [y or 0.0 for y in ys], marker="x", ms=3, lw=1, label=name,
                        color=_colour(f"fusion {name}", names))
        ax.set_title("per fusion: re-factoring error per module (|dW - dW_r| / |dW|)", fontsize=10)
        _module_ticks(ax, fusions[0][1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _png(fig)


def _module_ticks(ax, modules) -> None:
    if 0 < len(modules) <= 24:
        ax.set_xticks(list(range(len(modules))), [_short_module(m) for m in modules], rotation=60,
                      ha="right", fontsize=7)
    else:
        ax.set_xlabel("module index (file order)")


def _entry(matrix, i: int, j: int) -> float | None:
    if matrix is None or isinstance(matrix, (int, float)):
        return None if matrix is None else float(matrix)
    return matrix[i][j]


def _least(values) -> float | None:
    values = [v for v in values or [] if v is not None]
    return min(values) if values else None


def _short_module(name: str) -> str:
    return re.sub(r"^(base_model\.model\.)?model\.layers\.", "L", name)
