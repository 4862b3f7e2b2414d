"""Can these adapters be fused? Checks that run before any heavy work.

Reads configs and safetensors headers; the one data pass is the NaN/Inf scan, which streams the
memory-mapped tensors. Every problem found is collected, so the user sees all of them at once, one
line each, each naming the adapter. Differences that delta-space fusion handles (ranks, scales,
layer counts, module sets) are notes, not problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.destination import check_destination
from pipeline.errors import FusionError
from pipeline.formats import Adapter, ModuleInfo, read_adapter


@dataclass
class Validation:
    adapters: list[Adapter]
    notes: list[str] = field(default_factory=list)


def _same_base(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def validate(paths: list[str | Path], out: str | Path | None = None, *, check_data: bool = True,
             ignore_base: bool = False, space: str = "delta", base: str | Path | None = None,
             digest: bool = False) -> Validation:
    """Check adapters for fusion; raise one FusionError listing every problem (one per line).
    ``digest`` (with ``check_data``): the read that checks the values also sets each adapter's
    ``sha256``. The weights files are read on parallel threads (the reads, the checks and the
    digest release the GIL)."""
    problems: list[str] = []
    adapters: list[Adapter] = []
    if len(paths) < 2:
        problems.append(f"need at least two adapters to fuse, got {len(paths)}")
    resolved = [Path(p).resolve() for p in paths]
    for i, p in enumerate(paths):
        if resolved[i] in resolved[:i]:
            problems.append(f"{p}: the same adapter is given twice")
    read: list[Adapter | FusionError] = []
    for p in paths:
        try:
            read.append(read_adapter(p))  # refuses what cannot be fused (DoRA, unusable tensors, ...)
        except FusionError as e:
            read.append(e)
    found = [a for a in read if isinstance(a, Adapter)]
    scans: dict[int, list[str]] = {}
    if check_data and found:
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.threads import worker_count

        with ThreadPoolExecutor(min(len(found), worker_count())) as pool:
            scans = dict(zip(map(id, found), pool.map(lambda a: a.check_finite(digest=digest), found)))
    for a in read:
        if isinstance(a, FusionError):
            problems.append(str(a))
            continue
        if check_data:
            bad = scans[id(a)]
            if bad:
                problems.append(f"{a.weights_file}: tensor {bad[0]!r} holds NaN or Inf values"
                                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        need = a.variants
        if base is None and ("dora" in need or "modules_to_save" in need):
            what = (f"DoRA adapter ({need['dora']} modules: its delta m (W + s B A) / |W + s B A| - W "
                    "depends on the base weight W)" if "dora" in need else
                    f"{need['modules_to_save']} modules_to_save tensors (whole trained weights: their delta "
                    "is the weight minus the base's)")
            problems.append(f"{a.path}: {what}; fusing it needs the base model's weights "
                            "(--base MODEL_DIR)")
        elif base is not None and ("dora" in need or "modules_to_save" in need) and not Path(base).is_dir():
            problems.append(f"{base}: base model directory does not exist (needed by {a.path})")
        adapters.append(a)
    if out is not None:
        try:
            check_destination(out, paths, record="fusion.json")
        except FusionError as e:
            problems.append(str(e))
    notes: list[str] = []
    if len(adapters) >= 2:
        problems += _cross_checks(adapters, ignore_base, space)
        notes = _notes(adapters)
    if problems:
        raise FusionError("\n".join(problems))
    return Validation(adapters, notes)


def _cross_checks(adapters: list[Adapter], ignore_base: bool, space: str) -> list[str]:
    problems = []
    first = next((a for a in adapters if a.base_model), None)
    if first is not None and not ignore_base:
        for a in adapters:
            if a.base_model and not _same_base(a.base_model, first.base_model):
                problems.append(f"{a.path}: base model {a.base_model!r} differs from {first.path}'s "
                                f"{first.base_model!r} (pass --ignore-base if they are the same model)")
    seen: dict[str, tuple[ModuleInfo, Adapter]] = {}
    for a in adapters:
        for name, m in a.modules.items():
            if name in seen:
                problem = _mismatch(name, m, a, *seen[name])
                if problem:
                    problems.append(problem)
            seen.setdefault(name, (m, a))
    if space == "factors":
        for a in adapters:
            if any(m.needs_base for m in a.modules.values()):
                problems.append(f"{a.path}: DoRA or modules_to_save modules have no factors to average "
                                "(their delta is computed from the base model); use --space delta")
        ranks = {a.path: a.ranks for a in adapters}
        if len(set().union(*ranks.values())) > 1:
            desc = ", ".join(f"{p.name}: {sorted(r)}" for p, r in ranks.items())
            problems.append(f"--space factors averages lora_a and lora_b tensor by tensor, which needs "
                            f"equal ranks ({desc}); use --space delta")
        names = [set(a.modules) for a in adapters]
        if any(n != names[0] for n in names):
            problems.append("--space factors needs every adapter to adapt the same modules; "
                            "use --space delta")
    return problems


def _mismatch(name: str, m: ModuleInfo, a: Adapter, first: ModuleInfo, other: Adapter) -> str | None:
    """Why module ``name`` of ``a`` cannot be fused with the same module of ``other`` (or None)."""
    if m.kind != first.kind:
        return (f"{a.path}: module {name} is {_KIND_WORDS[m.kind]} but {_KIND_WORDS[first.kind]} in "
                f"{other.path}: not adapters of the same base model")
    if m.kind == "experts" and m.experts != first.experts:
        return (f"{a.path}: module {name} has {m.experts} experts but {first.experts} in {other.path}: "
                "not adapters of the same base model")
    if m.kind == "embedding" and m.out_features != first.out_features:
        return (f"{a.path}: embedding {name} has a vocabulary of {m.out_features} tokens but "
                f"{first.out_features} in {other.path} (tokens added or removed): the rows of the two "
                "tables are not the same tokens, so their deltas cannot be added")
    shape, want = (m.out_features, m.in_features), (first.out_features, first.in_features)
    if shape != want:
        return (f"{a.path}: module {name} is {shape[0]}x{shape[1]} (out x in) but {want[0]}x{want[1]} in "
                f"{other.path}: not adapters of the same base model")
    return None


_KIND_WORDS = {"linear": "a linear layer", "experts": "a mixture-of-experts layer",
               "embedding": "an embedding"}


def variant_words(a: Adapter) -> str:
    """What an adapter holds besides LoRA on linear layers, in words ("" for plain LoRA)."""
    v = a.variants
    parts = []
    if "experts" in v:
        n = sorted({m.experts for m in a.modules.values() if m.kind == "experts"})
        parts.append(f"{v['experts']} mixture-of-experts module{'s' * (v['experts'] > 1)} "
                     f"({'/'.join(map(str, n))} experts)")
    if "embedding" in v:
        parts.append(f"{v['embedding']} embedding{'s' * (v['embedding'] > 1)}")
    if "bias" in v:
        parts.append(f"{v['bias']} LoRA bias{'es' * (v['bias'] > 1)}")
    if "dora" in v:
        parts.append(f"DoRA on {v['dora']} module{'s' * (v['dora'] > 1)}")
    if "modules_to_save" in v:
        parts.append(f"{v['modules_to_save']} modules_to_save (whole weights)")
    return ", ".join(parts)


def _notes(adapters: list[Adapter]) -> list[str]:
    notes = []

    def differs(label: str, values: dict[str, object]) -> None:
        if len({repr(v) for v in values.values()}) > 1:
            notes.append(f"{label} differ ({', '.join(f'{k}: {v}' for k, v in values.items())}); "
                         "fine in delta space")

    differs("ranks", {a.name: sorted(a.ranks) for a in adapters})
    differs("scales", {a.name: sorted(a.scales) for a in adapters})
    differs("layers", {a.name: _span(a.layers) for a in adapters})
    differs("target modules", {a.name: sorted(a.keys) for a in adapters})
    layouts = {a.layout for a in adapters}
    if len(layouts) > 1:
        notes.append("mixed mlx-lm and PEFT layouts; the fused adapter is written in the mlx-lm layout")
    dtypes = {a.name: "+".join(sorted({_DTYPE_NAMES.get(m.dtype, m.dtype) for m in a.modules.values()}))
              for a in adapters}
    if set(dtypes.values()) != {"float32"}:
        kinds = sorted(set(dtypes.values()))
        desc = kinds[0] if len(kinds) == 1 else ", ".join(
            f"{k} ({', '.join(n for n, d in dtypes.items() if d == k)})" for k in kinds)
        notes.append(f"inputs are {desc}; the output will be float32")
    for a in adapters:
        words = variant_words(a)
        if words:
            notes.append(f"{a.name}: {words}; fused in delta space like linear layers "
                         "(an adapter without one counts as zero)")
        if a.ignored_tensors:
            n = len(a.ignored_tensors)
            notes.append(f"{a.name}: ignored {n} *.base_layer.weight tensor{'s' * (n > 1)} (base model "
                         "weights saved with the adapter, not adapter tensors; not in the output)")
    return notes


_DTYPE_NAMES = {"F32": "float32", "BF16": "bf16", "F16": "fp16", "F64": "float64"}


def _span(layers: set[int]) -> str:
    if not layers:
        return "none"
    lo, hi = min(layers), max(layers)
    return f"{lo}-{hi}" if len(layers) == hi - lo + 1 else ",".join(map(str, sorted(layers)))
