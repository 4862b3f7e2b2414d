"""Standard benchmarks: lm-evaluation-harness tasks on the base model, the sources and the fusions.

Optional (the ``lmeval`` extra). ``params.yaml: eval.lm_eval`` names the tasks; the validate stage
writes the plan (:func:`plan`, ``reports/validated/lm_eval.json``) and the ``lm_eval_baselines`` and
``lm_eval@NAME`` stages score each model with :func:`score`, which runs lm-eval's
``simple_evaluate`` on mlx-lm's own lm-eval model class (``mlx_lm.evaluate.MLXLM``, the model behind
``mlx_lm.evaluate``) given the base model with the adapter loaded.

A task is either a local one, a YAML file in ``include_path`` (a folder of the project, whose every
file the plan hashes, so that a changed task or data file re-runs the stages that read it), or one of
lm-eval's own registry, which lm-eval fetches from the hub: for users with a network. A local task's
``dataset_kwargs.data_files`` must lie inside ``include_path``.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.errors import FusionError

PLAN = "lm_eval.json"
SETTINGS = {"tasks": None, "include_path": None, "limit": None, "num_fewshot": None, "batch_size": 8,
            "max_tokens": None, "chat_template": None, "seed": 0}
EXTRA = "pip install -e '.[lmeval]'"


def check(section, where: str = "params.yaml") -> dict | None:
    """The ``eval.lm_eval`` section with its defaults, checked (None when absent or it names no task)."""
    at = f"{where}: eval.lm_eval"
    if section is None:
        return None
    if not isinstance(section, dict):
        raise FusionError(f"{at}: must be a mapping (tasks, include_path, limit, ...), got {type(section).__name__}")
    unknown = set(section) - set(SETTINGS)
    if unknown:
        raise FusionError(f"{at}: unknown setting(s) {', '.join(sorted(map(str, unknown)))} "
                          f"(known: {', '.join(SETTINGS)})")
    s = {**SETTINGS, **section}
    tasks = s["tasks"]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise FusionError(f"{at}.tasks: must be a list of lm-eval task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise FusionError(f"{at}.tasks: names a task twice")
    if s["include_path"] is not None and not (isinstance(s["include_path"], str) and s["include_path"]):
        raise FusionError(f"{at}.include_path: must be a folder of task YAML files, got {s['include_path']!r}")
    for key, low in (("limit", 1), ("num_fewshot", 0), ("batch_size", 1), ("max_tokens", 1), ("seed", 0)):
        v = s[key]
        if v is None and key not in ("batch_size", "seed"):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise FusionError(f"{at}.{key}: must be a whole number >= {low}{'' if key in ('batch_size', 'seed') else ' or null'}, "
                              f"got {v!r}")
    if s["chat_template"] is not None and not isinstance(s["chat_template"], bool):
        raise FusionError(f"{at}.chat_template: must be true, false or null (the tokenizer's own choice), "
                          f"got {s['chat_template']!r}")
    return s if tasks else None


def task_files(include_path: str | Path, root: str | Path = ".") -> dict[str, str]:
    """The sha256 of every file under ``include_path`` (relative paths as keys), checked: a folder of
    the project ``root``, no symlinks, and every local ``data_files`` entry inside it."""
    import yaml

    from pipeline.formats import sha256_file

    folder = Path(include_path)
    at = f"eval.lm_eval.include_path {folder}"
    if not folder.is_dir():
        raise FusionError(f"{at}: not a folder")
    if folder.is_symlink() or Path(root).resolve() not in folder.resolve().parents:
        raise FusionError(f"{at}: must be a folder inside the project (not a symlink): DVC sees its files "
                          "change only there")
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_symlink():
            raise FusionError(f"{f}: a symlink in the lm-eval task folder; DVC would not see its target change")
        if f.is_file():
            files[f.as_posix()] = sha256_file(f)
    yamls = [f for f in files if f.endswith((".yaml", ".yml"))]
    if not yamls:
        raise FusionError(f"{at}: no task YAML file in it")
    inside = folder.resolve()
    for name in yamls:
        try:
            doc = yaml.load(Path(name).read_text(encoding="utf-8"), Loader=_AnyTags) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise FusionError(f"{name}: not a readable lm-eval task ({str(e).splitlines()[0]})") from None
        data_files = ((doc.get("dataset_kwargs") or {}) if isinstance(doc, dict) else {}).get("data_files")
        for path in _strings(data_files):
            if "://" in path:
                continue
            p = Path(path)
            if not (p.resolve() == inside or inside in p.resolve().parents):
                raise FusionError(f"{name}: data file {path} is outside {folder}, so the plan cannot record "
                                  "it: put it in the task folder (paths are relative to the project)")
    return files


class _AnyTags(__import__("yaml").SafeLoader):
    """lm-eval task YAML may carry ``!function`` tags: read them as plain strings."""


_AnyTags.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                               if hasattr(node, "value") and isinstance(node.value, str) else None)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def plan(settings: dict | None, base_model: str, base: dict, adapters: dict, system_prompt: str | None) -> dict:
    """The lm-eval plan: nothing but ``{"tasks": []}`` when no task is named (so the stages stay
    cheap no-ops that never re-run), else the settings, the task files' hashes, the installed
    lm-eval's version (an upgrade re-runs the stages), the base model's identity and the source
    adapters (``pipeline.plan.AdapterRef`` as dicts)."""
    if settings is None:
        return {"tasks": []}
    files = task_files(settings["include_path"]) if settings["include_path"] else {}
    return {**settings, "files": files, "lm_eval_version": version(), "base_model": base_model, "base": base,
            "adapters": adapters, "system_prompt": system_prompt}


def score(base: str | Path, adapter: str | Path | None, job: dict) -> dict:
    """Run the plan's tasks on the base model with ``adapter``: ``{task: {metric: value}}`` (lm-eval's
    ``acc,none`` keys become ``acc``; other filters keep their suffix), every value finite."""
    return {task: _metrics(task, values) for task, values in run(base, adapter, job)["results"].items()}


def run(base: str | Path, adapter: str | Path | None, job: dict, log_samples: bool = False) -> dict:
    """lm-eval's whole result of the plan's tasks on the base model with ``adapter`` (with each
    request's responses under ``samples`` when ``log_samples``)."""
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise FusionError(f"eval.lm_eval: needs lm-eval-harness ({EXTRA})") from None
    from mlx_lm.evaluate import MLXLM

    from pipeline.evaluate import load_model

    model, tokenizer = load_model(base, adapter)
    lm = _loaded(MLXLM, model, tokenizer, job)
    manager = lm_eval.tasks.TaskManager(include_path=job.get("include_path"))
    known = set(manager.all_tasks)
    missing = [t for t in job["tasks"] if t not in known]
    if missing:
        raise FusionError(f"eval.lm_eval.tasks: {', '.join(missing)}: no such lm-eval task"
                          f"{'' if job.get('include_path') else ' (and no include_path)'}")
    seed = job.get("seed", 0)
    chat = lm.use_chat_template
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=list(job["tasks"]), task_manager=manager, num_fewshot=job.get("num_fewshot"),
            limit=job.get("limit"), apply_chat_template=chat,
            system_instruction=job.get("system_prompt") if chat else None,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            log_samples=log_samples)
    except Exception as e:  # a task whose data cannot be read, a template error, ...
        raise FusionError(f"eval.lm_eval: lm-eval failed: {e.__class__.__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None


def _loaded(base_class, model, tokenizer, job: dict):
    """An instance of mlx-lm's lm-eval model class over an already loaded model (its own ``__init__``
    loads from a path and knows no adapter)."""
    from lm_eval.api.model import LM

    lm = base_class.__new__(base_class)
    LM.__init__(lm)
    lm._model, lm.tokenizer = model, tokenizer
    lm._max_tokens, lm._batch_size, lm._sampler = job.get("max_tokens"), job.get("batch_size", 8), None
    choice = job.get("chat_template")
    lm.use_chat_template = tokenizer.chat_template is not None if choice is None else bool(choice)
    return lm


def _metrics(task: str, values: dict) -> dict:
    out = {}
    for key, v in values.items():
        if key in ("alias", "name", "sample_len", "samples") or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt in ("", "none") else f"{metric},{filt}"
        if not math.isfinite(float(v)):
            if "_stderr" in metric:
                continue  # lm-eval gives no standard error for a single example
            raise FusionError(f"eval.lm_eval: task {task}: metric {name} is {v} (not a finite number)")
        out[name] = float(v)
    return out


def version() -> str | None:
    """The installed lm-eval's version (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v("lm_eval")
    except PackageNotFoundError:
        return None
