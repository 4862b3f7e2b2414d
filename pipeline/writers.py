"""Writing adapters: the mlx-lm layout (what a fusion writes) and the PEFT layout, and conversion
between the two (tensors copied exactly; rsLoRA honoured through the scale).

A written adapter is what ``mlx_lm.load(base, adapter_path=out)`` or ``PeftModel.from_pretrained``
loads unchanged; a converted one also carries ``conversion.json``, the record by which the tool
recognises a directory it wrote (:mod:`pipeline.destination`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.destination import check_destination
from pipeline.errors import FusionError
from pipeline.formats import CONFIG_FILE, PEFT_FILE, PEFT_PREFIX, Adapter, read_adapter, refuse_unfusable
from pipeline.io import atomic_dir, write_json
from pipeline.safetensors_io import sha256_file, write_file


def mlx_tensors(modules: dict[str, tuple[np.ndarray, np.ndarray]],
                kinds: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """``{module: (A (r, in), B (out, r))}`` -> mlx-lm tensor names and layouts: a linear layer's
    ``lora_a`` = A^T, ``lora_b`` = B^T; experts (A (E, r, in), B (E, out, r)) as they are; an
    embedding's ``lora_a`` = B (V, r), ``lora_b`` = A (r, D)."""
    out = {}
    for name, (a, b) in modules.items():  # transposed views; the writer copies one at a time
        kind = (kinds or {}).get(name, "linear")
        lora_a, lora_b = {"linear": (a.T, b.T), "experts": (a, b), "embedding": (b, a)}[kind]
        out[f"{name}.lora_a"] = lora_a
        out[f"{name}.lora_b"] = lora_b
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
              dtypes: dict[str, str] | None = None, kinds: dict[str, str] | None = None) -> str:
    """Write an mlx-lm adapter into the (existing) directory ``out``; return the sha256 of its
    ``adapters.safetensors``."""
    digest = write_file(out / "adapters.safetensors", mlx_tensors(modules, kinds), {"format": "mlx"}, dtypes)
    write_json(out / CONFIG_FILE, config)
    return digest


def write_peft(out: Path, modules: dict[str, tuple[np.ndarray, np.ndarray]], config: dict,
               dtypes: dict[str, str] | None = None, kinds: dict[str, str] | None = None,
               biases: dict[str, np.ndarray] | None = None) -> str:
    """Write a PEFT adapter (``modules``: A (r, in), B (out, r)) into the directory ``out``; an
    embedding as ``lora_embedding_A`` = B^T (r, V) and ``lora_embedding_B`` = A^T (D, r); ``biases``
    (already scaled) as ``lora_B.bias`` divided by the config's scale. Mixture-of-experts modules
    are refused: PEFT has no layout for them that records its orientation. Returns the sha256."""
    tensors = {}
    rank = config.get("r") or 1
    scale = config.get("lora_alpha", 8) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    for name, (a, b) in modules.items():
        kind = (kinds or {}).get(name, "linear")
        if kind == "experts":
            raise FusionError(f"module {name} is a mixture-of-experts layer: the PEFT layout has no place for "
                              "per-expert factors that records their orientation; keep the mlx-lm layout")
        if kind == "embedding":
            tensors[f"{PEFT_PREFIX}{name}.lora_embedding_A"] = b.T
            tensors[f"{PEFT_PREFIX}{name}.lora_embedding_B"] = a.T
            continue
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    for name, bias in (biases or {}).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_B.bias"] = (np.asarray(bias, np.float64) / scale).astype(np.float32)
    digest = write_file(out / PEFT_FILE, tensors, {"format": "pt"}, dtypes)
    write_json(out / CONFIG_FILE, config)
    return digest


def common_rank(modules: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    return max((a.shape[0] for a, _ in modules.values()), default=1)


def pad_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad factors to ``rank`` (exact: the extra rows/columns contribute nothing)."""
    r = a.shape[-2]  # A (..., r, in), B (..., out, r): experts pad each expert alike
    if r == rank:
        return a, b
    a2 = np.zeros((*a.shape[:-2], rank, a.shape[-1]), a.dtype)
    b2 = np.zeros((*b.shape[:-1], rank), b.dtype)
    a2[..., :r, :], b2[..., :r] = a, b
    return a2, b2


def output_num_layers(adapters: list[Adapter]) -> int:
    """mlx-lm's ``num_layers`` covering every input: the largest, or -1 (all) if any is unknown."""
    ns = [a.num_layers for a in adapters]
    if any(n is None or n < 0 for n in ns):
        return -1
    return max(ns)



def _tidy_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


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
    if any(m.needs_base for m in adapter.modules.values()):
        what = "DoRA adapter" if adapter.fine_tune_type == "dora" else "modules_to_save tensors"
        raise FusionError(f"{adapter.path}: {what}: its delta depends on the base model's weights, so a copy "
                          "of its tensors in the other layout is not guaranteed to be the same adapter; "
                          "fuse it (with --base) to get a plain LoRA")
    if to == "mlx" and any(m.bias_key for m in adapter.modules.values()):
        raise FusionError(f"{adapter.weights_file}: has LoRA biases (lora_B.bias), which mlx-lm's LoRA layers "
                          "cannot hold; keep the PEFT layout")
    modules, dtypes, biases = {}, {}, {}
    kinds = {n: m.kind for n, m in adapter.modules.items()}
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
        if info.bias_key:
            biases[name] = adapter.bias(name) * np.float32(s)
        dt = info.dtype if info.dtype in ("BF16", "F16") else None
        emb = info.kind == "embedding"
        if dt:
            for key in ((f"{name}.lora_a", f"{name}.lora_b") if to == "mlx" else
                        (f"{PEFT_PREFIX}{name}.lora_embedding_A", f"{PEFT_PREFIX}{name}.lora_embedding_B") if emb
                        else (f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight")):
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
            write_mlx(tmp, modules, mlx_config(rank, _tidy_number(scale), keys, num_layers, extra), dtypes, kinds)
        else:
            write_peft(tmp, modules, _peft_config(adapter, rank, scale, uniform), dtypes, kinds, biases)
        write_json(tmp / "conversion.json", {
            "written_by": "lora-fusion", "converted_from": str(src), "layout": to,
            "source_sha256": sha256_file(adapter.weights_file)})
    return read_adapter(out)


def _peft_config(adapter: Adapter, rank: int, scale: float, uniform: bool) -> dict:
    kept = adapter.config.get("peft_config") if adapter.layout == "mlx" else adapter.config
    if kept and uniform:
        r, alpha = kept.get("r"), kept.get("lora_alpha")
        if isinstance(r, int) and isinstance(alpha, (int, float)) and r == rank:
            s = alpha / math.sqrt(r) if kept.get("use_rslora") else alpha / r
            if math.isclose(s, scale, rel_tol=1e-9):
                return kept
    return peft_config(list(adapter.modules.values()), rank, scale, adapter.base_model)


def peft_config(infos: list, rank: int, scale: float, base_model: str | None) -> dict:
    """A PEFT LoRA config for modules ``infos`` (:class:`pipeline.formats.ModuleInfo`) of one rank
    and scale."""
    layers = sorted({m.layer for m in infos if m.layer is not None})
    covered = {(m.layer, m.key.rsplit(".", 1)[-1]) for m in infos}
    targets = sorted({t for _, t in covered})
    if covered != {(i, t) for i in layers for t in targets} or any(m.layer is None for m in infos):
        # Not every target in every layer (e.g. a fusion of adapters over different modules), or a
        # module outside the blocks (an embedding): PEFT would put a LoRA layer on each (layer,
        # target) pair and miss the weights of the absent ones, so name the modules exactly (PEFT
        # matches a full name as well as a suffix).
        targets, layers = sorted(m.name for m in infos), []
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": _tidy_number(scale * rank),
        "lora_dropout": 0.0,
        "use_rslora": False,
        "bias": "none",
        **({"lora_bias": True} if any(m.bias_key for m in infos) else {}),
        "target_modules": targets,
        "layers_to_transform": layers or None,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
