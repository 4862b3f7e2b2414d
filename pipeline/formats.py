"""Adapter formats: the mlx-lm layout (native) and the PEFT layout, read into one shape.

mlx-lm: ``adapters.safetensors`` (or ``best_adapters.safetensors``) + ``adapter_config.json``;
tensors ``model.layers.{i}.<path>.lora_a`` (in, r) and ``.lora_b`` (r, out), forward
``y = x W^T + scale * (x @ lora_a) @ lora_b``, so ``dW = scale * lora_b^T @ lora_a^T``.
PEFT: ``adapter_model.safetensors`` + ``adapter_config.json``; tensors
``base_model.model.<path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), scaling
``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA; ``alpha_pattern`` / ``rank_pattern`` honoured).

Both are read as modules named like ``model.layers.3.self_attn.q_proj`` with factors
``A`` (r, in) and ``B`` (out, r) and a scale ``s``: ``dW = s * B @ A``. Only headers and configs
are read by :func:`read_adapter`; tensor data is read per module by :meth:`Adapter.factors`.

Module kinds besides a linear layer (``ModuleInfo.kind``):
- ``experts``: mlx-lm's ``LoRASwitchLinear`` on a mixture-of-experts projection (``switch_mlp``):
  ``lora_a`` (E, r, in) and ``lora_b`` (E, out, r), expert e's delta ``s * lora_b[e] @ lora_a[e]``
  (not transposed, unlike a linear layer); read as A (E, r, in) and B (E, out, r).
- ``embedding``: an embedding table (V, D) (mlx-lm ``LoRAEmbedding``: ``lora_a`` (V, r), ``lora_b``
  (r, D), delta ``s * lora_a @ lora_b``; PEFT ``lora_embedding_A`` (r, V), ``lora_embedding_B``
  (D, r), delta ``s * (B A)^T``), read as out = V, in = D: B (V, r), A (r, D). With tied
  embeddings the same delta is the output head's.
A PEFT ``lora_B.bias`` (``lora_bias=True``) adds ``s * bias`` to the layer's bias (``Adapter.bias``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import FusionError
from pipeline.safetensors_io import SafetensorsFile, read_header, sha256_file  # noqa: F401  (sha256_file: re-exported)

MLX_FILES = ("adapters.safetensors", "best_adapters.safetensors")
PEFT_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Last path components of embedding tables in mlx-lm's models (an mlx-lm LoRA of an embedding has
# the same tensor shapes as one of a linear layer; only the name tells them apart).
EMBEDDING_NAMES = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embedding", "embeddings")


@dataclass(frozen=True)
class ModuleInfo:
    name: str          # model.layers.3.self_attn.q_proj
    rank: int
    in_features: int
    out_features: int
    scale: float
    a_key: str         # tensor names in the file
    b_key: str
    dtype: str
    kind: str = "linear"            # "linear" | "experts" | "embedding"
    experts: int = 0                # number of experts (kind "experts")
    bias_key: str | None = None     # PEFT's lora_B.bias: the layer's bias moves by scale * bias
    magnitude_key: str | None = None  # DoRA's magnitude vector (out,): the delta needs the base weight
    full_key: str | None = None     # PEFT's modules_to_save: the whole trained weight (rank 0, no factors)

    @property
    def needs_base(self) -> bool:
        """Whether the module's delta depends on the base model's weight (DoRA, modules_to_save)."""
        return self.magnitude_key is not None or self.full_key is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the module's weight delta: (out, in), or (experts, out, in)."""
        return ((self.experts,) if self.kind == "experts" else ()) + (self.out_features, self.in_features)

    @property
    def layer(self) -> int | None:
        m = _LAYER.search(self.name + ".")
        return int(m.group(1)) if m else None

    @property
    def key(self) -> str:
        """The module's path inside its block (``self_attn.q_proj``), as mlx-lm's ``keys``."""
        m = _LAYER.search(self.name + ".")
        return self.name[m.end():] if m else self.name


@dataclass
class Adapter:
    path: Path
    layout: str                      # "mlx" | "peft"
    weights_file: Path
    config: dict
    modules: dict[str, ModuleInfo]
    fine_tune_type: str = "lora"
    num_layers: int | None = None
    base_model: str | None = None
    extra_tensors: list[str] = field(default_factory=list)  # names that are not LoRA factors
    ignored_tensors: list[str] = field(default_factory=list)  # PEFT's *.base_layer.weight (base weights)
    _file: SafetensorsFile | None = field(default=None, repr=False)
    sha256: str | None = field(default=None, repr=False)  # of weights_file, once check_finite(digest=True) ran

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ranks(self) -> set[int]:
        """The LoRA ranks (a module_to_save, a whole weight, has none)."""
        return {m.rank for m in self.modules.values() if m.full_key is None} or {0}

    @property
    def scales(self) -> set[float]:
        return {m.scale for m in self.modules.values()}

    @property
    def layers(self) -> set[int]:
        return {m.layer for m in self.modules.values() if m.layer is not None}

    @property
    def keys(self) -> set[str]:
        return {m.key for m in self.modules.values()}

    @property
    def size_bytes(self) -> int:
        return self.weights_file.stat().st_size

    @property
    def tensor_count(self) -> int:
        return sum(1 if m.full_key else 2 + (m.bias_key is not None) + (m.magnitude_key is not None)
                   for m in self.modules.values()) + len(self.extra_tensors)

    def open(self) -> SafetensorsFile:
        if self._file is None:
            self._file = SafetensorsFile(self.weights_file)
        return self._file

    def factors(self, module: str) -> tuple[np.ndarray, np.ndarray, float]:
        """``(A (r, in), B (out, r), scale)`` of one module, float32; experts: A (E, r, in) and
        B (E, out, r); an embedding: out = vocabulary, in = dimension."""
        info = self.modules[module]
        f = self.open()
        # each a fresh C-contiguous array, transposed (where the layout stores it so) in the one copy
        # from the file: a second, transposing copy costs five times as much as the first
        if info.kind == "embedding":
            # mlx: lora_a (V, r) = B, lora_b (r, D) = A; PEFT: lora_embedding_A (r, V) = B^T, _B (D, r) = A^T
            peft = self.layout != "mlx"
            b, a = f.get(info.a_key, transpose=peft), f.get(info.b_key, transpose=peft)
        else:
            t = self.layout == "mlx" and info.kind == "linear"
            a, b = f.get(info.a_key, transpose=t), f.get(info.b_key, transpose=t)
        return a, b, info.scale

    def magnitude(self, module: str) -> np.ndarray:
        """DoRA's magnitude vector of one module (out,), float32."""
        return np.ascontiguousarray(self.open().get(self.modules[module].magnitude_key))

    def full_weight(self, module: str) -> np.ndarray:
        """A module_to_save's whole trained weight (out, in), float32."""
        return np.ascontiguousarray(self.open().get(self.modules[module].full_key))

    def bias(self, module: str) -> np.ndarray | None:
        """The LoRA bias of one module (out,), float32, before the scale; None if it has none."""
        info = self.modules[module]
        return None if info.bias_key is None else np.ascontiguousarray(self.open().get(info.bias_key))

    @property
    def variants(self) -> dict[str, int]:
        """How many modules of each kind besides plain linear ones: experts, embeddings, biases."""
        out: dict[str, int] = {}
        for m in self.modules.values():
            if m.kind != "linear":
                out[m.kind] = out.get(m.kind, 0) + 1
            if m.bias_key:
                out["bias"] = out.get("bias", 0) + 1
            if m.magnitude_key:
                out["dora"] = out.get("dora", 0) + 1
            if m.full_key:
                out["modules_to_save"] = out.get("modules_to_save", 0) + 1
        return out

    def check_finite(self, digest: bool = False) -> list[str]:
        """Names of tensors holding NaN or Inf (one sequential read of the weights file); with
        ``digest``, the same read also sets ``sha256`` (the weights file's)."""
        if not digest:
            return self.open().nonfinite()
        import hashlib

        h = hashlib.sha256()
        bad = self.open().nonfinite(hasher=h)
        self.sha256 = h.hexdigest()
        return bad


def find_weights(path: Path) -> tuple[str, Path]:
    for name in MLX_FILES:
        if (path / name).is_file():
            return "mlx", path / name
    if (path / PEFT_FILE).is_file():
        return "peft", path / PEFT_FILE
    raise FusionError(
        f"{path}: no adapter weights found (expected {' or '.join(MLX_FILES)} for mlx-lm, "
        f"or {PEFT_FILE} for PEFT)")


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in (*MLX_FILES, PEFT_FILE))


def _read_config(path: Path) -> dict:
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise FusionError(f"{cfg}: missing (every adapter needs its {CONFIG_FILE})")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8, an integer of 4300+ digits
        raise FusionError(f"{cfg}: not valid JSON ({e})") from None
    except RecursionError:
        raise FusionError(f"{cfg}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise FusionError(f"{cfg}: expected a JSON object")
    return data


def read_adapter(path: str | Path) -> Adapter:
    """Read an adapter's config and safetensors header (no tensor data).

    Reading decides whether the adapter can be used at all: every tensor of the file is a LoRA
    factor of a module, or a base-weight copy that is ignored (``ignored_tensors``), or the
    adapter is refused (:func:`refuse_unfusable`), so every command sees the same refusal."""
    path = Path(path)
    if not path.exists():
        raise FusionError(f"{path}: adapter directory does not exist")
    if not path.is_dir():
        raise FusionError(f"{path}: not a directory (an adapter is a directory with weights and {CONFIG_FILE})")
    layout, weights = find_weights(path)
    config = _read_config(path)
    tensors, _ = read_header(weights)
    adapter = (_read_mlx if layout == "mlx" else _read_peft)(path, weights, config, tensors)
    refuse_unfusable(adapter)
    return adapter


def _pair_modules(tensors: dict, suffix_a: str, suffix_b: str, prefix: str = ""):
    """Group factor tensors by module: ``[(module, a_info, b_info)]`` and the names left over
    (a factor without its pair is left over)."""
    a_names = {n[: -len(suffix_a)]: n for n in tensors if n.endswith(suffix_a)}
    b_names = {n[: -len(suffix_b)]: n for n in tensors if n.endswith(suffix_b)}
    pairs = []
    for stem in sorted(set(a_names) & set(b_names)):
        name = stem[len(prefix):] if prefix and stem.startswith(prefix) else stem
        pairs.append((name, tensors[a_names[stem]], tensors[b_names[stem]]))
    used = {t.name for _, a, b in pairs for t in (a, b)}
    return pairs, sorted(set(tensors) - used)


# Tensors that are not LoRA factor pairs, and why each kind cannot be used (first match wins).
_UNUSABLE = [
    (r"(^|\.)lora_magnitude_vector(\.|$)|\.m$",
     "DoRA magnitude vectors in an adapter whose config does not say DoRA (fine_tune_type dora / "
     "use_dora), or of a module without LoRA factors"),
    (r"(^|\.)lora_embedding_[AB](\.|$)", "lone lora_embedding_A/B factors (each needs its pair)"),
    (r"(^|\.)(lora_bias|lora_[ABab]\.bias)(\.|$)", "LoRA biases without their module's LoRA factors "
     "(PEFT's lora_bias needs lora_A/lora_B; mlx-lm has no LoRA bias)"),
    (r"(^|\.)modules_to_save(\.|$)", "modules_to_save weights (whole trained modules, not low-rank "
     "deltas; not supported yet)"),
    (r"(^|\.)lora_[ABab](\.weight)?$", "lone LoRA factors (each lora_a/lora_A needs its lora_b/lora_B)"),
    (r"\.bias$", "trained biases (PEFT's bias='all' or 'lora_only'; not supported yet)"),
    (r"\.(weight|scales|biases)$", "full weights (whole trained modules such as PEFT's modules_to_save "
     "or a full fine-tune, not low-rank deltas; not supported yet)"),
    (r"", "tensors that are not LoRA factors"),
]
_SHOWN = 3  # names listed per kind of unusable tensor


def _unusable(weights: Path, names: list[str]) -> str:
    """One line naming every tensor that cannot be used, grouped by kind."""
    groups: dict[str, list[str]] = {}
    for n in names:
        why = next(why for pattern, why in _UNUSABLE if re.search(pattern, n))
        groups.setdefault(why, []).append(n)
    parts = []
    for why, group in groups.items():
        shown = ", ".join(group[:_SHOWN]) + (f" and {len(group) - _SHOWN} more" if len(group) > _SHOWN else "")
        parts.append(f"{len(group)} tensor{'s' if len(group) > 1 else ''} of {why}: {shown}")
    return f"{weights}: cannot be used without losing data: " + "; ".join(parts)


def _value(v) -> str:
    """A config value as JSON, as the user wrote it (NaN, null, strings quoted), cut short."""
    try:
        text = json.dumps(v)
    except (RecursionError, ValueError):
        text = f"a nested {type(v).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _num(config: dict, key: str, where: Path, default=None, *, label: str | None = None):
    """``config[key]``: a finite number (not a bool); ``label`` names it in the message."""
    v = config.get(key, default)
    try:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v))
    except OverflowError:  # an integer beyond float range
        ok = False
    if not ok:
        raise FusionError(f"{where / CONFIG_FILE}: {label or key} must be a finite number, got {_value(v)}")
    return v


def _rank(v, label: str, where: Path) -> int:
    """A rank from a config: a positive integer."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise FusionError(f"{where / CONFIG_FILE}: {label} must be a positive integer, got {_value(v)}")
    return v


def _typed(config: dict, key: str, types, want: str, where: Path, default=None, *, label: str | None = None):
    """``config[key]`` if it is of ``types`` (or absent/null: ``default``)."""
    v = config.get(key)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        raise FusionError(f"{where / CONFIG_FILE}: {label or key} must be {want}, got {_value(v)}")
    return v


def _is_embedding(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in EMBEDDING_NAMES


def _module(weights: Path, name: str, a, b, layout: str, kind: str | None = None):
    """``(kind, rank, experts, in, out)`` of a module's factors, checked: ranks (and expert counts)
    agreeing, no dimension of size 0. mlx-lm: a linear layer's ``lora_a`` (in, r) and ``lora_b``
    (r, out); experts (E, r, in) and (E, out, r); an embedding (V, r) and (r, D). PEFT: ``lora_A``
    (r, in) and ``lora_B`` (out, r); ``lora_embedding_A`` (r, V) and ``lora_embedding_B`` (D, r)."""
    sa, sb = tuple(a.shape), tuple(b.shape)
    if kind is None:
        kind = ("experts" if layout == "mlx" and len(sa) == 3
                else "embedding" if layout == "mlx" and _is_embedding(name) else "linear")
    ok = 0 not in sa + sb and len(sa) == len(sb) == (3 if kind == "experts" else 2)
    if ok and kind == "experts":
        (e, r, fin), (e_b, fout, r_b) = sa, sb
        if e != e_b:
            raise FusionError(f"{weights}: module {name!r} has {e} experts in lora_a {list(sa)} but {e_b} "
                              f"in lora_b {list(sb)}")
        if r == r_b:
            return kind, r, e, fin, fout
    elif ok:
        if layout == "mlx":
            (fin, r), (r_b, fout) = sa, sb
            if kind == "embedding":  # lora_a (V, r), lora_b (r, D): out = V, in = D
                fin, fout = fout, fin
        else:
            (r, fin), (fout, r_b) = sa, sb
            if kind == "embedding":  # lora_embedding_A (r, V), lora_embedding_B (D, r)
                fin, fout = fout, fin
        if r == r_b:
            return kind, r, 0, fin, fout
    expected = {("mlx", "linear"): "(in, r) and (r, out)", ("mlx", "experts"): "(experts, r, in) and "
                "(experts, out, r)", ("mlx", "embedding"): "(vocabulary, r) and (r, dims)",
                ("peft", "linear"): "(r, in) and (out, r)",
                ("peft", "embedding"): "(r, vocabulary) and (dims, r)"}[layout, kind]
    raise FusionError(f"{weights}: module {name!r} has factor shapes {list(sa)} and "
                      f"{list(sb)}, expected {expected} with no size 0")


def _info(weights: Path, name: str, a, b, layout: str, scale_of, kind: str | None = None,
          bias_key: str | None = None) -> ModuleInfo:
    kind, r, e, fin, fout = _module(weights, name, a, b, layout, kind)
    return ModuleInfo(name, r, fin, fout, scale_of(name, r), a.name, b.name, a.dtype, kind, e, bias_key)


def _read_mlx(path: Path, weights: Path, config: dict, tensors: dict) -> Adapter:
    cfg = path / CONFIG_FILE
    ftt = _typed(config, "fine_tune_type", (str,), "a string (lora, dora or full)", path, "lora")
    lp = _typed(config, "lora_parameters", (dict,), "an object {rank, scale, dropout, keys}", path, {})
    num_layers = _typed(config, "num_layers", (int,), "an integer (-1 for all layers)", path)
    keys = _typed(lp, "keys", (list,), "a list of module paths", path, label="lora_parameters.keys")
    if keys is not None and not all(isinstance(k, str) for k in keys):
        raise FusionError(f"{cfg}: lora_parameters.keys must be a list of module paths, got {_value(keys)}")
    rank = _rank(lp["rank"], "lora_parameters.rank", path) if lp.get("rank") is not None else None
    if lp.get("dropout") is not None:
        _num(lp, "dropout", path, label="lora_parameters.dropout")
    base = [_typed(config, k, (str,), "a string (the base model)", path) for k in ("model", "base_model")]
    pairs, extra = _pair_modules(tensors, ".lora_a", ".lora_b")
    modules = {}
    if ftt == "lora" or pairs:
        if "scale" not in lp:
            raise FusionError(f"{cfg}: lora_parameters.scale is missing (mlx-lm requires it)")
        scale = float(_num(lp, "scale", path, label="lora_parameters.scale"))
        mags = {n[:-len(".m")]: n for n in extra if n.endswith(".m")} if ftt == "dora" else {}
        for name, a, b in pairs:
            info = _info(weights, name, a, b, "mlx", lambda n, r: scale)
            if ftt == "dora":
                info = _with_magnitude(weights, info, mags.get(name), tensors)
            modules[name] = info
        extra = [n for n in extra if n not in {m.magnitude_key for m in modules.values()}]
    adapter = Adapter(path, "mlx", weights, config, modules, ftt, num_layers, base[0] or base[1], extra)
    _check_against_tensors(adapter, rank, keys)
    return adapter


def _with_magnitude(weights: Path, info: ModuleInfo, key: str | None, tensors: dict) -> ModuleInfo:
    """A DoRA module: its magnitude vector, one entry per output row (per token of an embedding)."""
    from dataclasses import replace

    if key is None:
        raise FusionError(f"{weights}: DoRA adapter, but module {info.name!r} has no magnitude vector (.m / "
                          "lora_magnitude_vector)")
    if info.kind == "experts" or tuple(tensors[key].shape) != (info.out_features,):
        raise FusionError(f"{weights}: DoRA magnitude {key!r} has shape {list(tensors[key].shape)}, expected "
                          f"[{info.out_features}] for a {info.kind} module")
    return replace(info, magnitude_key=key)


def _check_against_tensors(adapter: Adapter, rank: int | None, keys: list[str] | None) -> None:
    """mlx-lm builds its LoRA layers from the config (``rank``, the last ``num_layers`` blocks,
    ``keys``) and then refuses tensors that do not fit them: check the same here, before any work."""
    cfg = adapter.path / CONFIG_FILE
    for m in adapter.modules.values():
        if rank is not None and m.rank != rank:
            raise FusionError(f"{cfg}: lora_parameters.rank is {rank} but module {m.name!r} has rank "
                              f"{m.rank} in {adapter.weights_file.name} (mlx_lm.load would refuse it)")
        if keys is not None and m.key not in keys:
            raise FusionError(f"{cfg}: lora_parameters.keys does not list {m.key!r}, which "
                              f"{adapter.weights_file.name} adapts (mlx_lm.load would refuse it)")
    n, layers = adapter.num_layers, adapter.layers
    if n is not None and n > 0 and layers and max(layers) - min(layers) + 1 > n:
        raise FusionError(f"{cfg}: num_layers is {n} (LoRA on the last {n} block{'s' * (n > 1)}) but "
                          f"{adapter.weights_file.name} adapts layers {min(layers)} to {max(layers)} "
                          f"({max(layers) - min(layers) + 1} blocks; mlx_lm.load would refuse it)")


def _patterns(config: dict, key: str, where: Path, check) -> dict:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: an object whose keys are module names or
    regular expressions; each value goes through ``check(value, label)``."""
    patterns = _typed(config, key, (dict,), "an object mapping module names or patterns to values", where, {})
    for k, v in patterns.items():
        try:
            re.compile(k)
        except re.error as e:
            raise FusionError(f"{where / CONFIG_FILE}: {key} key {k!r} is not a valid regular expression "
                              f"({e})") from None
        check(v, f"{key}[{k!r}]")
    return patterns


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name by suffix or regex."""
    for key, value in (patterns or {}).items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return value
    return default


def _read_peft(path: Path, weights: Path, config: dict, tensors: dict) -> Adapter:
    peft_type = _typed(config, "peft_type", (str,), "a string (LORA)", path, "LORA")
    use_dora = _typed(config, "use_dora", (bool,), "true or false", path, False)
    rslora = _typed(config, "use_rslora", (bool,), "true or false", path, False)
    base = _typed(config, "base_model_name_or_path", (str,), "a string (the base model)", path)
    ftt = peft_type.lower() if peft_type != "LORA" else "dora" if use_dora else "lora"
    r = _rank(config["r"], "r", path) if config.get("r") is not None else None
    alpha = _num(config, "lora_alpha", path, 8)  # PEFT's default lora_alpha
    alphas = _patterns(config, "alpha_pattern", path,
                       lambda v, label: _num({label: v}, label, path))
    ranks = _patterns(config, "rank_pattern", path, lambda v, label: _rank(v, label, path))
    if config.get("target_parameters"):
        raise FusionError(
            f"{path / CONFIG_FILE}: target_parameters {_value(config['target_parameters'])}: PEFT's LoRA on "
            "parameter tensors (fused mixture-of-experts weights) stores each expert's factors interleaved, "
            "oriented by the model's own parameter layout, which the adapter does not record; not supported "
            "(PEFT adapters of per-expert linear layers, and mlx-lm's LoRASwitchLinear, are)")
    pairs, extra = _pair_modules(tensors, ".lora_A.weight", ".lora_B.weight", PEFT_PREFIX)
    emb_pairs, extra = _pair_modules({n: tensors[n] for n in extra}, ".lora_embedding_A", ".lora_embedding_B",
                                     PEFT_PREFIX)
    biases = {n[len(PEFT_PREFIX):-len(".lora_B.bias")]: n for n in extra if n.endswith(".lora_B.bias")}
    ignored = [n for n in extra if n.endswith(".base_layer.weight")]
    extra = [n for n in extra if n not in set(ignored)]

    def scale_of(name: str, rank: int) -> float:
        want = _pattern_value(ranks, name, r)
        if want is not None and want != rank:
            raise FusionError(f"{path / CONFIG_FILE}: gives module {name!r} rank {want} (r / rank_pattern) "
                              f"but its lora_A in {weights.name} has rank {rank} (PEFT would refuse it)")
        al = float(_pattern_value(alphas, name, alpha))
        return al / math.sqrt(rank) if rslora else al / rank

    modules = {}
    for name, a, b in pairs:
        bias = biases.get(name)
        if bias is not None and tuple(tensors[bias].shape) != (b.shape[0],):
            raise FusionError(f"{weights}: module {name!r} has a lora_B.bias of shape "
                              f"{list(tensors[bias].shape)}, expected [{b.shape[0]}] (its output size)")
        modules[name] = _info(weights, name, a, b, "peft", scale_of, bias_key=bias)
    for name, a, b in emb_pairs:
        modules[name] = _info(weights, name, a, b, "peft", scale_of, kind="embedding")
    if use_dora:
        mags = {n[len(PEFT_PREFIX):-len(".lora_magnitude_vector")]: n for n in extra
                if n.endswith(".lora_magnitude_vector")}
        for name, info in list(modules.items()):
            if info.kind == "embedding":
                raise FusionError(f"{weights}: DoRA on the embedding {name!r} (PEFT): not supported")
            modules[name] = _with_magnitude(weights, info, mags.get(name), tensors)
    saved = _typed(config, "modules_to_save", (list,), "a list of module names", path, []) or []
    for n in list(extra):
        stem = n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n
        stem = stem.replace(".modules_to_save.default.", ".")
        if not stem.endswith(".weight") or len(tensors[n].shape) != 2:
            continue
        name = stem[: -len(".weight")]
        if name in modules or not any(name == k or name.endswith("." + k) for k in saved if isinstance(k, str)):
            continue
        out_f, in_f = tensors[n].shape
        kind = "embedding" if _is_embedding(name) else "linear"
        modules[name] = ModuleInfo(name, 0, in_f, out_f, 1.0, "", "", tensors[n].dtype, kind, full_key=n)
    used = {k for m in modules.values() for k in (m.bias_key, m.magnitude_key, m.full_key)}
    extra = [n for n in extra if n not in used]
    return Adapter(path, "peft", weights, config, modules, ftt, None, base, extra, ignored)


def refuse_unfusable(adapter: Adapter) -> None:
    """Refuse what is not a LoRA (or DoRA) adapter, with the reason: full fine-tunes are not
    low-rank deltas, and a tensor that is neither a LoRA factor (or bias, DoRA magnitude,
    module_to_save) nor an ignored base-weight copy would be lost from every output. Modules whose
    delta needs the base model (DoRA, modules_to_save) are refused later, where no base is given."""
    if adapter.fine_tune_type not in ("lora", "dora"):
        raise FusionError(
            f"{adapter.path}: {adapter.fine_tune_type!r} fine-tune, not a LoRA adapter: it holds full "
            "weights, not a low-rank delta, so there is nothing to fuse here")
    if adapter.extra_tensors:
        raise FusionError(_unusable(adapter.weights_file, adapter.extra_tensors))
    if not adapter.modules:
        raise FusionError(f"{adapter.weights_file}: no LoRA factor tensors found")
