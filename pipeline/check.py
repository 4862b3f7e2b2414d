"""The regression gate: compare a run's metrics with a baseline's and list what got worse.

Inputs are ``reports/metrics.json`` dicts as ``pipeline.report.metrics`` writes them::

    {"fusions": {FUSION: {"mean_retention", "worst_retention", "worse_than_routing",
                          "tasks": {TASK: {"accuracy", "loss", "retention"}}}}, ...}

Every key below ``fusions`` may be missing (``None`` values are left out of the file).
``gate`` gathers the inputs (the metrics committed at a git revision, the workspace's, and whether
``dvc status`` is clean) and compares them; nothing here prints: the ``fusion check`` command does.

What counts as a regression, for each fusion present in both the baseline and the current metrics
(``Tolerances``, the ``check:`` section of ``params.yaml``):

- its mean or worst retention, or a task's retention, drops by more than ``retention_drop``;
- a task's exact-match accuracy drops by more than ``accuracy_drop``;
- a task's loss rises by more than ``loss_rise`` (a fraction of the baseline loss: 0.05 = 5 %);
- a figure the baseline had is missing now.

And, for every current fusion (new ones too), the floors: mean retention under
``min_mean_retention``, worst retention under ``min_worst_retention``, a task's accuracy under
``min_accuracy`` (each ``None`` = no floor). ``fusions: {NAME: {...}}`` in the section overrides any of
these for one fusion. A fusion that only the baseline has is a note, not a regression.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from pipeline.errors import FusionError

# A difference this small is rounding, never a regression.
EPSILON = 1e-9


@dataclass(frozen=True)
class Tolerances:
    retention_drop: float = 0.02
    accuracy_drop: float = 0.02
    loss_rise: float = 0.05
    min_mean_retention: float | None = None
    min_worst_retention: float | None = None
    min_accuracy: float | None = None


@dataclass(frozen=True)
class Regression:
    """One figure of one fusion that got worse (``kind`` "drop", "rise", "floor" or "missing")."""
    fusion: str
    figure: str  # "mean retention", "up accuracy", ...
    kind: str
    baseline: float | None
    current: float | None
    limit: float | None  # the tolerance (drop, rise) or the floor

    def __str__(self) -> str:
        b, c = _fmt(self.baseline), _fmt(self.current)
        if self.kind == "missing":
            return f"{self.fusion}: {self.figure} was {b}, now missing"
        if self.kind == "floor" and self.current is None:
            return f"{self.fusion}: {self.figure} is missing (floor {_fmt(self.limit)})"
        if self.kind == "floor":
            return f"{self.fusion}: {self.figure} {c} is under the floor {_fmt(self.limit)}"
        if self.kind == "rise":
            rel = (self.current - self.baseline) / self.baseline
            return (f"{self.fusion}: {self.figure} {b} -> {c} (+{rel:.1%}; "
                    f"tolerance +{self.limit:.1%})")
        return (f"{self.fusion}: {self.figure} {b} -> {c} ({self.current - self.baseline:+.4f}; "
                f"tolerance {self.limit:g})")


@dataclass
class CheckResult:
    regressions: list[Regression]
    notes: list[str]
    rows: list[dict]  # per fusion: name, baseline/current mean and worst retention, regressions

    @property
    def ok(self) -> bool:
        return not self.regressions


def tolerances(section: dict | None, where: str = "params.yaml: check") -> tuple[Tolerances, dict[str, Tolerances]]:
    """The default tolerances and the per-fusion ones from a ``check:`` section; raise on bad values."""
    section = dict(section or {})
    per_fusion = section.pop("fusions", None) or {}
    if not isinstance(per_fusion, dict):
        raise FusionError(f"{where}.fusions: expected a mapping of fusion name to tolerances")
    default = _tolerances(Tolerances(), section, where)
    return default, {str(name): _tolerances(default, values or {}, f"{where}.fusions.{name}")
                     for name, values in per_fusion.items()}


def _tolerances(start: Tolerances, values: dict, where: str) -> Tolerances:
    if not isinstance(values, dict):
        raise FusionError(f"{where}: expected a mapping")
    known = {f.name for f in fields(Tolerances)}
    unknown = set(values) - known
    if unknown:
        raise FusionError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(known))})")
    for key, v in values.items():
        floor = key.startswith("min_")
        if v is None and floor:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise FusionError(f"{where}.{key}: expected a number >= 0{' or null' if floor else ''}, got {v!r}")
    return replace(start, **{k: (None if v is None else float(v)) for k, v in values.items()})


def fusion_metrics(metrics, where: str) -> dict:
    """The ``fusions`` mapping of a metrics dict; raise when there is none (never a silent pass)."""
    fusions = metrics.get("fusions") if isinstance(metrics, dict) else None
    if not isinstance(fusions, dict) or not fusions:
        raise FusionError(f"{where}: no fusion metrics (expected {{\"fusions\": {{NAME: ...}}}})")
    for name, f in fusions.items():
        tasks = f.get("tasks", {}) if isinstance(f, dict) else None
        if not isinstance(tasks, dict) or not all(isinstance(t, dict) for t in tasks.values()):
            raise FusionError(f"{where}: fusion {name!r}: expected {{\"mean_retention\", ..., \"tasks\": "
                              "{TASK: {...}}}")
    return fusions


def compare(current: dict, baseline: dict, default: Tolerances | None = None,
            per_fusion: dict[str, Tolerances] | None = None) -> CheckResult:
    """Every regression of ``current`` against ``baseline`` (metrics dicts), with a summary per fusion."""
    default = default or Tolerances()
    per_fusion = per_fusion or {}
    now = fusion_metrics(current, "current metrics")
    before = fusion_metrics(baseline, "baseline metrics")
    regressions: list[Regression] = []
    notes = [f"{name}: in the baseline only (not checked)" for name in before if name not in now]
    rows = []
    for name, cur in now.items():
        tol = per_fusion.get(name, default)
        base = before.get(name)
        found = _floors(name, cur, tol)
        if base is None:
            notes.append(f"{name}: new (no baseline; floors only)")
        else:
            found = _drops(name, base, cur, tol) + found
        regressions += found
        rows.append({"fusion": name, "regressions": len(found), "new": base is None,
                     **{f"{side}_{key}": (m or {}).get(key) for side, m in (("baseline", base), ("current", cur))
                        for key in ("mean_retention", "worst_retention")}})
    return CheckResult(regressions, notes, rows)


def _drops(name: str, base: dict, cur: dict, tol: Tolerances) -> list[Regression]:
    found = []

    def drop(figure: str, b, c, limit: float) -> None:
        if b is None:
            return
        if c is None:
            found.append(Regression(name, figure, "missing", b, None, limit))
        elif b - c > limit + EPSILON:
            found.append(Regression(name, figure, "drop", b, c, limit))

    drop("mean retention", base.get("mean_retention"), cur.get("mean_retention"), tol.retention_drop)
    drop("worst retention", base.get("worst_retention"), cur.get("worst_retention"), tol.retention_drop)
    cur_tasks = cur.get("tasks") or {}
    for task, b in (base.get("tasks") or {}).items():
        c = cur_tasks.get(task) or {}
        drop(f"{task} retention", b.get("retention"), c.get("retention"), tol.retention_drop)
        drop(f"{task} accuracy", b.get("accuracy"), c.get("accuracy"), tol.accuracy_drop)
        bl, cl = b.get("loss"), c.get("loss")
        if bl is not None and cl is None:
            found.append(Regression(name, f"{task} loss", "missing", bl, None, tol.loss_rise))
        elif bl is not None and bl > 0 and (cl - bl) / bl > tol.loss_rise + EPSILON:
            found.append(Regression(name, f"{task} loss", "rise", bl, cl, tol.loss_rise))
    return found


def _floors(name: str, cur: dict, tol: Tolerances) -> list[Regression]:
    found = []

    def floor(figure: str, c, limit) -> None:
        if limit is not None and (c is None or c < limit - EPSILON):
            found.append(Regression(name, figure, "floor", None, c, limit))

    floor("mean retention", cur.get("mean_retention"), tol.min_mean_retention)
    floor("worst retention", cur.get("worst_retention"), tol.min_worst_retention)
    if tol.min_accuracy is not None:
        for task, c in (cur.get("tasks") or {}).items():
            if c.get("accuracy") is not None:
                floor(f"{task} accuracy", c["accuracy"], tol.min_accuracy)
    return found


def could_not_run_markdown(error: FusionError, baseline: str) -> str:
    """The Markdown summary of a check that could not be made: one item per problem."""
    lines = "\n".join(f"- {line}" for line in str(error).splitlines())
    return f"## Fusion check against `{baseline}`: could not run\n\n{lines}\n"


def to_markdown(result: CheckResult, baseline: str) -> str:
    """A short Markdown summary (for a CI job summary): one row per fusion, then the regressions."""
    verdict = "passed" if result.ok else f"failed: {len(result.regressions)} regression(s)"
    lines = [f"## Fusion check against `{baseline}`: {verdict}", "",
             "| fusion | mean retention (baseline -> now) | worst retention (baseline -> now) | status |",
             "|---|---|---|---|"]
    for r in result.rows:
        status = "new" if r["new"] and not r["regressions"] else (
            f"{r['regressions']} regression(s)" if r["regressions"] else "ok")
        lines.append(f"| {r['fusion']} | {_fmt(r['baseline_mean_retention'])} -> {_fmt(r['current_mean_retention'])}"
                     f" | {_fmt(r['baseline_worst_retention'])} -> {_fmt(r['current_worst_retention'])} | {status} |")
    if result.regressions:
        lines += ["", "Regressions:", ""] + [f"- {r}" for r in result.regressions]
    if result.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


# ---------------------------------------------------------------------------- the inputs of the gate


def gate(baseline: str, metrics: Path, section: dict | None, where: str, status: bool = True) -> CheckResult:
    """Compare the workspace's ``metrics`` with the ones committed at git revision ``baseline``,
    with the tolerances of the ``check:`` ``section``. With ``status``, ``dvc status`` must be clean.
    Raise one FusionError listing every reason the check cannot be made."""
    default, per_fusion = tolerances(section, where)
    problems = []
    if status:
        stale = stale_stages()
        if stale:
            problems.append(f"pipeline is stale: dvc status lists {', '.join(stale)} "
                            "(run dvc repro, then check)")
    try:
        before = metrics_json(git_show(baseline, metrics), f"baseline {baseline}:{metrics}")
    except FusionError as e:
        problems.append(str(e))
    if not metrics.is_file():
        problems.append(f"{metrics}: not found (run dvc repro first)")
    if problems:
        raise FusionError("\n".join(problems))
    now = metrics_json(metrics.read_text(), str(metrics))
    return compare(now, before, default, per_fusion)


def git_show(rev: str, path: Path) -> str:
    """The text of ``path`` (relative to the current directory) at git revision ``rev``."""
    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    if known.returncode != 0:
        raise FusionError(f"baseline {rev}: not a git revision here (fetch it first, e.g. git fetch origin main)")
    if path.is_absolute():
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True).stdout.strip()
        spec = f"{rev}:{path.resolve().relative_to(Path(top).resolve()).as_posix()}"
    else:
        spec = f"{rev}:./{path.as_posix()}"  # relative to the current directory
    shown = subprocess.run(["git", "show", spec], capture_output=True, text=True)
    if shown.returncode != 0:
        raise FusionError(f"baseline {rev}: has no {path} (commit the metrics of a pipeline run there; "
                          "without a baseline the check fails rather than pass silently)")
    return shown.stdout


def metrics_json(text: str, where: str) -> dict:
    """A metrics file's text, parsed and checked to hold fusion metrics."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FusionError(f"{where}: not valid JSON ({e.msg})") from None
    fusion_metrics(data, where)
    return data


def stale_stages() -> list[str]:
    """The stages of the pipeline in the current directory (its ``dvc.yaml``) that ``dvc status`` lists
    as changed: empty when it is up to date. Other pipelines of the repository (``real/``) are theirs."""
    exe = Path(sys.executable).parent / "dvc"
    r = subprocess.run([str(exe) if exe.exists() else "dvc", "status", "--json", "dvc.yaml"],
                       capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise FusionError(f"dvc status failed: {why}")
    return sorted(json.loads(lines[-1]))
