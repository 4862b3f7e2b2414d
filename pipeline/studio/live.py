"""Try settings live: fuse a declared fusion with other weights (method, density, t), score it on a
few validation examples per task, and turn the settings into a ``dvc exp run`` argument list.

The candidate is fused with :func:`pipeline.fuse.fuse` into a temporary directory under the system
temp (removed afterwards) and scored with :func:`pipeline.evaluate.evaluate` on the first
``examples`` lines of each source's ``valid.jsonl``, against the source adapters scored once on the
same lines: retention as the report defines it. :class:`LiveScorer` is the one place that does this,
so an in-memory evaluator can replace it without touching the page.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import FusionError
from pipeline.methods.registry import METHODS, get_method
from pipeline.spec import FusionSpec, check_spec
from pipeline.studio.project import Project, dvc_command

WEIGHT_RANGE = (-1.0, 2.0)   # what the sliders offer and what the settings accept


@dataclass(frozen=True)
class LiveSettings:
    """What the page may change of a declared fusion; everything else comes from params.yaml."""
    fusion: str
    method: str
    weights: tuple[float, ...]
    density: float
    t: float


def initial_settings(project: Project, fusion: str) -> LiveSettings:
    """The fusion's own settings as params.yaml resolves them (a per-layer list shown as its mean)."""
    f = project.fusion(fusion)
    spec = f.spec
    weights = spec.weights if spec.weights is not None else get_method(spec.method).default_weights(len(f.adapters))
    return LiveSettings(fusion, spec.method, tuple(_mean(w) for w in weights), _mean(spec.density), _mean(spec.t))


def checked(project: Project, s: LiveSettings) -> tuple[LiveSettings, FusionSpec]:
    """``s`` with plain floats, and the fusion's spec with it applied; FusionError for anything the
    page should not have sent (an unknown fusion or method, a value out of range, a wrong count)."""
    f = project.fusion(s.fusion)
    if s.method not in METHODS:
        raise FusionError(f"unknown method {s.method!r} (known: {', '.join(METHODS)})")
    n = len(f.adapters)
    if len(s.weights) != n:
        raise FusionError(f"fusion {s.fusion!r} fuses {n} adapters: give {n} weights, got {len(s.weights)}")
    weights = tuple(_number(w, "weight", *WEIGHT_RANGE) for w in s.weights)
    density = _number(s.density, "density", 0.0, 1.0)
    if density <= 0.0:
        raise FusionError("density must be in (0, 1]")
    t = _number(s.t, "t", 0.0, 1.0)
    clean = LiveSettings(s.fusion, s.method, weights, density, t)
    spec = replace(f.spec, method=s.method, weights=list(weights), density=density, t=t)
    check_spec(spec, n, f"fusion {s.fusion!r}")
    return clean, spec


def experiment_args(project: Project, s: LiveSettings) -> list[str]:
    """``dvc exp run --temp -S ...`` for these settings, as an argument list (never a shell string).

    Only what the method reads is set (``++`` adds a key the fusion inherited from the defaults);
    ``--temp`` runs it outside the workspace, so the page's project is left as it is.
    """
    s, spec = checked(project, s)
    method = get_method(s.method)
    n = len(project.fusion(s.fusion).adapters)
    prefix = f"++fusions.{s.fusion}"
    sets = [f"{prefix}.method={s.method}"]
    if method.uses_weights(n):
        sets.append(f"{prefix}.weights={json.dumps(list(s.weights), separators=(',', ':'))}")
    if "density" in method.params:
        sets.append(f"{prefix}.density={json.dumps(s.density)}")
    if "t" in method.params:
        sets.append(f"{prefix}.t={json.dumps(s.t)}")
    args = [dvc_command(), "exp", "run", "--temp"]
    for value in sets:
        args += ["-S", value]
    return args


def save_experiment(project: Project, s: LiveSettings, timeout: float = 1800) -> dict:
    """Run the DVC experiment of these settings in the project; ``{"args", "returncode", "output"}``."""
    import os
    import subprocess
    import sys

    args = experiment_args(project, s)
    # the stages' `python` is this one (the project's virtualenv), as under `make run`
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run(args, cwd=project.root, capture_output=True, text=True, timeout=timeout, env=env)
    output = (r.stdout + r.stderr).strip()
    if r.returncode != 0:
        raise FusionError(f"dvc exp run failed ({r.returncode}): {output.splitlines()[-1] if output else ''}")
    return {"args": args[1:], "returncode": r.returncode, "output": output}


class LiveScorer:
    """Fuse and score candidates of a project's fusions on a few validation examples per task."""

    def __init__(self, project: Project, examples: int = 8):
        if examples < 1:
            raise FusionError(f"examples must be at least 1, got {examples}")
        self.project = project
        self.examples = examples
        self._sources: dict[str, dict] = {}   # adapter -> its scores on its own valid lines

    def _settings(self) -> dict:
        ev = self.project.params.eval
        return dict(max_examples=self.examples, max_tokens=ev["max_tokens"], batch_size=ev["batch_size"],
                    system_prompt=ev["system_prompt"])

    def source_scores(self, adapter: str) -> dict:
        from pipeline.evaluate import evaluate

        if adapter not in self._sources:
            self._sources[adapter] = evaluate(self.project.base_model(), self.project.adapter_path(adapter),
                                              {adapter: self.project.valid_set(adapter)}, **self._settings())
        return self._sources[adapter]

    def score(self, s: LiveSettings) -> dict:
        """Fuse ``s`` and score it: ``{"settings", "tasks": {task: {accuracy, loss, retention,
        source_accuracy}}, "mean_retention", "worst_retention", "examples", "seconds"}``."""
        from pipeline.evaluate import evaluate, retention
        from pipeline.fuse import fuse

        s, spec = checked(self.project, s)
        names = self.project.fusion(s.fusion).adapters
        sources = {a: self.source_scores(a) for a in names}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fusion-studio-") as tmp:
            where = Path(tmp) / "candidate"
            fuse([self.project.adapter_path(a) for a in names], where, spec, names=names)
            scores = evaluate(self.project.base_model(), where, {a: self.project.valid_set(a) for a in names},
                              **self._settings())
        r = retention(scores, sources, {a: a for a in names}, {})
        return {
            "settings": s,
            "tasks": {t: {"accuracy": x["accuracy"], "loss": x["loss"], "retention": x["retention"],
                          "source_accuracy": x["source_accuracy"]} for t, x in r["tasks"].items()},
            "mean_retention": r["mean_retention"],
            "worst_retention": r["worst_retention"],
            "examples": self.examples,
            "seconds": time.perf_counter() - start,
        }


def _mean(v) -> float:
    if isinstance(v, (list, tuple)):
        return float(sum(_mean(x) for x in v) / len(v)) if v else 0.0
    return float(v)


def _number(x, what: str, lo: float, hi: float) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise FusionError(f"{what} must be a number, got {x!r}")
    if not lo <= x <= hi:
        raise FusionError(f"{what} must be in [{lo:g}, {hi:g}], got {x!r}")
    return float(x)
