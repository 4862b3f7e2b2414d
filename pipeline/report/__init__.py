"""Write up evaluated fusions: DVC metrics, DVC plot data, figures and a human report (Markdown, HTML).

``write_report(out_dir, params, baselines, evals, infos, tasks_of=...)`` takes plain dicts (JSON
already loaded; nothing here runs a model): the resolved settings of each fusion (``adapters``
required), the ``evaluate`` results of the base model, of each source adapter and of each fusion,
and per fusion what the fuse step recorded in ``fusion.json`` (optional; its geometry table comes
from the record's ``geometry`` summary). It writes the files of ``REPORT_FILES`` under ``out_dir``
and returns their paths by role; ``dvc_plots`` gives the matching ``plots:`` entries of ``dvc.yaml``.
Same inputs give byte-identical files. The input formats in full: ``docs/report.md``.

Modules: ``gather`` (inputs to one structure), ``evidence`` (league table, predictive power of the
signals), ``metrics`` (metrics, headline, plot rows),
``figures`` (PNGs), ``content`` (what the report says), ``render`` (Markdown, HTML), ``files``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.evaluate import ROUTING_TOLERANCE
from pipeline.report.content import report_blocks
from pipeline.report.evidence import predictive_power, signal_points
from pipeline.report.figures import geometry_figure, retention_figure, scores_figure, weights_figure
from pipeline.report.files import to_json, write_atomic
from pipeline.report.gather import collect, lm_eval_scores
from pipeline.report.metrics import headline, metrics, plot_rows
from pipeline.report.render import to_html, to_markdown

__all__ = ["REPORT_FILES", "dvc_plots", "write_report"]

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
    "signals": "signals.json",
    "markdown": "report.md",
    "html": "report.html",
}


def write_report(out_dir: str | Path, params: dict, baselines: dict, evals: dict,
                 infos: dict | None = None, *, tasks_of: dict | None = None,
                 tolerance: float = ROUTING_TOLERANCE,
                 title: str = "Adapter fusion report", controls: dict | None = None,
                 joint: str | None = None, lm_eval: dict | None = None) -> dict[str, Path]:
    """Write metrics, plot data, figures and the report under ``out_dir``; return their paths by role.

    ``figures/geometry.png`` is written when some fusion has per-module figures and
    ``figures/weights.png`` when some fusion gives its adapters weights; every other file always.
    ``controls`` (per fusion, its random control's record) and ``joint`` (the joint-training
    adapter's name) add those baselines; ``lm_eval`` (``{"baselines": the lm_eval_baselines stage's
    record, "fusions": {name: the lm_eval@NAME stage's record}}``) adds the lm-eval scores; ``signals.json`` holds the data-free signals of every
    fusion and control against measured retention, their rank correlations and the fit of the best.
    """
    out = Path(out_dir)
    data = collect(params, baselines, evals, infos or {}, tasks_of or {}, tolerance, controls, joint)
    data["lm_eval"] = lm_eval_scores(lm_eval, list(data["fusions"]))
    points = signal_points(data)
    data["power"] = predictive_power(points)
    written: dict[str, Path] = {}

    def put(role: str, content: bytes | str) -> None:
        written[role] = write_atomic(out / REPORT_FILES[role], content)

    put("metrics", to_json(metrics(data)))
    put("headline", to_json(headline(data)))
    put("signals", to_json({**data["power"], "points": points}))
    plots = plot_rows(data)
    for role, rows in plots.items():
        put(role, to_json(rows))
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
