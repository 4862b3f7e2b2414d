"""Fuse adapters: resolve parameters per module, stream the math module by module, write once.

The output is an mlx-lm adapter (``adapters.safetensors`` + ``adapter_config.json``, scale 1.0 with
every scale folded into the factors, one rank for all modules, zero-padded where a module needs
less) that ``mlx_lm.load(base, adapter_path=out)`` loads unchanged, plus ``fusion.json``: inputs
with their sha256, the method and fully resolved parameters, per-module rank, re-factoring error
and geometry, the data-free quality signals (:mod:`pipeline.signals`), library versions. No
timestamps: same inputs and parameters give the same bytes.
Parameters resolve per module as :mod:`pipeline.spec` says.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import geometry, signals
from pipeline.errors import FusionError
from pipeline.formats import Adapter, sha256_file
from pipeline.writers import mlx_config, output_num_layers, pad_rank, peft_config, write_mlx, write_peft
from pipeline.io import atomic_dir, write_json
from pipeline.methods import get_method, run_method
from pipeline.spec import FusionSpec, check_spec, module_params
from pipeline.threads import blas_thread_count, blas_threads, worker_count
from pipeline.validate import validate

__all__ = ["FusedFactors", "FusionSpec", "check_spec", "fuse", "module_params"]


VERSIONED = ("lora-fusion", "numpy", "mlx", "mlx-lm", "safetensors")


def _versions() -> dict[str, str]:
    """Installed versions of the packages a fusion depends on, from the names of the ``.dist-info``
    directories on ``sys.path`` (``importlib.metadata`` answers the same but reads every
    distribution's metadata, a tenth of a second per call here); ``importlib.metadata`` for any
    package not found that way."""
    import re
    import sys

    want = {re.sub(r"[-_.]+", "_", p).lower(): p for p in VERSIONED}
    out: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for d in names:
            if d.endswith(".dist-info") and "-" in d:
                name, version = d[: -len(".dist-info")].split("-", 1)
                pkg = want.get(re.sub(r"[-_.]+", "_", name).lower())
                if pkg is not None and pkg not in out:
                    out[pkg] = version
    missing = [p for p in VERSIONED if p not in out]
    if missing:
        from importlib import metadata

        for pkg in missing:
            try:
                out[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                pass
    return {p: out[p] for p in VERSIONED if p in out}


def fuse(adapters: list[str | Path], out: str | Path | None, spec: FusionSpec | None = None, *,
         progress: Callable[[int, int], None] | None = None, ignore_base: bool = False,
         names: list[str] | None = None, base: str | Path | None = None):
    """Fuse ``adapters`` into ``out`` (an mlx-lm adapter directory) and return the fusion record.

    Validation runs first; nothing is written when it fails. ``progress(done, total)`` is called
    after each module. ``base`` (the base model's directory) is read only when an adapter's delta
    depends on it (DoRA, modules_to_save; :mod:`pipeline.base_weights`): each such module's exact
    dense delta is fused like any other, and written as plain LoRA of the output rank (default:
    the largest LoRA rank among its sources) with the re-factoring error recorded.

    ``out=None``: nothing is written; returns the fused factors and config in memory
    (``FusedFactors``: exactly what would be written as ``adapters.safetensors`` and
    ``adapter_config.json``), for scoring without a file (``pipeline.live``).
    """
    spec = spec or FusionSpec()
    check_spec(spec, len(adapters))
    method = get_method(spec.method)
    checked = validate(adapters, out, ignore_base=ignore_base, space=spec.space, base=base, digest=True)
    srcs = checked.adapters
    base_w = None
    if any(m.needs_base for a in srcs for m in a.modules.values()):
        from pipeline.base_weights import BaseWeights

        base_w = BaseWeights(base)
    base_dir = base
    names = names or [a.name for a in srcs]
    info_of = {n: m for a in reversed(srcs) for n, m in a.modules.items()}
    all_modules = sorted(info_of, key=_module_order)
    layers = set().union(*(a.layers for a in srcs))
    n_layers = max(layers) + 1 if layers else 1

    for a in srcs:
        a.open()

    def one(name: str):
        """Fuse one module: ``(factors, bias or None, {record name: record})``; a mixture-of-experts
        module is fused expert by expert, each as its own module ``name[e]``."""
        info = info_of[name]
        shape = (info.out_features, info.in_features)
        loaded = [_source(a, name, base_w) if name in a.modules else None for a in srcs]
        p = module_params(spec, name, info.layer, n_layers, len(srcs))
        if p.rank is None and any(a.modules[name].needs_base for a in srcs if name in a.modules):
            # a dense delta (DoRA, module_to_save) is not low-rank: written at the sources' LoRA rank
            ranks = [a.modules[name].rank for a in srcs if name in a.modules and a.modules[name].rank]
            p = replace(p, rank=max(ranks or [r for a in srcs for r in a.ranks]))
        if info.kind != "experts":
            sources = [None if f is None else (f[0], _scaled(f[1], f[2])) for f in loaded]
            factors, rec = _fuse_module(method, sources, shape, p, name)
            return factors, _fused_bias(srcs, name, p, method.uses_weights(len(srcs))), {name: rec}
        parts, recs = [], {}
        for e in range(info.experts):
            sources = [None if f is None else (f[0][e], _scaled(f[1][e], f[2])) for f in loaded]
            parts.append(_fuse_module(method, sources, shape, p, f"{name}[{e}]"))
            recs[f"{name}[{e}]"] = parts[-1][1]
        rank = max(a.shape[0] for (a, _), _ in parts)
        padded = [pad_rank(a, b, rank) for (a, b), _ in parts]
        return (np.stack([a for a, _ in padded]), np.stack([b for _, b in padded])), None, recs

    fused: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    biases: dict[str, np.ndarray] = {}
    per_module: dict[str, dict] = {}
    hashes = {}
    dense = 0
    if spec.space == "delta" and not method.exact:
        dense = 2 * 4 * max(m.out_features * m.in_features for m in info_of.values())
    workers = worker_count(dense)
    # no MLX product runs here (a base model for DoRA is loaded before), so its OpenBLAS is not loaded
    with blas_threads(blas_thread_count(), mlx=False), ThreadPoolExecutor(workers, thread_name_prefix="fuse") as pool:
        try:
            # the digests came with validation's read of the values
            hashes = {a.weights_file: a.sha256 or pool.submit(sha256_file, a.weights_file) for a in srcs}
            for i, (name, fut) in enumerate(zip(all_modules, [pool.submit(one, n) for n in all_modules])):
                fused[name], bias, recs = fut.result()
                per_module.update(recs)
                if bias is not None:
                    biases[name] = bias
                if progress:
                    progress(i + 1, len(all_modules))
            hashes = {k: f if isinstance(f, str) else f.result() for k, f in hashes.items()}
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise

    bad = sorted(k for k, (a, b) in fused.items() if not (np.isfinite(a).all() and np.isfinite(b).all())
                 or k in biases and not np.isfinite(biases[k]).all())
    if bad:
        raise FusionError(f"the fused factors of {len(bad)} module(s) are not finite in float32 (first: "
                          f"{bad[0]}): the weights or the inputs' scales are too large; nothing was written")
    rank = max(a.shape[-2] for a, _ in fused.values())
    fused = {k: pad_rank(a, b, rank) for k, (a, b) in fused.items()}
    keys = sorted({info_of[k].key for k in fused})
    base = next((a.base_model for a in srcs if a.base_model), None)
    extra = {"model": base} if base else {}
    config = mlx_config(rank, 1.0, keys, output_num_layers(srcs), extra)
    if out is None:
        if biases:
            raise FusionError(f"{len(biases)} module(s) with LoRA biases: such a fusion is written in the PEFT "
                              "layout and cannot be applied in memory")
        return FusedFactors(fused, config, per_module)
    errors = [m["error"] for m in per_module.values()]
    record = {
        "method": spec.method,
        "params": spec.to_json(),
        "inputs": [_input_record(n, a, hashes[a.weights_file]) for n, a in zip(names, srcs)],
        "notes": checked.notes,
        "output": {
            "rank": rank, "scale": 1.0, "num_layers": config["num_layers"], "keys": keys,
            "modules": len(fused),
            "max_error": max(errors, default=0.0),
            "mean_error": float(np.mean(errors)) if errors else 0.0,
        },
        "geometry": geometry.summarize(per_module, names),
        "signals": signals.summarize(per_module, names),
        "modules": per_module,
        "versions": _versions(),
    }
    kinds = {k: info_of[k].kind for k in fused}
    from_base = sorted({v for a in srcs for v in ("dora", "modules_to_save") if v in a.variants})
    if from_base:
        record["notes"].append(f"{' and '.join(from_base)} deltas computed from the base model {base_dir}, fused "
                               "in delta space and written as plain LoRA (re-factoring error per module)")
        record["base_model_path"] = str(base_dir)
    if biases:
        # mlx-lm's LoRA layers have no bias: a fusion that moves biases is written for PEFT (lora_bias)
        record["output"]["layout"] = "peft"
        record["notes"].append(f"{len(biases)} module(s) with LoRA biases: written in the PEFT layout "
                               "(lora_bias), since mlx-lm's LoRA layers have no bias")
    record["signals"]["warnings"] = signals.warnings(record["signals"], record["geometry"])
    with atomic_dir(out) as tmp:
        if biases:
            peft_cfg = peft_config([info_of[k] for k in fused], rank, 1.0, base)
            peft_cfg["lora_bias"] = True
            record["output"]["sha256"] = write_peft(tmp, fused, peft_cfg, kinds=kinds, biases=biases)
        else:
            record["output"]["sha256"] = write_mlx(tmp, fused, config, kinds=kinds)
        record["output"]["config_sha256"] = sha256_file(tmp / "adapter_config.json")
        write_json(tmp / "fusion.json", record)
    return record


@dataclass
class FusedFactors:
    """A fusion in memory: exactly what ``fuse`` writes as ``adapters.safetensors`` and
    ``adapter_config.json`` (mlx-lm layout)."""
    factors: dict[str, tuple[np.ndarray, np.ndarray]]  # module -> (A (rank, in), B (out, rank)), float32
    config: dict                                       # the mlx-lm adapter_config.json
    modules: dict[str, dict]                           # per module: rank, error, geometry


def _source(a: Adapter, name: str, base_w) -> tuple[np.ndarray, np.ndarray, float]:
    """``(A, B, scale)`` of one source module; a module whose delta needs the base model (DoRA,
    module_to_save) as the exact factors of its dense delta, scale 1."""
    if not a.modules[name].needs_base:
        return a.factors(name)
    from pipeline.base_weights import as_factors, dense_delta

    return (*as_factors(dense_delta(a, name, base_w)), 1.0)


def _scaled(b: np.ndarray, scale: float) -> np.ndarray:
    """``b * scale`` in float32, in place: ``b`` is the fresh array :func:`_source` read."""
    b *= np.float32(scale)
    return b


def _fuse_module(method, sources: list, shape: tuple[int, int], p, name: str):
    """One 2-D module (a linear layer, an embedding or one expert): its factors and record."""
    result = run_method(method, sources, shape, p, name)
    factors = (np.asarray(result.a, np.float32), np.asarray(result.b, np.float32))
    # every figure from the Gram matrices: the method's own where it has them, else one pass over the factors
    grams = geometry.JointGrams.of(sources, factors, result.span)
    return factors, {"rank": int(result.rank), "error": float(result.error),
                     "fused_norm": math.sqrt(max(grams.inner(len(sources), len(sources)), 0.0)),
                     **geometry.module_geometry(sources, shape, name, grams=grams),
                     **signals.module_signals(sources, factors, float(result.error), grams=grams)}


def _fused_bias(srcs: list[Adapter], name: str, p, uses_weights: bool) -> np.ndarray | None:
    """The weighted sum of the sources' bias deltas ``s_i * bias_i`` (None when no source has one):
    linear with the fusion's weights (a method that reads ``t`` instead, slerp of two: ``1 - t`` and
    ``t``), a missing one zero."""
    found = [(i, a) for i, a in enumerate(srcs) if name in a.modules and a.modules[name].bias_key]
    if not found:
        return None
    coeffs = p.weights if uses_weights else (1.0 - p.t, p.t)
    total = np.zeros(srcs[found[0][0]].modules[name].out_features, np.float64)
    for i, a in found:
        total += float(coeffs[i]) * a.modules[name].scale * a.bias(name).astype(np.float64)
    return total.astype(np.float32)


def _input_record(name: str, a: Adapter, sha256: str) -> dict:
    return {
        "name": name, "path": str(a.path), "layout": a.layout, "weights_file": a.weights_file.name,
        "sha256": sha256, "ranks": sorted(a.ranks), "scales": sorted(a.scales),
        "modules": len(a.modules), "base_model": a.base_model,
    }


def _module_order(name: str):
    """Numbered layers in numeric order, then by name (stable, human-friendly)."""
    import re

    m = re.search(r"layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else 1 << 30, name)
