"""The fused adapter, loaded by mlx-lm on a real (tiny) llama, computes W + the method's fused delta:
sum_i w_i dW_i (linear, concat, linear in core space), the slerp of the deltas, the dense references
of tests/test_methods_frontier.py, or the float64 dense reference of an element-wise method
(tests/test_methods_core.py), in delta space at full rank or in core space (exact)."""

import numpy as np
import pytest

from conftest import make_mlx_adapter, module_shapes
from pipeline.fuse import FusionSpec, fuse
from test_methods_frontier import REFERENCES as FRONTIER


def dense_delta(path, name):
    from pipeline.formats import read_adapter

    A, B, s = read_adapter(path).factors(name)
    return s * B.astype(np.float64) @ A.astype(np.float64)


def slerp_coeffs(d1, d2, t):
    cos = float(np.sum(d1 * d2) / (np.linalg.norm(d1) * np.linalg.norm(d2)))
    th = np.arccos(np.clip(cos, -1, 1))
    if abs(cos) > 1 - 1e-6:
        return 1 - t, t
    return np.sin((1 - t) * th) / np.sin(th), np.sin(t * th) / np.sin(th)


def logits(model, tokens):
    import mlx.core as mx

    return np.array(model(mx.array([tokens])), dtype=np.float64)


CASES = [("linear", "delta"), ("concat", "delta"), ("slerp", "delta"), *((m, "delta") for m in FRONTIER),
         ("linear", "core"), ("ties", "core"), ("dare_ties", "core"), ("magnitude_prune", "core"), ("della", "core"),
         ("breadcrumbs_ties", "core"), ("della", "delta"), ("della_linear", "delta"), ("breadcrumbs", "delta"),
         ("breadcrumbs_ties", "delta")]
ELEMENTWISE = ("ties", "dare_ties", "magnitude_prune", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties")
FULL = 32   # min(out, in) of every module: delta-space masking is re-factored without loss


def sources_of(paths, name):
    from pipeline.formats import read_adapter

    out = []
    for path in paths:
        adapter = read_adapter(path)
        if name in adapter.modules:
            A, B, s = adapter.factors(name)
            out.append((A, B * np.float32(s)))
        else:
            out.append(None)
    return out


@pytest.mark.parametrize("method,space", CASES)
def test_fused_adapter_logits_match_dense_weights(tmp_path, tiny_model, method, space):
    import mlx.core as mx
    from mlx_lm import load

    from pipeline.methods import ModuleParams
    from test_methods_core import ref_core, ref_delta

    a, _ = make_mlx_adapter(tmp_path / "a", rank=4, scale=2.0, seed=1)
    shapes = module_shapes()
    shapes.pop("model.layers.1.mlp.down_proj")
    b, _ = make_mlx_adapter(tmp_path / "b", shapes=shapes, rank=8, scale=1.0, seed=2)
    weights, t = [0.8, 0.5], 0.35
    out = tmp_path / "fused"
    elementwise = method in ELEMENTWISE
    density = 0.5 if elementwise else 1.0
    rank = FULL if elementwise and space == "delta" else None
    fuse([a, b], out, FusionSpec(method=method, weights=weights, t=t, space=space, density=density, rank=rank))

    tokens = [5, 77, 200, 13, 42, 99, 7, 258]
    fused_model, _ = load(str(tiny_model), adapter_path=str(out))
    got = logits(fused_model, tokens)

    ref, _ = load(str(tiny_model))
    params = dict(__import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(ref.parameters()))
    updates = []
    for name in module_shapes():
        d1 = dense_delta(a, name)
        d2 = dense_delta(b, name) if name in shapes else np.zeros_like(d1)
        if elementwise:
            p = ModuleParams(weights=tuple(weights), density=density, space=space)
            reference = ref_core if space == "core" else ref_delta
            delta = reference(method, sources_of([a, b], name), p, name, d1.shape)
        elif method in FRONTIER:   # the dense references of tests/test_methods_frontier.py
            delta = FRONTIER[method]([d1, d2 if name in shapes else None], weights)
        else:
            c1, c2 = (slerp_coeffs(d1, d2, t) if d2.any() else (1 - t, t)) if method == "slerp" else weights
            delta = c1 * d1 + c2 * d2
        w = np.array(params[f"{name}.weight"], dtype=np.float64) + delta
        updates.append((f"{name}.weight", mx.array(w.astype(np.float32))))
    ref.load_weights(updates, strict=False)
    want = logits(ref, tokens)
    base = logits(load(str(tiny_model))[0], tokens)
    assert np.abs(want - base).max() > 1e-3  # the adapters change the model
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
