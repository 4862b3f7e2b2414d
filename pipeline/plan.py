"""The plans the validate stage hands to the other stages, one typed record per file.

``reports/validated/NAME.fuse.json`` is a :class:`FusePlan` (the fusion's adapters with their hashes
and its fully resolved settings), ``NAME.eval.json`` an :class:`EvalPlan` (base model, evaluation
settings, prompts and the evaluation sets of its tasks) and ``baselines.json`` a
:class:`BaselinesPlan` (the same for every declared adapter). ``to_json()`` is a file's content and
``read(path)`` checks a file once, raising FusionError that names the file and the key at fault.
A fusion whose inputs did not change gets a byte-identical plan, so DVC leaves its stages alone.
"""

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from pipeline.errors import FusionError

FUSE_PLAN = "{}.fuse.json"
EVAL_PLAN = "{}.eval.json"
BASELINES_PLAN = "baselines.json"


class _Plan:
    """What every plan does: give its file's content, and read (and check) a file."""

    def to_json(self) -> dict:
        """The plan file's content."""
        return asdict(self)

    @classmethod
    def read(cls, path: str | Path):
        """The plan in ``path``, checked; FusionError naming the file when it is missing or malformed."""
        try:
            value = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FusionError(f"{path}: not found (run the validate stage first)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FusionError(f"{path}: not a readable plan ({e})") from None
        return _read(cls, value, str(path), "")


@dataclass(frozen=True)
class AdapterRef:
    """A source adapter: its directory and the sha256 of its weights and of its config."""
    name: str
    path: str
    sha256: str
    config_sha256: str


@dataclass(frozen=True)
class TaskSet:
    """A task's evaluation set and its sha256 (both None when the adapter declares no data), and the
    sha256 of the validation split next to it (:func:`valid_set`; None when there is none), which the
    report's choice of each method's best setting reads: both are inputs of the scoring stages."""
    data: str | None
    sha256: str | None
    valid_sha256: str | None


@dataclass(frozen=True)
class EvalSettings:
    """The ``eval:`` section: examples per task, generation length, batch size, and the system message
    put before every prompt (None: the chat template's default)."""
    max_examples: int | None
    max_tokens: int
    batch_size: int
    system_prompt: str | None = None

    @classmethod
    def of(cls, section: dict, where: str = "params.yaml") -> "EvalSettings":
        """The resolved ``eval:`` section (``pipeline.params.Params.eval``), checked."""
        return _read(cls, section, where, "eval")


def _read_spec(value, file: str, key: str):
    """A FusionSpec: every field present; the values are checked where the fusion starts (check_spec)."""
    from pipeline.spec import FusionSpec

    return FusionSpec(**_keys(FusionSpec, value, file, key))


@dataclass(frozen=True)
class FusePlan(_Plan):
    """``NAME.fuse.json``: what ``fuse@NAME`` fuses, and how."""
    fusion: str
    adapters: list[AdapterRef]
    spec: "FusionSpec" = field(metadata={"read": _read_spec})  # noqa: F821 (pipeline.spec)


@dataclass(frozen=True)
class _Scoring(_Plan):
    """What both scoring stages read: the base model, how to score, the prompts, the tasks."""
    base_model: str
    base: dict  # what identifies the base model (see base_identity)
    eval: EvalSettings
    prompts: list[str]
    tasks: dict[str, TaskSet]


@dataclass(frozen=True)
class EvalPlan(_Scoring):
    """``NAME.eval.json``: what ``evaluate@NAME`` scores the fused adapter on."""
    fusion: str


@dataclass(frozen=True)
class BaselinesPlan(_Scoring):
    """``baselines.json``: the base model and every declared adapter, on every task."""
    adapters: dict[str, AdapterRef]


@dataclass
class Plans:
    """Every plan of one params.yaml, by fusion name."""
    fuse: dict[str, FusePlan]
    eval: dict[str, EvalPlan]
    baselines: BaselinesPlan


# --- checking a plan against its types ---------------------------------------------------------

def _keys(cls, value, file: str, key: str) -> dict:
    """``value`` checked to be a mapping with exactly the fields of the dataclass ``cls``."""
    if not isinstance(value, dict):
        raise FusionError(f"{file}: {key or 'the file'}: expected a mapping, got {type(value).__name__}")
    names = [f.name for f in fields(cls)]
    for name in names:
        if name not in value:
            raise FusionError(f"{file}: missing key {_join(key, name)!r} (re-run the validate stage)")
    for name in value:
        if name not in names:
            raise FusionError(f"{file}: unknown key {_join(key, name)!r} (known: {', '.join(names)})")
    return value


def _join(key: str, name) -> str:
    return f"{key}.{name}" if key else str(name)


def _read(tp, value, file: str, key: str):
    """``value`` (parsed JSON) checked against the type ``tp``; a dataclass is built field by field
    (a field's ``metadata["read"]`` reads it instead of its type)."""
    if is_dataclass(tp):
        d, values = _keys(tp, value, file, key), {}
        for f in fields(tp):
            read = f.metadata.get("read")
            at = _join(key, f.name)
            values[f.name] = read(d[f.name], file, at) if read else _read(f.type, d[f.name], file, at)
        return tp(**values)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _read(inner[0], value, file, key)
    want = origin or tp
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise FusionError(f"{file}: {key}: expected {want.__name__}, got {repr(value)[:60]}")
    if want is list and args:
        return [_read(args[0], v, file, f"{key}[{i}]") for i, v in enumerate(value)]
    if want is dict and args:
        return {k: _read(args[1], v, file, _join(key, k)) for k, v in value.items()}
    return value


# --- building the plans from params.yaml ---------------------------------------------------------

def eval_set(data: Path | None, name: str) -> Path | None:
    """An adapter's evaluation file: ``data`` itself, or its test.jsonl (else valid.jsonl)."""
    if data is None:
        return None
    if data.is_file():
        return data
    for split in ("test.jsonl", "valid.jsonl"):
        if (data / split).is_file():
            return data / split
    raise FusionError(f"adapters.{name}.data: {data} has no test.jsonl or valid.jsonl")


def valid_set(test: Path | None) -> Path | None:
    """The validation split next to an evaluation set ``test``: the valid.jsonl beside a test.jsonl."""
    if test is None or test.name != "test.jsonl":
        return None
    valid = test.parent / "valid.jsonl"
    return valid if valid.is_file() else None


def base_identity(base: str) -> dict:
    """What identifies the base model's bytes (``pipeline.basemodel.identity``): every file's sha256
    for a local directory, the resolved revision and its files for a hub id."""
    from pipeline.basemodel import identity

    return identity(base)


def build(p, where: str = "params.yaml") -> Plans:
    """Validate every fusion of the resolved params ``p`` (``pipeline.params.Params``) and its
    adapters, and make the plans; raise one FusionError listing every problem."""
    from pipeline.formats import read_adapter, sha256_file
    from pipeline.validate import validate

    problems = []
    for fusion in p.fusions.values():
        paths = [p.adapters[a].path for a in fusion.adapters]
        try:
            validate(paths, space=fusion.spec.space)
        except FusionError as e:
            problems += [f"fusion {fusion.name!r}: {line}" for line in str(e).splitlines()]
    sets = {}
    for decl in p.adapters.values():
        try:
            sets[decl.name] = eval_set(decl.data, decl.name)
        except FusionError as e:
            problems.append(str(e))
    if problems:
        raise FusionError("\n".join(problems))

    refs: dict[str, AdapterRef] = {}

    def adapter_ref(name: str) -> AdapterRef:
        if name not in refs:
            decl = p.adapters[name]
            a = read_adapter(decl.path)
            refs[name] = AdapterRef(name, str(decl.path), sha256_file(a.weights_file),
                                    sha256_file(a.path / "adapter_config.json"))
        return refs[name]

    def task_set(name: str) -> TaskSet:
        s = sets[name]
        v = valid_set(s)
        return TaskSet(str(s) if s else None, sha256_file(s) if s else None, sha256_file(v) if v else None)

    common = dict(base_model=p.base_model, base=base_identity(p.base_model),
                  eval=EvalSettings.of(p.eval, where), prompts=p.prompts)
    return Plans(
        fuse={f.name: FusePlan(f.name, [adapter_ref(a) for a in f.adapters], f.spec) for f in p.fusions.values()},
        eval={f.name: EvalPlan(**common, tasks={a: task_set(a) for a in f.adapters}, fusion=f.name)
              for f in p.fusions.values()},
        baselines=BaselinesPlan(**common, tasks={a: task_set(a) for a in p.adapters},
                                adapters={a: adapter_ref(a) for a in p.adapters}))


def write(out: str | Path, plans: Plans) -> None:
    """Write every plan under ``out`` (replacing the directory atomically)."""
    from pipeline.io import atomic_dir, write_json

    with atomic_dir(out) as tmp:
        for name, plan in plans.fuse.items():
            write_json(tmp / FUSE_PLAN.format(name), plan.to_json())
        for name, plan in plans.eval.items():
            write_json(tmp / EVAL_PLAN.format(name), plan.to_json())
        write_json(tmp / BASELINES_PLAN, plans.baselines.to_json())
