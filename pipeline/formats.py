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
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.destination import check_destination
from pipeline.errors import FusionError
from pipeline.safetensors_io import SafetensorsFile, read_header, sha256_file, write_file

MLX_FILES = ("adapters.safetensors", "best_adapters.safetensors")
PEFT_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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
    _file: SafetensorsFile | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

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
        return 2 * len(self.modules) + len(self.extra_tensors)

    def open(self) -> SafetensorsFile:
        if self._file is None:
            self._file = SafetensorsFile(self.weights_file)
        return self._file

    def factors(self, module: str) -> tuple[np.ndarray, np.ndarray, float]:
        """``(A (r, in), B (out, r), scale)`` of one module, float32."""
        info = self.modules[module]
        f = self.open()
        a, b = f.get(info.a_key), f.get(info.b_key)
        if self.layout == "mlx":
            a, b = a.T, b.T
        return np.ascontiguousarray(a), np.ascontiguousarray(b), info.scale

    def check_finite(self) -> list[str]:
        """Names of tensors holding NaN or Inf (one sequential read of the weights file)."""
        return self.open().nonfinite()


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FusionError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FusionError(f"{cfg}: expected a JSON object")
    return data


def read_adapter(path: str | Path) -> Adapter:
    """Read an adapter's config and safetensors header (no tensor data)."""
    path = Path(path)
    if not path.exists():
        raise FusionError(f"{path}: adapter directory does not exist")
    if not path.is_dir():
        raise FusionError(f"{path}: not a directory (an adapter is a directory with weights and {CONFIG_FILE})")
    layout, weights = find_weights(path)
    config = _read_config(path)
    tensors, _ = read_header(weights)
    return (_read_mlx if layout == "mlx" else _read_peft)(path, weights, config, tensors)


def _pair_modules(weights: Path, tensors: dict, suffix_a: str, suffix_b: str, prefix: str = ""):
    """Group factor tensors by module; yield (module, a_info, b_info) and leftovers."""
    a_names = {n[: -len(suffix_a)]: n for n in tensors if n.endswith(suffix_a)}
    b_names = {n[: -len(suffix_b)]: n for n in tensors if n.endswith(suffix_b)}
    for stem in sorted(set(a_names) ^ set(b_names)):
        have = suffix_a if stem in a_names else suffix_b
        raise FusionError(f"{weights}: module {stem!r} has {have.strip('.')} but not its pair")
    pairs = []
    for stem in sorted(a_names):
        name = stem[len(prefix):] if prefix and stem.startswith(prefix) else stem
        pairs.append((name, tensors[a_names[stem]], tensors[b_names[stem]]))
    used = set(a_names.values()) | set(b_names.values())
    return pairs, sorted(set(tensors) - used)


def _num(config: dict, key: str, where: Path, default=None):
    v = config.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FusionError(f"{where / CONFIG_FILE}: {key!r} must be a number, got {v!r}")
    return v


def _read_mlx(path: Path, weights: Path, config: dict, tensors: dict) -> Adapter:
    ftt = config.get("fine_tune_type", "lora")
    lp = config.get("lora_parameters") or {}
    pairs, extra = _pair_modules(weights, tensors, ".lora_a", ".lora_b")
    modules = {}
    if ftt == "lora" or pairs:
        scale = float(_num(lp, "scale", path)) if "scale" in lp else None
        if scale is None:
            raise FusionError(f"{path / CONFIG_FILE}: lora_parameters.scale is missing (mlx-lm requires it)")
        for name, a, b in pairs:
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
                raise FusionError(f"{weights}: module {name!r} has factor shapes {list(a.shape)} and "
                                  f"{list(b.shape)}, expected (in, r) and (r, out)")
            modules[name] = ModuleInfo(name, a.shape[1], a.shape[0], b.shape[1], scale,
                                       a.name, b.name, a.dtype)
    num_layers = config.get("num_layers")
    return Adapter(path, "mlx", weights, config, modules, ftt,
                   int(num_layers) if isinstance(num_layers, int) else None,
                   config.get("model") or config.get("base_model"), extra)


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name by suffix or regex."""
    for key, value in (patterns or {}).items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return value
    return default


def _read_peft(path: Path, weights: Path, config: dict, tensors: dict) -> Adapter:
    ftt = "dora" if config.get("use_dora") else "lora"
    if config.get("peft_type", "LORA") != "LORA":
        ftt = str(config.get("peft_type")).lower()
    pairs, extra = _pair_modules(weights, tensors, ".lora_A.weight", ".lora_B.weight", PEFT_PREFIX)
    if any(n.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in n for n in extra):
        ftt = "dora"
    alpha = config.get("lora_alpha", config.get("r", 8))
    rslora = bool(config.get("use_rslora"))
    modules = {}
    for name, a, b in pairs:
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise FusionError(f"{weights}: module {name!r} has factor shapes {list(a.shape)} and "
                              f"{list(b.shape)}, expected (r, in) and (out, r)")
        r = a.shape[0]
        al = float(_pattern_value(config.get("alpha_pattern"), name, alpha))
        scale = al / math.sqrt(r) if rslora else al / r
        modules[name] = ModuleInfo(name, r, a.shape[1], b.shape[0], scale, a.name, b.name, a.dtype)
    extra = [n for n in extra if not n.endswith(".base_layer.weight")]
    return Adapter(path, "peft", weights, config, modules, ftt, None,
                   config.get("base_model_name_or_path"), extra)


# --- writers ---------------------------------------------------------------------------------

def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def mlx_tensors(modules: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """``{module: (A (r, in), B (out, r))}`` -> mlx-lm tensor names and layouts."""
    out = {}
    for name, (a, b) in modules.items():  # transposed views; the writer copies one at a time
        out[f"{name}.lora_a"] = a.T
        out[f"{name}.lora_b"] = b.T
    return out


def mlx_config(rank: int, scale: float, keys: list[str], num_layers: int, extra: dict | None = None) -> dict:
    cfg = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
    }
    cfg.update(extra or {})
    return cfg


def write_mlx(out: Path, modules: dict[str, tuple[np.ndarray, np.ndarray]], config: dict,
              dtypes: dict[str, str] | None = None) -> str:
    """Write an mlx-lm adapter into the (existing) directory ``out``; return the sha256 of its
    ``adapters.safetensors``."""
    digest = write_file(out / "adapters.safetensors", mlx_tensors(modules), {"format": "mlx"}, dtypes)
    (out / CONFIG_FILE).write_text(_json(config))
    return digest


def write_peft(out: Path, modules: dict[str, tuple[np.ndarray, np.ndarray]], config: dict,
               dtypes: dict[str, str] | None = None) -> None:
    """Write a PEFT adapter (``modules``: A (r, in), B (out, r)) into the directory ``out``."""
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    write_file(out / PEFT_FILE, tensors, {"format": "pt"}, dtypes)
    (out / CONFIG_FILE).write_text(_json(config))


def common_rank(modules: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    return max((a.shape[0] for a, _ in modules.values()), default=1)


def pad_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad factors to ``rank`` (exact: the extra rows/columns contribute nothing)."""
    r = a.shape[0]
    if r == rank:
        return a, b
    a2 = np.zeros((rank, a.shape[1]), a.dtype)
    b2 = np.zeros((b.shape[0], rank), b.dtype)
    a2[:r], b2[:, :r] = a, b
    return a2, b2


def output_num_layers(adapters: list[Adapter]) -> int:
    """mlx-lm's ``num_layers`` covering every input: the largest, or -1 (all) if any is unknown."""
    ns = [a.num_layers for a in adapters]
    if any(n is None or n < 0 for n in ns):
        return -1
    return max(ns)


# --- atomic output and conversion -----------------------------------------------------------

class atomic_dir:
    """``with atomic_dir(out) as tmp:`` write into ``tmp``; on success it replaces ``out``.

    The temporary directory is a hidden sibling of ``out``, so the final rename stays on one file
    system; an interrupted or failed write leaves ``out`` as it was (absent or the old version).
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def __enter__(self) -> Path:
        import tempfile

        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        import os
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        self.tmp.chmod(0o755)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return False


def _tidy_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def refuse_unfusable(adapter: Adapter) -> None:
    """DoRA and full fine-tunes are not low-rank deltas: refuse them with the reason."""
    if adapter.fine_tune_type == "dora":
        raise FusionError(
            f"{adapter.path}: DoRA adapter (fine_tune_type dora): its magnitude vector rescales the "
            "whole fused weight, so it is not a low-rank delta and cannot be fused exactly; "
            "retrain it as LoRA or fuse it into the base model first")
    if adapter.fine_tune_type != "lora":
        raise FusionError(
            f"{adapter.path}: {adapter.fine_tune_type!r} fine-tune, not a LoRA adapter: it holds full "
            "weights, not a low-rank delta, so there is nothing to fuse here")
    if not adapter.modules:
        raise FusionError(f"{adapter.weights_file}: no LoRA factor tensors found")


def convert(src: str | Path, out: str | Path, to: str) -> Adapter:
    """Write ``src`` in the ``to`` layout ("mlx" or "peft") to ``out``; tensors are copied exactly.

    PEFT -> mlx-lm keeps each module's factors and, when every module shares one rank and scale,
    the scale in the config (otherwise the scale is folded into ``lora_b`` and ranks are
    zero-padded to the largest). The original PEFT config is kept under ``peft_config`` so that
    converting back gives the same files. rsLoRA is honoured through the scale.
    """
    if to not in ("mlx", "peft"):
        raise FusionError(f"unknown layout {to!r}: use 'mlx' or 'peft'")
    adapter = read_adapter(src)
    refuse_unfusable(adapter)
    check_destination(out, [src], record="conversion.json")
    bad = adapter.check_finite()
    if bad:
        raise FusionError(f"{adapter.weights_file}: tensor {bad[0]!r} holds NaN or Inf values")
    modules, dtypes = {}, {}
    scales = adapter.scales
    uniform = len(scales) == 1 and len(adapter.ranks) == 1
    scale = next(iter(scales)) if uniform else 1.0
    rank = max(adapter.ranks)
    for name, info in adapter.modules.items():
        a, b, s = adapter.factors(name)
        if not uniform:
            b = b * np.float32(s)
            a, b = pad_rank(a, b, rank)
        modules[name] = (a, b)
        dt = info.dtype if info.dtype in ("BF16", "F16") else None
        if dt:
            for key in ((f"{name}.lora_a", f"{name}.lora_b") if to == "mlx" else
                        (f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight")):
                dtypes[key] = dt
    keys = sorted({m.key for m in adapter.modules.values()})
    with atomic_dir(out) as tmp:
        if to == "mlx":
            extra = {}
            if adapter.layout == "peft":
                extra["peft_config"] = adapter.config
                if adapter.base_model:
                    extra["model"] = adapter.base_model
            elif adapter.config:
                extra = {k: v for k, v in adapter.config.items()
                         if k not in ("fine_tune_type", "num_layers", "lora_parameters")}
            num_layers = adapter.num_layers if adapter.layout == "mlx" and adapter.num_layers else -1
            write_mlx(tmp, modules, mlx_config(rank, _tidy_number(scale), keys, num_layers, extra), dtypes)
        else:
            write_peft(tmp, modules, _peft_config(adapter, rank, scale, uniform), dtypes)
        (tmp / "conversion.json").write_text(_json({
            "written_by": "lora-fusion", "converted_from": str(src), "layout": to,
            "source_sha256": sha256_file(adapter.weights_file)}))
    return read_adapter(out)


def _peft_config(adapter: Adapter, rank: int, scale: float, uniform: bool) -> dict:
    kept = adapter.config.get("peft_config") if adapter.layout == "mlx" else adapter.config
    if kept and uniform:
        r, alpha = kept.get("r"), kept.get("lora_alpha")
        if isinstance(r, int) and isinstance(alpha, (int, float)) and r == rank:
            s = alpha / math.sqrt(r) if kept.get("use_rslora") else alpha / r
            if math.isclose(s, scale, rel_tol=1e-9):
                return kept
    layers = sorted({m.layer for m in adapter.modules.values() if m.layer is not None})
    covered = {(m.layer, m.key.rsplit(".", 1)[-1]) for m in adapter.modules.values()}
    targets = sorted({t for _, t in covered})
    if covered != {(i, t) for i in layers for t in targets}:
        # Not every target in every layer (e.g. a fusion of adapters over different modules):
        # PEFT would put a LoRA layer on each (layer, target) pair and miss the weights of the
        # absent ones, so name the modules exactly (PEFT matches a full name as well as a suffix).
        targets, layers = sorted(adapter.modules), []
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": rank,
        "lora_alpha": _tidy_number(scale * rank),
        "lora_dropout": 0.0,
        "use_rslora": False,
        "bias": "none",
        "target_modules": targets,
        "layers_to_transform": layers or None,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
