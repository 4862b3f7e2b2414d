"""Every architecture and adapter variant people train, fused by every method: mlx-lm loads each
output, and its logits are the base model's with the fused delta written into its weights.

The models are tiny random ones built with mlx-lm's own classes (llama with tied embeddings, qwen3,
gemma3, phi3 with its fused qkv_proj, qwen3_moe), the adapters are trained for a few steps with
mlx-lm's own trainer, and each source's dense delta is what mlx-lm's own ``fuse()`` of its LoRA
layers computes, so the conventions checked are mlx-lm's, not this project's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import variant_models as vm
from pipeline.fuse import FusionSpec, fuse
from pipeline.methods import METHODS, ModuleParams
from pipeline.methods.ops import merge_task_vectors, slerp_pair, source_rng

WEIGHTS, T = [0.7, 0.4], 0.35
EXACT = ("linear", "concat", "slerp")
MASKED = {"ties": ("magnitude", True), "magnitude_prune": ("magnitude", False),
          "dare_linear": ("random", False), "dare_ties": ("random", True)}

# Per architecture: what the two adapters adapt (None: every linear layer of every block).
KEYS = {
    "llama": (None, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]),
    "qwen3": (None, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]),
    "gemma3_text": (None, ["self_attn.q_proj", "mlp.gate_proj"]),
    "phi3": (None, ["self_attn.qkv_proj", "mlp.down_proj"]),
}


def _pair(tmp_path_factory, arch, keys_a, keys_b, ftt=("lora", "lora"), num_layers=(2, 1)):
    root = tmp_path_factory.mktemp(arch)
    base = vm.build_model(arch, root / "base", seed=0)
    a = vm.train_adapter(base, root / "a", seed=1, keys=keys_a, rank=4, scale=2.0, fine_tune_type=ftt[0],
                         num_layers=num_layers[0])
    b = vm.train_adapter(base, root / "b", seed=2, keys=keys_b, rank=2, scale=1.5, fine_tune_type=ftt[1],
                         num_layers=num_layers[1])
    deltas = [vm.fused_layers_logits(base, p)[1] for p in (a, b)]
    return {"root": root, "base": base, "adapters": [a, b], "deltas": deltas}


@pytest.fixture(scope="module", params=list(KEYS))
def arch(request, tmp_path_factory):
    return request.param, _pair(tmp_path_factory, request.param, *KEYS[request.param])


def _per_2d(d: np.ndarray, fn):
    """``fn`` on each 2-D matrix of ``d`` (each expert of a 3-D expert weight)."""
    return np.stack([fn(x, e) for e, x in enumerate(d)]) if d.ndim == 3 else fn(d, None)


def expected_exact(method: str, deltas: list[dict], weights, t) -> dict[str, np.ndarray]:
    """The exact methods' fused delta per parameter (a parameter one adapter lacks: zero)."""
    names = sorted(set().union(*deltas))
    out = {}
    for n in names:
        ds = [d.get(n) for d in deltas]
        ds = [np.zeros_like(next(x for x in ds if x is not None)) if x is None else x for x in ds]

        def one(_, e, ds=ds):
            xs = [x if e is None else x[e] for x in ds]
            if method != "slerp":
                return sum(w * x for w, x in zip(weights, xs))
            c1, c2 = slerp_pair(float(np.sum(xs[0] ** 2)), float(np.sum(xs[0] * xs[1])),
                                float(np.sum(xs[1] ** 2)), t)
            return c1 * xs[0] + c2 * xs[1]
        out[n] = _per_2d(ds[0], one)
    return out


def expected_masked(method: str, deltas: list[dict], weights, module_of) -> dict[str, np.ndarray]:
    """The masking methods' dense result per parameter, from the reference operations on mlx-lm's
    own deltas (the DARE streams keyed as the tool keys them: module name, expert index)."""
    sparsify, elect = MASKED[method]
    p = ModuleParams(weights=tuple(weights), density=0.5)
    out = {}
    for n in sorted(set().union(*deltas)):
        present = [i for i, d in enumerate(deltas) if n in d]

        def one(_, e, n=n, present=present):
            name = module_of(n) + ("" if e is None else f"[{e}]")
            xs = [(deltas[i][n] if e is None else deltas[i][n][e]).astype(np.float32) for i in present]
            rngs = [source_rng(p.seed, name, i) for i in present] if sparsify == "random" else None
            return merge_task_vectors(xs, [weights[i] for i in present], sparsify=sparsify, density=p.density,
                                      elect="total" if elect else None, rngs=rngs).astype(np.float64)
        out[n] = _per_2d(deltas[present[0]][n], one)
    return out


def check_fusion(case: dict, method: str, tmp_path, weights=WEIGHTS, **spec):
    """Fuse the case's adapters with ``method``; mlx-lm loads the output; its logits equal the base
    model's with the fused delta written in; that delta is the method's result on mlx-lm's deltas
    (exactly for the exact methods, within the recorded re-factoring error for the others)."""
    out = tmp_path / f"fused_{method}"
    record = fuse(case["adapters"], out, FusionSpec(method=method, weights=weights, t=T, density=0.5, **spec))
    got_logits, got = vm.fused_layers_logits(case["base"], out)
    loaded = vm.adapter_logits(case["base"], out)
    np.testing.assert_allclose(loaded, got_logits, atol=2e-4, rtol=1e-4)   # mlx-lm loads what it fuses
    np.testing.assert_allclose(loaded, vm.reference_logits(case["base"], got), atol=2e-4, rtol=1e-4)
    if method in EXACT:
        want = expected_exact(method, case["deltas"], weights, T)
    elif method in MASKED:
        want = expected_masked(method, case["deltas"], weights, lambda n: n.rsplit(".", 1)[0])
    else:
        return record, got
    assert sorted(k for k in got if np.abs(got[k]).max() > 0) == sorted(k for k in want if np.abs(want[k]).max() > 0)
    for k, w in want.items():
        g = got.get(k, np.zeros_like(w))
        err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
        mod = k.rsplit(".", 1)[0]
        recorded = max((m["error"] for n, m in record["modules"].items() if n == mod or n.startswith(mod + "[")),
                       default=0.0)
        assert err <= recorded * 1.05 + 2e-5, (k, err, recorded)
    if method in EXACT:
        base_logits = vm.adapter_logits(case["base"], None)
        assert np.abs(loaded - base_logits).max() > 1e-3  # the adapters change the model
        np.testing.assert_allclose(loaded, vm.reference_logits(case["base"], want), atol=3e-4, rtol=1e-4)
    return record, got


@pytest.mark.parametrize("method", list(METHODS))
def test_plain_lora_on_each_architecture(arch, method, tmp_path):
    name, case = arch
    record, _ = check_fusion(case, method, tmp_path)
    if name == "phi3":
        assert "self_attn.qkv_proj" in record["output"]["keys"]
    if name == "llama":  # tied embeddings: the base has no lm_head of its own, and neither does the fusion
        from mlx_lm import load

        model, _ = load(str(case["base"]), adapter_path=str(tmp_path / f"fused_{method}"))
        assert model.args.tie_word_embeddings and "lm_head" not in dict(model.named_modules())
    assert json.loads((tmp_path / f"fused_{method}" / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
