"""The base model's weights, for the adapters whose delta depends on them: DoRA (the magnitude
vector rescales the adapted weight) and PEFT's modules_to_save (a whole trained weight, whose delta
is itself minus the base's).

A source module's exact dense delta (``dense_delta``), as the library that trained it computes it:
- DoRA, mlx-lm's ``DoRALinear`` / ``DoRAEmbedding`` and PEFT's ``use_dora`` alike:
  ``W' = (m / |W + s B A|_row) (W + s B A)``, the norm over each output row (each token's row of an
  embedding), so ``dW = W' - W``;
- modules_to_save: ``dW = T - W``.
The base is loaded with ``mlx_lm.load`` (so every model type mlx-lm loads works, its names are
mlx-lm's), and a quantized layer is dequantized as mlx-lm's own DoRA layer does. The dense delta
is then given to the methods as exact factors (its SVD, every singular value above round-off),
so every method applies unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import FusionError
from pipeline.formats import Adapter

ROUNDOFF = 1e-7  # singular values below this fraction of the largest are float32 round-off


class BaseWeights:
    """The weights of the base model at ``path`` (an mlx-lm model directory), module by module."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FusionError(f"{self.path}: base model directory does not exist")
        from mlx_lm import load

        try:
            self.model, _ = load(str(self.path))
        except (OSError, ValueError, KeyError) as e:
            raise FusionError(f"{self.path}: cannot load the base model ({e})") from None
        self.modules = dict(self.model.named_modules())

    def weight(self, name: str) -> np.ndarray:
        """Module ``name``'s weight (out, in) (an embedding's table (V, D)), dequantized, float32."""
        import mlx.core as mx

        m = self.modules.get(name)
        if m is None or "weight" not in m:
            raise FusionError(f"{self.path}: the base model has no module {name!r} with a weight")
        w = m.weight
        if "scales" in m:  # a quantized layer
            w = mx.dequantize(w, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits,
                              mode=getattr(m, "mode", "affine"))
        return np.array(w.astype(mx.float32))


def dense_delta(adapter: Adapter, name: str, base: BaseWeights) -> np.ndarray:
    """The exact dense delta (out, in) float64 of a module that needs the base (DoRA, module_to_save)."""
    info = adapter.modules[name]
    w = base.weight(name).astype(np.float64)
    if w.shape != (info.out_features, info.in_features):
        raise FusionError(f"{adapter.path}: module {name} is {info.out_features}x{info.in_features} but "
                          f"{w.shape[0]}x{w.shape[1]} in the base model {base.path}: not its base model")
    if info.full_key is not None:
        return adapter.full_weight(name).astype(np.float64) - w
    a, b, s = adapter.factors(name)
    adapted = w + s * (b.astype(np.float64) @ a.astype(np.float64))
    norms = np.linalg.norm(adapted, axis=1)
    m = adapter.magnitude(name).astype(np.float64)
    return (m / np.where(norms == 0, 1.0, norms))[:, None] * adapted - w


def as_factors(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A (k, in), B (out, k))`` float32 with ``B @ A = delta`` up to float32 rounding (its SVD,
    singular values above ``ROUNDOFF`` of the largest)."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    k = max(1, int(np.count_nonzero(s > ROUNDOFF * (s[0] if s.size else 0.0))))
    return np.ascontiguousarray(vt[:k], np.float32), np.ascontiguousarray(u[:, :k] * s[:k], np.float32)
