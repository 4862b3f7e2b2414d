"""What the studio shows from a project: its params, the committed reports and the DVC experiments.

Everything is addressed by name (a fusion, an adapter, an experiment): the paths come from
``params.yaml`` and the report layout (``reports/metrics.json``, ``reports/baselines.json``,
``reports/fusions/NAME/{eval,fusion}.json``), never from the page. Nothing here runs a model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import FusionError
from pipeline.params import Params, load_params, resolve


@dataclass
class Project:
    """A DVC project of this tool: its directory and its resolved ``params.yaml``."""
    root: Path
    params: Params

    @classmethod
    def open(cls, root: str | Path = ".") -> "Project":
        root = Path(root).resolve()
        where = root / "params.yaml"
        return cls(root, resolve(load_params(where), str(where)))

    # --- names and the paths they stand for (the only way from a name to a file) -------------

    @property
    def fusions(self) -> list[str]:
        return list(self.params.fusions)

    @property
    def adapters(self) -> list[str]:
        return list(self.params.adapters)

    def fusion(self, name: str):
        if name not in self.params.fusions:
            raise FusionError(f"unknown fusion {name!r} (declared: {', '.join(self.params.fusions)})")
        return self.params.fusions[name]

    def adapter_path(self, name: str) -> Path:
        if name not in self.params.adapters:
            raise FusionError(f"unknown adapter {name!r} (declared: {', '.join(self.params.adapters)})")
        return self.root / self.params.adapters[name].path

    def base_model(self) -> str:
        """The base model: a directory under the project (resolved) or a hub id as given."""
        base = self.params.base_model
        local = self.root / base
        return str(local) if local.exists() or base.count("/") != 1 else base

    def fused_path(self, name: str) -> Path | None:
        """``fused/NAME`` when the pipeline has built it (an adapter config is there), else None."""
        self.fusion(name)
        path = self.root / "fused" / name
        return path if (path / "adapter_config.json").is_file() else None

    def valid_set(self, name: str) -> Path:
        """The validation set (valid.jsonl) of adapter ``name``, the set the live score reads."""
        from pipeline.search.run import valid_split

        decl = self.params.adapters[name]
        return valid_split(None if decl.data is None else self.root / decl.data, name)

    # --- the committed reports -------------------------------------------------------------

    def report(self) -> dict:
        """The report's structure (``pipeline.report.gather.collect``) over the fusions whose
        evaluation is under ``reports/fusions``; ``{}`` when the pipeline has not run yet."""
        from pipeline.evaluate import ROUTING_TOLERANCE
        from pipeline.report.gather import collect

        reports = self.root / "reports"
        baselines = _read_json(reports / "baselines.json")
        if baselines is None:
            return {}
        settings, evals, infos = {}, {}, {}
        for name, f in self.params.fusions.items():
            ev = _read_json(reports / "fusions" / name / "eval.json")
            if ev is None or any(a not in (baselines.get("adapters") or {}) for a in f.adapters):
                continue
            info = _read_json(reports / "fusions" / name / "fusion.json") or {}
            settings[name] = {"adapters": f.adapters, **f.spec.to_json()}
            evals[name], infos[name] = ev, info
        if not settings:
            return {}
        return collect(settings, baselines, evals, infos, {}, ROUTING_TOLERANCE)

    def experiments(self) -> list[dict]:
        """Rows of ``dvc exp show --json`` (the workspace, each commit and each experiment)."""
        return experiment_rows(dvc_json(self.root, ["exp", "show", "--json"]))


# ---------------------------------------------------------------------------- tables


def fusion_rows(data: dict) -> list[dict]:
    """One row per reported fusion: its method, adapters, weights, headline and per-task retention."""
    rows = []
    for name, f in (data.get("fusions") or {}).items():
        r = f["retention"]
        s = f["settings"]
        row = {"fusion": name, "method": s.get("method"), "adapters": ", ".join(f["adapters"]),
               "weights": _short(s.get("weights")), "mean retention": _round(r["mean_retention"]),
               "worst retention": _round(r["worst_retention"]),
               "worse than routing": "yes" if r["worse_than_routing"] else "no"}
        for task in data["tasks"]:
            x = r["tasks"].get(task)
            row[f"retention {task}"] = _round(x["retention"]) if x else None
        rows.append(row)
    return rows


def baseline_rows(data: dict) -> list[dict]:
    """One row per model (the base, each adapter): accuracy and loss on every task."""
    rows = []
    models = [("base", data.get("base") or {})]
    models += [(f"adapter {a}", ev) for a, ev in (data.get("adapters") or {}).items()]
    for model, ev in models:
        row = {"model": model}
        for task in data.get("tasks") or []:
            m = ev.get(task) or {}
            row[f"accuracy {task}"] = _round(m.get("accuracy"))
            row[f"loss {task}"] = _round(m.get("loss"))
        rows.append(row)
    return rows


def compare_rows(data: dict, names: list[str]) -> list[dict]:
    """Fusions side by side: one row per figure (settings, headline, per task), one column each."""
    fusions = {n: data["fusions"][n] for n in names if n in (data.get("fusions") or {})}
    rows: list[dict] = []

    def add(label: str, value_of) -> None:
        rows.append({"figure": label, **{n: value_of(f) for n, f in fusions.items()}})

    add("method", lambda f: f["settings"].get("method"))
    add("adapters", lambda f: ", ".join(f["adapters"]))
    add("weights", lambda f: _short(f["settings"].get("weights")))
    add("density", lambda f: _short(f["settings"].get("density")))
    add("t", lambda f: _short(f["settings"].get("t")))
    add("mean retention", lambda f: _round(f["retention"]["mean_retention"]))
    add("worst retention", lambda f: _round(f["retention"]["worst_retention"]))
    for task in [t for t in data.get("tasks") or [] if any(t in f["eval"] for f in fusions.values())]:
        add(f"{task}: retention", lambda f, t=task: _round((f["retention"]["tasks"].get(t) or {}).get("retention")))
        add(f"{task}: accuracy", lambda f, t=task: _round((f["eval"].get(t) or {}).get("accuracy")))
        add(f"{task}: loss", lambda f, t=task: _round((f["eval"].get(t) or {}).get("loss")))
    return rows


def compare_figures(data: dict, names: list[str]) -> dict[str, bytes]:
    """The report's retention and scores figures drawn for the chosen fusions alone (PNG bytes)."""
    from pipeline.report.figures import retention_figure, scores_figure

    chosen = {n: data["fusions"][n] for n in names if n in (data.get("fusions") or {})}
    if not chosen:
        return {}
    tasks = [t for t in data["tasks"] if any(t in f["eval"] for f in chosen.values())]
    subset = {**data, "fusions": chosen, "tasks": tasks}
    return {"retention": retention_figure(subset), "scores": scores_figure(subset)}


# ---------------------------------------------------------------------------- experiments


def dvc_command() -> str:
    """The ``dvc`` next to this Python (the project's virtualenv), else the one on PATH."""
    exe = Path(sys.executable).parent / "dvc"
    return str(exe) if exe.exists() else "dvc"


def dvc_json(root: Path, args: list[str], timeout: float = 120) -> object:
    """Run ``dvc ARGS`` (an argument list, no shell) in ``root`` and parse its JSON output."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        r = subprocess.run([dvc_command(), *args], cwd=root, capture_output=True, text=True,
                           timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FusionError(f"dvc {' '.join(args)}: {e}") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise FusionError(f"dvc {' '.join(args)}: {last}")
    try:
        return json.loads(r.stdout or "[]")
    except json.JSONDecodeError:
        raise FusionError(f"dvc {' '.join(args)}: output is not JSON") from None


EXP_PARAMS = ("method", "weights", "density", "t", "rank", "seed")


def experiment_rows(shown) -> list[dict]:
    """Flatten ``dvc exp show --json`` into rows: the workspace, each commit and its experiments, with
    the default settings, what an experiment changed in ``fusions:`` against its commit, and the
    headline (each fusion's mean and worst retention)."""
    rows = []
    for entry in shown if isinstance(shown, list) else []:
        own = _fusion_params(entry)
        rows.append(_exp_row(entry, entry.get("name") or _rev(entry), "", own, own))
        for group in entry.get("experiments") or []:
            for rev in group.get("revs") or []:
                rows.append(_exp_row(rev, group.get("name") or rev.get("name") or _rev(rev), _rev(entry),
                                     _fusion_params(rev), own))
    return rows


def _params(entry: dict) -> dict:
    data = entry.get("data") or {}
    return ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}


def _fusion_params(entry: dict) -> dict:
    return _params(entry).get("fusions") or {}


def _exp_row(entry: dict, name: str, parent: str, fusions: dict, parent_fusions: dict) -> dict:
    params = _params(entry)
    row = {"experiment": name, "rev": _short_rev(_rev(entry)), "parent": _short_rev(parent)}
    for key in EXP_PARAMS:
        if key in params:
            row[key] = _short(params[key])
    changed = {n: {k: v for k, v in (f or {}).items() if k != "adapters"}
               for n, f in sorted(fusions.items()) if f != parent_fusions.get(n)}
    row["changed fusions"] = json.dumps(changed, separators=(",", ":")) if changed else ""
    metrics = (entry.get("data") or {}).get("metrics") or {}
    headline = next((m.get("data") for p, m in metrics.items() if p.endswith("headline.json")), None) or {}
    for fname, h in headline.items():
        for k in ("mean", "worst"):
            if isinstance(h, dict) and h.get(k) is not None:
                row[f"{fname} {k}"] = _round(h[k])
    return row


def _rev(entry: dict) -> str:
    return str(entry.get("rev") or "")


def _short_rev(rev: str) -> str:
    """A commit's first 7 hex digits; a name such as ``workspace`` as it is."""
    import re

    return rev[:7] if re.fullmatch(r"[0-9a-f]{40}", rev) else rev


# ---------------------------------------------------------------------------- helpers


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FusionError(f"{path}: not readable JSON ({e})") from None


def _round(x, digits: int = 4):
    return None if x is None else round(float(x), digits)


def _short(value) -> str | None:
    if value is None:
        return None
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)
