"""The params contract: ``params.yaml`` resolved into one fully specified job per fusion.

Top-level defaults (``method``, ``weights``, ``density``, ``majority_sign_method``, ``consensus``,
``t``, ``rank``, ``space``, ``seed``) apply to every fusion under ``fusions:``; a fusion may override
any of them and may add ``rules`` (per-module overrides). Adapters are declared once under ``adapters:``
(``name: {path, data}``) and fusions refer to them by name. A fusion whose number of adapters
differs from the default weights' length must give its own weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.benchmarks import check as check_lm_eval
from pipeline.destination import safe_name
from pipeline.errors import FusionError
from pipeline.methods.registry import PARAMS
from pipeline.spec import FusionSpec, check_spec

DEFAULT_KEYS = ("method", *PARAMS)
FUSION_KEYS = {"adapters", "rules", *DEFAULT_KEYS}
DEFAULTS = {"method": "linear", **{name: p.default for name, p in PARAMS.items()}}
EVAL_DEFAULTS = {"max_examples": 100, "max_tokens": 16, "batch_size": 32, "system_prompt": None}


@dataclass
class AdapterDecl:
    name: str
    path: Path
    data: Path | None


@dataclass
class Fusion:
    name: str
    adapters: list[str]
    spec: FusionSpec
    inherited: list[str] = field(default_factory=list)  # which defaults it took from the top level


@dataclass
class Params:
    base_model: str
    adapters: dict[str, AdapterDecl]
    fusions: dict[str, Fusion]
    eval: dict
    prompts: list[str]
    raw: dict
    lm_eval: dict | None = None   # eval.lm_eval: lm-eval-harness tasks (pipeline.benchmarks), None: none


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, but with YAML 1.2's floats: ``1e-9`` and ``1e3`` are numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    """Parse YAML text (params.yaml, command-line values) with numbers such as ``1e-9`` read as floats."""
    return yaml.load(text, Loader=_Loader)


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FusionError(f"{path}: not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise FusionError(f"{path}: not a UTF-8 text file ({e.__class__.__name__})") from None
    except yaml.YAMLError as e:
        raise FusionError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise FusionError(f"{path}: expected a mapping at the top level")
    return data


def resolve(raw: dict, where: str = "params.yaml") -> Params:
    """Check the whole params file and resolve every fusion's settings; raise on the first problem."""
    base = raw.get("base_model")
    if not isinstance(base, str) or not base:
        raise FusionError(f"{where}: base_model must name a model directory or hub id")
    for section, kind in (("adapters", dict), ("fusions", dict), ("eval", dict), ("prompts", list)):
        if raw.get(section) is not None and not isinstance(raw[section], kind):
            raise FusionError(f"{where}: '{section}' must be a {'mapping' if kind is dict else 'list'}, "
                              f"got {type(raw[section]).__name__}")
    adapters = {}
    for name, decl in (raw.get("adapters") or {}).items():
        safe_name(name, "adapter", where)
        if not isinstance(decl, dict) or "path" not in decl:
            raise FusionError(f"{where}: adapters.{name} needs a 'path' (and usually 'data')")
        for key in ("path", "data"):
            if key in decl and not (isinstance(decl[key], str) and decl[key]) and not (key == "data" and decl[key] is None):
                raise FusionError(f"{where}: adapters.{name}.{key} must be a path, got {decl[key]!r}")
        adapters[str(name)] = AdapterDecl(str(name), Path(decl["path"]),
                                          Path(decl["data"]) if decl.get("data") else None)
    if not adapters:
        raise FusionError(f"{where}: no adapters declared under 'adapters:'")
    defaults = {k: raw.get(k, DEFAULTS[k]) for k in DEFAULT_KEYS}
    fusions = {}
    for name, f in (raw.get("fusions") or {}).items():
        safe_name(name, "fusion", where)
        fusions[str(name)] = _fusion(str(name), f, defaults, adapters, where)
    if not fusions:
        raise FusionError(f"{where}: no fusions declared under 'fusions:'")
    ev = {**EVAL_DEFAULTS, **(raw.get("eval") or {})}
    lm_eval = check_lm_eval(ev.pop("lm_eval", None), where)
    unknown = set(ev) - set(EVAL_DEFAULTS)
    if unknown:
        raise FusionError(f"{where}: eval has unknown setting(s) {', '.join(sorted(map(str, unknown)))} "
                          f"(known: {', '.join(EVAL_DEFAULTS)}, lm_eval)")
    if ev["system_prompt"] is not None and not isinstance(ev["system_prompt"], str):
        raise FusionError(f"{where}: eval.system_prompt must be a string, got {ev['system_prompt']!r}")
    for key, value in ev.items():
        if key == "system_prompt":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FusionError(f"{where}: eval.{key} must be a positive integer, got {value!r}")
    prompts = raw.get("prompts") or []
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise FusionError(f"{where}: prompts must be a list of strings")
    return Params(base, adapters, fusions, ev, prompts, raw, lm_eval)


def _fusion(name: str, f, defaults: dict, adapters: dict, where: str) -> Fusion:
    at = f"{where}: fusion {name!r}"
    if not isinstance(f, dict) or not isinstance(f.get("adapters"), list):
        raise FusionError(f"{at}: needs 'adapters: [NAME, ...]'")
    unknown = set(f) - FUSION_KEYS
    if unknown:
        raise FusionError(f"{at}: unknown setting(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(FUSION_KEYS))})")
    for a in f["adapters"]:
        if a not in adapters:
            raise FusionError(f"{at}: unknown adapter {a!r} (declared: {', '.join(adapters)})")
    n = len(f["adapters"])
    inherited = [k for k in DEFAULT_KEYS if k not in f]
    values = {k: f.get(k, defaults[k]) for k in DEFAULT_KEYS}
    w = values["weights"]
    if "weights" in inherited and isinstance(w, list) and len(w) != n:
        raise FusionError(f"{at}: fuses {n} adapters but the default weights have {len(w)} values; "
                          f"give this fusion its own 'weights'")
    spec = FusionSpec(**values, rules=f.get("rules") or [])
    check_spec(spec, n, at)
    return Fusion(name, list(f["adapters"]), spec, inherited)


SEARCH_BACKENDS = ("local", "ray")


def check_search_backend(search: dict, where: str = "params.yaml: search") -> None:
    """Check where the weight search runs: ``backend`` (local or ray), ``ray_address`` (null or an
    address such as ``127.0.0.1:6379``, ``auto``, ``ray://host:10001``), ``workers`` (null or >= 1;
    the local backend has one)."""
    backend, address, workers = search.get("backend"), search.get("ray_address"), search.get("workers")
    if backend not in SEARCH_BACKENDS:
        raise FusionError(f"{where}.backend: expected one of {', '.join(SEARCH_BACKENDS)}, got {backend!r}")
    if address is not None and not (isinstance(address, str) and address.strip()):
        raise FusionError(f"{where}.ray_address: expected null (a local Ray for the run) or an address "
                          f"such as 127.0.0.1:6379, got {address!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise FusionError(f"{where}.workers: expected null or a whole number >= 1, got {workers!r}")
    if backend == "local" and workers not in (None, 1):
        raise FusionError(f"{where}.workers: the local backend evaluates in this process with one worker; "
                          f"set backend: ray for {workers} workers")
