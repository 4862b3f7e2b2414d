"""What the report says: the blocks that ``render`` turns into Markdown and HTML alike.

``report_blocks(data, figures, title)`` takes the structure ``gather.collect`` returns and the
path of each figure by role; a block is one of::

    ("h", level, text)  ("p", parts)  ("list", [parts, ...])  ("table", header, rows)  ("img", alt, path)

where parts is a list of ``str | ("code", str) | ("b", str)`` and a table cell is parts or a str.
"""

from __future__ import annotations

import json
import math

from pipeline.methods.registry import PARAMS
from pipeline.report.evidence import MIN_POINTS, MIN_RHO, league
from pipeline.report.formatting import MISSING, fmt, gain_pts, pct, signed
from pipeline.report.gather import best_fusions

# Settings shown first, in this order; other keys follow alphabetically.
SETTING_ORDER = ["method", *PARAMS]


def report_blocks(data: dict, figures: dict[str, str], title: str) -> list:
    """The whole report, section by section."""
    head = _summary(data, title)
    return [*head[:2], *_league(data), *head[2:], *_fusions(data), *_scores(data, figures),
            *_baselines(data), *_benchmarks(data), *_drift(data), *_signals(data), *_geometry(data, figures),
            *_generations(data), *_hashes(data)]


def _league(data: dict) -> list:
    """One row a method: its best setting chosen on the validation split, scored on the test split,
    next to the random control, the joint-training baseline and routing."""
    groups = league(data)
    if not groups:
        return []
    blocks: list = [
        ("h", 2, "League table"),
        ("p", ["One row a method, per set of source adapters. Each method's best setting is chosen "
               "on the validation split (highest mean retention on valid.jsonl), then scored on the "
               "test split: retention per task, mean and worst. ",
               ("b", "random"), ": the same fusion with every source replaced by a random adapter of "
               "the same ranks and per-module norms (how much comes from the learned directions at "
               "all). ", ("b", "joint training"), ": one adapter trained with the same trainer and "
               "budget on the union of the tasks' training sets. ", ("b", "KL"), ": off-task drift "
               "from the base model (nats per token, lower is better). Routing each task to its own "
               "adapter scores 1.0 by definition."]),
    ]
    for g in groups:
        tasks = g["tasks"]
        rows = []
        for r in g["rows"]:
            chosen = {"valid": f"valid ({r['candidates']})", "test": f"test ({r['candidates']}, no valid)",
                      "only one": "only setting"}[r["chosen_on"]]
            rows.append([[("b", r["method"])], r["fusion"], chosen]
                        + [fmt(r["tasks"].get(t), 3) for t in tasks]
                        + [[("b", fmt(r["mean"], 3))], fmt(r["worst"], 3), fmt(r["control_mean"], 3),
                           fmt(r["kl"], 4)])
        j = g["joint"]
        if j is not None:
            rows.append([[("b", "joint training")], f"adapter {j['name']}", "–"]
                        + [fmt(j["tasks"].get(t), 3) for t in tasks]
                        + [[("b", fmt(j["mean"], 3))], fmt(j["worst"], 3), MISSING, fmt(j["kl"], 4)])
        kls = [x for x in g["source_kl"].values() if x is not None]
        rows.append([[("b", "routing")], "each task to its own adapter", "–"] + ["1.000" for _ in tasks]
                    + ["1.000", "1.000", MISSING,
                       (f"{min(kls):.4f}–{max(kls):.4f}" if kls else MISSING)])
        blocks += [("h", 3, " + ".join(g["adapters"])),
                   ("table", ["method", "best setting", "chosen on (candidates)"]
                    + [f"{t} retention" for t in tasks] + ["mean", "worst", "random", "KL"], rows)]
    blocks.append(("p", ["Routing's KL is the range of the source adapters' own drift."]))
    return blocks


def _drift(data: dict) -> list:
    """Off-task drift of every model side by side."""
    rows = []

    def row(label, d):
        if d:
            rows.append([label, fmt(d.get("kl"), 4), fmt(d.get("loss"), 3), pct(d.get("agreement")),
                         str(d.get("n", MISSING))])

    row("base", data.get("base_drift"))
    for a, d in (data.get("adapter_drift") or {}).items():
        row(f"adapter {a}", d)
    for n, f in data["fusions"].items():
        row(f"fusion {n}", f.get("drift"))
        if f.get("control"):
            row(f"random control of {n}", f["control"].get("drift"))
    if not rows:
        return []
    return [("h", 2, "Off-task drift"),
            ("p", ["Prompts that belong to none of the tasks, answered greedily by the base model "
                   "(reports/offtask.jsonl). Per model, teacher-forced on the base's answers: the mean "
                   "KL divergence of its next-token distribution from the base's (nats per token), "
                   "its loss on the base's answers (the base's own is the floor) and how often its "
                   "most likely next token is the base's. Does a fusion disturb the base model more "
                   "than its sources do?"]),
            ("table", ["model", "KL from base", "base-answer loss", "top-1 agreement", "prompts"], rows)]


def _signals(data: dict) -> list:
    """The data-free signals per fusion, and how well each predicts measured retention."""
    rows = []
    for n, f in data["fusions"].items():
        s = f.get("signals") or {}
        if not s:
            continue
        kept = ", ".join(f"{a['name']} {fmt(a['kept'], 2)}" for a in s.get("adapters") or [])
        align = ", ".join(f"{a['name']} {fmt(a['alignment'], 2)}" for a in s.get("adapters") or [])
        rows.append([[("b", n)], kept or MISSING, align or MISSING, fmt(s.get("energy_kept"), 4),
                     fmt(s.get("mean_overlap"), 3), fmt(s.get("interference"), 3),
                     fmt(f["retention"]["mean_retention"], 3),
                     fmt((f.get("control") or {}).get("retention", {}).get("mean_retention"), 3)])
    if not rows:
        return []
    blocks: list = [
        ("h", 2, "Quality signals that need no data"),
        ("p", ["Computed by the fuse step from the factors alone (pipeline/signals.py): how much of "
               "each source's delta the fusion keeps (<dW_i, dW_F> / |dW_i|², 1 = all of it), the "
               "Iso-C alignment of each source with the fusion's dominant output directions, the "
               "energy kept by re-factoring to the output rank, the mean subspace overlap of the "
               "sources (principal angles of their column and row spaces) and TSV-Merge's task "
               "interference, next to the measured mean retention."]),
        ("table", ["fusion", "kept per source", "alignment per source", "energy kept", "source overlap",
                   "interference", "mean retention", "random control"], rows)]
    warn = [[("b", n), ": " + w] for n, f in data["fusions"].items()
            for w in (f.get("signals") or {}).get("warnings") or []]
    if warn:
        blocks.append(("list", warn))
    power = data.get("power") or {}
    prow = [[name, s["description"], fmt(s["spearman"], 3), str(s["n"]),
             fmt((s.get("within") or {}).get("spearman"), 3),
             f"{(s.get('within') or {}).get('n', 0)} in {(s.get('within') or {}).get('groups', 0)}",
             fmt((s.get("with_controls") or {}).get("spearman"), 3), str((s.get("with_controls") or {}).get("n", MISSING))]
            for name, s in (power.get("signals") or {}).items()]
    if prow:
        fit = power.get("fit")
        blocks += [("h", 3, "How well each signal predicts retention"),
                   ("p", ["Spearman rank correlation of each signal with the measured mean retention: "
                          "over all the fusions here (n = the fusions that have the signal); inside each "
                          "set of sources, pooled by size (the fusions of one set, compared with each "
                          "other: what a prediction is for, and where a signal of the sources alone has no "
                          "spread); and over the fusions and their random controls together (random "
                          "sources are shaped like the learned ones, so a signal of geometry alone cannot "
                          "tell them apart). Negative means a higher value predicts lower retention; ",
                          ("code", "fusion signals reports/signals.json OTHER/reports/signals.json"),
                          " pools several reports."]),
                   ("table", ["signal", "what it is", "Spearman (fusions)", "n", "Spearman (within source sets)",
                              "n in sets", "Spearman (with controls)", "n"], prow)]
        if fit:
            within = power["signals"][fit["signal"]]["within"]
            blocks.append(("p", ["Best: ", ("b", fit["signal"]), f" (rank correlation within source sets "
                                 f"{fmt(within['spearman'], 3)}, {within['n']} fusions in {within['groups']} sets). "
                                 f"Its least-squares fit over {fit['n']} fusions, retention ≈ {fit['intercept']:.3f} "
                                 f"{'+' if fit['slope'] >= 0 else '-'} {abs(fit['slope']):.3f} × "
                                 f"{fit['signal']}, clipped to the measured range {fit['range'][0]:.3f}–"
                                 f"{fit['range'][1]:.3f}, is the prediction ",
                                 ("code", "fusion validate --signals reports/signals.json"),
                                 " shows next to a fusion not evaluated yet (reports/signals.json)."]))
        else:
            usable = [(n, s["within"]["spearman"]) for n, s in power["signals"].items()
                      if (s.get("within") or {}).get("spearman") is not None]
            top = max(usable, key=lambda x: x[1], default=None)
            blocks.append(("p", ["No prediction: no signal reaches a rank correlation of "
                                 f"{MIN_RHO} with retention inside the sets of sources (over at least "
                                 f"{MIN_POINTS} fusions)"
                                 + (f"; the best is {top[0]} at {top[1]:.3f}." if top else ".")]))
    return blocks


def _summary(data: dict, title: str) -> list:
    fusions = data["fusions"]
    n_adapters = len({a for f in fusions.values() for a in f["adapters"]})
    items = []
    best = best_fusions(data)
    for key, objective in (("mean_retention", "mean retention"), ("worst_retention", "worst-task retention")):
        if best[key]:
            name, value = best[key]
            items.append([f"Best by {objective}: ", ("b", name), f" ({value:.3f})."])
    for name, f in fusions.items():
        items.append(_routing_sentence(name, f["retention"], data["tolerance"]))
    return [("h", 1, title),
            ("p", [f"{len(fusions)} fusion(s) of {n_adapters} adapter(s), evaluated on "
                   f"{len(data['tasks'])} task(s) against the base model and each source adapter "
                   "on its own task."]),
            ("list", items)]


def _fusions(data: dict) -> list:
    """What was fused how."""
    fusions = data["fusions"]
    keys = _setting_keys([f["settings"] for f in fusions.values()])
    rows = []
    for name, f in fusions.items():
        ranks = [m["rank"] for m in f["modules"].values() if m.get("rank") is not None]
        low, high = (min(ranks), max(ranks)) if ranks else (None, None)
        rows.append([[("b", name)], " + ".join(f["adapters"])]
                    + [_fmt_setting(f["settings"].get(k)) for k in keys]
                    + [MISSING if low is None else (str(low) if low == high else f"{low}–{high}")])
    return [("h", 2, "Fusions"), ("table", ["fusion", "adapters"] + keys + ["output rank"], rows)]


def _scores(data: dict, figures: dict[str, str]) -> list:
    tol = data["tolerance"]
    blocks: list = [
        ("h", 2, "Scores"),
        ("p", ["Retention is the fusion's score on a task divided by the source adapter's score "
               "on that task: exact-match accuracy where the task has answers, else "
               "source loss / fusion loss. 1.0 means the fusion does as well as routing the task "
               "to its own adapter. Gain is over the base model (accuracy in points; loss as "
               "base loss - fusion loss, so positive is better)."])]
    for name, f in data["fusions"].items():
        r = f["retention"]
        rows = []
        for task, x in r["tasks"].items():
            rows.append([task, x["adapter"],
                         pct(x["base_accuracy"]), pct(x["source_accuracy"]), [("b", pct(x["accuracy"]))],
                         fmt(x["base_loss"]), fmt(x["source_loss"]), [("b", fmt(x["loss"]))],
                         [("b", fmt(x["retention"], 3))] + ([f" ({x['retention_kind']})"]
                                                            if x["retention_kind"] == "loss" else []),
                         gain_pts(x["accuracy_gain"]), signed(x["loss_gain"])])
        for task in f["other_tasks"]:
            m, b = f["eval"][task], data["base"].get(task, {})
            rows.append([task, MISSING, pct(b.get("accuracy")), MISSING, pct(m.get("accuracy")),
                         fmt(b.get("loss")), MISSING, fmt(m.get("loss")), MISSING,
                         gain_pts(_diff(m.get("accuracy"), b.get("accuracy"))),
                         signed(_diff(b.get("loss"), m.get("loss")))])
        blocks += [("h", 3, name),
                   ("table", ["task", "source adapter", "base acc", "source acc", "fusion acc",
                              "base loss", "source loss", "fusion loss", "retention",
                              "acc gain", "loss gain"], rows),
                   ("p", [f"Mean retention {fmt(r['mean_retention'], 3)}, worst "
                          f"{fmt(r['worst_retention'], 3)}. "] + _routing_sentence(name, r, tol))]
    blocks.append(("img", "Scores per task: base, source adapter and fusions", figures["scores_figure"]))
    blocks.append(("img", "Retention per fusion and task", figures["retention_figure"]))
    if "weights_figure" in figures:
        blocks.append(("p", ["Retention on each task against the weight its adapter has in the fusion "
                             "(per-layer weights: their mean). Across a sweep of experiments, ",
                             ("code", "dvc plots diff"), " overlays the runs on the same axes (",
                             ("code", "reports/plots/weights.json"), ")."]))
        blocks.append(("img", "Retention against weight", figures["weights_figure"]))
    return blocks


def _baselines(data: dict) -> list:
    rows = [["base"] + [_score_cell(data["base"].get(t)) for t in data["tasks"]]]
    rows += [[f"adapter {a}" + (f" (task {data['task_of'][a]})" if data["task_of"][a] != a else "")]
             + [_score_cell(ev.get(t)) for t in data["tasks"]] for a, ev in data["adapters"].items()]
    return [("h", 2, "Baselines"),
            ("table", ["model"] + [t for t in data["tasks"]], rows),
            ("p", ["Each cell: exact-match accuracy / loss (loss alone for text sets); "
                   "n = examples scored."])]


def _benchmarks(data: dict) -> list:
    """The lm-eval tasks (``eval.lm_eval``) on every model: each metric, with its standard error."""
    bench = data.get("lm_eval")
    if not bench:
        return []
    models = [("base", bench["base"]), *((f"adapter {a}", s) for a, s in bench["adapters"].items()),
              *((f"fusion {n}", s) for n, s in bench["fusions"].items())]
    columns = []
    for _, scores in models:
        for task, metrics in scores.items():
            columns += [(task, m) for m in metrics if "_stderr" not in m and (task, m) not in columns]
    rows = []
    for label, scores in models:
        cells = []
        for task, m in columns:
            value, err = (scores.get(task) or {}).get(m), (scores.get(task) or {}).get(f"{m}_stderr")
            name, _, filt = m.partition(",")
            err = err if err is not None else (scores.get(task) or {}).get(f"{name}_stderr,{filt}")
            cells.append(MISSING if value is None else f"{value:.3f}" + (f" ± {err:.3f}" if err is not None else ""))
        rows.append([label] + cells)
    return [("h", 2, "Standard benchmarks (lm-eval)"),
            ("p", ["lm-evaluation-harness tasks (params.yaml: eval.lm_eval), run through mlx-lm's lm-eval "
                   "model on the base model, each source adapter and each fusion; ± is lm-eval's standard "
                   "error."]),
            ("table", ["model"] + [f"{t} {m}" for t, m in columns], rows)]


def _geometry(data: dict, figures: dict[str, str]) -> list:
    """The fuse step's geometry summary of each fusion (``pipeline.geometry.summarize``), with the
    fused norm over its modules and the re-factoring error of its output record."""
    rows = [_geometry_row(name, f) for name, f in data["fusions"].items() if f["geometry"]]
    if not rows and "geometry_figure" not in figures:
        return []
    blocks: list = [
        ("h", 2, "Geometry"),
        ("p", ["Computed from the adapters alone, per module: cosine similarity between the "
               "sources' weight deltas (0 = unrelated directions, so they interfere little), "
               "the fraction of entries whose signs disagree, the Frobenius norms, and the "
               "relative error of re-factoring the fused delta to the output rank."])]
    if rows:
        blocks.append(("table", ["fusion", "modules", "mean cosine", "max |cosine|", "sign conflicts",
                                 "source norms", "fused norm", "mean re-factoring error",
                                 "max re-factoring error"], rows))
    if "geometry_figure" in figures:
        blocks.append(("img", "Geometry per module", figures["geometry_figure"]))
    return blocks


def _geometry_row(name: str, f: dict) -> list:
    g, output = f["geometry"], f["info"].get("output") or {}
    cosine = [p["cosine"] for p in g.get("pairs") or []]
    conflict = [p["sign_conflict"] for p in g.get("pairs") or []]
    norms = ", ".join(f"{a} {fmt(x['norm'])}" for a, x in zip(f["adapters"], g.get("adapters") or []))
    fused = [m["fused_norm"] for m in f["modules"].values() if m.get("fused_norm") is not None]
    return [[("b", name)], str(g.get("modules", MISSING)), fmt(_pooled_mean(cosine), 3),
            fmt(_max_abs(cosine), 3), pct(_pooled_mean(conflict)), norms or MISSING,
            # total Frobenius norm over modules: sqrt of the sum of squared module norms
            fmt(math.sqrt(sum(x * x for x in fused)) if fused else None),
            fmt(output.get("mean_error"), 4), fmt(output.get("max_error"), 4)]


def _pooled_mean(stats: list[dict]) -> float | None:
    """Mean over all pairs and modules, from each pair's ``{"mean", "modules"}`` statistics."""
    n = sum(s["modules"] for s in stats)
    return sum(s["mean"] * s["modules"] for s in stats if s["modules"]) / n if n else None


def _max_abs(stats: list[dict]) -> float | None:
    """Largest magnitude over all pairs and modules, from each pair's ``{"min", "max"}``."""
    return max((max(abs(s["min"]), abs(s["max"])) for s in stats if s["modules"]), default=None)


def _generations(data: dict) -> list:
    gens = data["generations"]
    prompts: list[str] = []
    for g in gens.values():
        prompts += [p for p in g if p not in prompts]
    if not prompts:
        return []
    models = [m for m, g in gens.items() if g]
    rows = [[[("code", p)]] + [_sample_cell(gens[m].get(p)) for m in models] for p in prompts]
    return [("h", 2, "Sample generations"),
            ("p", ["Greedy answers to the free-form prompts."]),
            ("table", ["prompt"] + models, rows)]


def _hashes(data: dict) -> list:
    rows = []
    base = data.get("base_model") or {}
    if base.get("revision"):  # a hub id: the revision loaded
        rows.append(["all", "base model", [("code", str(base.get("id")))], [("code", f"revision {base['revision']}")]])
    else:
        for name, digest in (base.get("files") or {}).items():
            rows.append(["all", "base model", [("code", f"{base.get('path', '')}/{name}")], [("code", str(digest))]])
    for name, f in data["fusions"].items():
        info = f["info"]
        for item in info.get("inputs") or []:
            rows.append([name, f"input {item.get('name', '')}".strip(), [("code", str(item.get("path", MISSING)))],
                         [("code", str(item.get("sha256", MISSING)))]])
        output = info.get("output") or {}
        for key, role in (("sha256", "output"), ("config_sha256", "output config")):
            if key in output:
                rows.append([name, role, [("code", str(output.get("path", f"fused/{name}")))],
                             [("code", str(output[key]))]])
    if not rows:
        return []
    return [("h", 2, "Reproducibility"),
            ("p", ["SHA-256 of the base model's files (or the hub revision loaded), and of the fused "
                   "inputs and outputs: the same inputs and settings give the same output bytes."]),
            ("table", ["fusion", "role", "path", "sha256"], rows)]


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
        return MISSING
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(", ", ": "))
    return str(v)


def _diff(a, b):
    return None if a is None or b is None else a - b


def _score_cell(m: dict | None) -> str:
    if m is None:
        return MISSING
    acc = m.get("accuracy")
    loss = f"loss {fmt(m.get('loss'))}"
    n = f" (n={m['n']})" if "n" in m else ""
    return (loss if acc is None else f"{pct(acc)} / {loss}") + n


def _sample_cell(text: str | None) -> list:
    if text is None:
        return [MISSING]
    if not text.strip():
        return ["(empty)"]
    return [("code", text)]
