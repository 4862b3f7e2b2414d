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
from pipeline.formats import read_adapter
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


def check_fusion(case: dict, method: str, tmp_path, weights=WEIGHTS, base=None, exact_logits=True, **spec):
    """Fuse the case's adapters with ``method``; mlx-lm loads the output; its logits equal the base
    model's with the fused delta written in; that delta is the method's result on mlx-lm's deltas
    (exactly for the exact methods, within the recorded re-factoring error for the others)."""
    out = tmp_path / f"fused_{method}"
    record = fuse(case["adapters"], out, FusionSpec(method=method, weights=weights, t=T, density=0.5, **spec),
                  base=base)
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
    if method in EXACT and exact_logits:
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


# --- mixture of experts: mlx-lm's LoRASwitchLinear -------------------------------------------

MOE_KEYS = (["self_attn.q_proj", "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.down_proj"],
            ["mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"])


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return _pair(tmp_path_factory, "qwen3_moe", *MOE_KEYS, num_layers=(2, 2))


@pytest.mark.parametrize("method", list(METHODS))
def test_experts_fuse_one_by_one(moe, method, tmp_path):
    """Every method applies to each expert as to a linear layer: mlx-lm's (E, out, in) delta of the
    output is, expert by expert, the method's result on the sources' experts (a projection one
    adapter lacks counts as zero there)."""
    record, got = check_fusion(moe, method, tmp_path)
    name = "model.layers.0.mlp.switch_mlp.down_proj"
    assert got[f"{name}.weight"].shape == (4, 32, 16)
    assert [f"{name}[{e}]" in record["modules"] for e in range(4)] == [True] * 4
    if method in EXACT:
        assert record["modules"][f"{name}[0]"]["error"] == 0.0


def _rewrite(src, dst, change):
    """A copy of the adapter ``src`` at ``dst`` with its tensors passed through ``change``."""
    import shutil

    from pipeline.safetensors_io import SafetensorsFile, write_file

    shutil.copytree(src, dst)
    f = SafetensorsFile(src / "adapters.safetensors")
    tensors = change({n: f.get(n) for n in f.tensors})
    write_file(dst / "adapters.safetensors", tensors, {"format": "mlx"})
    return dst


def test_expert_count_mismatch_is_refused(moe, tmp_path):
    from pipeline.errors import FusionError
    from pipeline.validate import validate

    a, b = moe["adapters"]
    three = _rewrite(b, tmp_path / "three", lambda t: {n: v[:3] if v.ndim == 3 else v for n, v in t.items()})
    with pytest.raises(FusionError, match=r"module model.layers.0.mlp.switch_mlp.down_proj has 3 experts but 4 in "):
        validate([a, three])
    bad = _rewrite(b, tmp_path / "bad", lambda t: {n: v[:3] if n.endswith("lora_b") and v.ndim == 3 else v
                                                   for n, v in t.items()})
    with pytest.raises(FusionError, match="has 4 experts in lora_a .* but 3 in lora_b"):
        read_adapter(bad)


def test_validate_and_list_show_experts(moe):
    from conftest import run_cli

    r = run_cli("validate", *moe["adapters"])
    assert r.returncode == 0, r.stderr
    assert "a: 4 mixture-of-experts modules (4 experts)" in r.stdout
    assert "b: 4 mixture-of-experts modules (4 experts)" in r.stdout
    r = run_cli("list", moe["root"])
    assert r.returncode == 0 and "experts" in r.stdout, r.stdout


# --- embeddings: mlx-lm's LoRAEmbedding, PEFT's lora_embedding_A/B ------------------------------

EMB_KEYS = {"llama": (["model.embed_tokens", "self_attn.q_proj"], ["self_attn.v_proj"]),   # tied
            "qwen3": (["model.embed_tokens", "mlp.down_proj"], ["model.embed_tokens", "self_attn.q_proj"])}


@pytest.fixture(scope="module", params=list(EMB_KEYS))
def emb(request, tmp_path_factory):
    return _pair(tmp_path_factory, request.param, *EMB_KEYS[request.param])


@pytest.mark.parametrize("method", list(METHODS))
def test_embedding_lora_fuses(emb, method, tmp_path):
    """The embedding's (V, D) delta fuses like a linear layer's (on llama its tied output head moves
    with it); an adapter without an embedding LoRA counts as zero."""
    record, got = check_fusion(emb, method, tmp_path)
    assert "model.embed_tokens.weight" in got and got["model.embed_tokens.weight"].shape == (259, 32)
    assert "model.embed_tokens" in record["output"]["keys"]


def test_embedding_through_peft_layout_is_the_same_fusion(emb, tmp_path):
    """Converted to the PEFT layout (lora_embedding_A (r, V), lora_embedding_B (D, r)) and fused with
    the other adapter as it is, the embedding fuses to the same delta as the mlx-lm originals."""
    from pipeline.writers import convert

    a, b = emb["adapters"]
    peft_a = tmp_path / "peft_a"
    convert(a, peft_a, "peft")
    from pipeline.safetensors_io import read_header

    tensors, _ = read_header(peft_a / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 259)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    assert read_adapter(peft_a).modules["model.embed_tokens"].kind == "embedding"
    fuse([a, b], tmp_path / "m", FusionSpec(weights=WEIGHTS))
    fuse([peft_a, b], tmp_path / "p", FusionSpec(weights=WEIGHTS))
    back = tmp_path / "back"
    convert(peft_a, back, "mlx")
    np.testing.assert_allclose(vm.adapter_logits(emb["base"], back), vm.adapter_logits(emb["base"], a), atol=1e-5)
    np.testing.assert_allclose(vm.adapter_logits(emb["base"], tmp_path / "p"),
                               vm.adapter_logits(emb["base"], tmp_path / "m"), atol=1e-5)


def test_vocabulary_mismatch_is_refused(emb, tmp_path):
    from pipeline.errors import FusionError
    from pipeline.validate import validate

    a, _ = emb["adapters"]
    other = _rewrite(a, tmp_path / "added_tokens",
                     lambda t: {n: np.concatenate([v, v[:3]]) if n == "model.embed_tokens.lora_a" else v
                                for n, v in t.items()})
    with pytest.raises(FusionError, match="embedding model.embed_tokens has a vocabulary of 262 tokens but 259 in"):
        validate([a, other])


# --- DoRA: mlx-lm's fine_tune_type dora, fused from the base model's weights ---------------------

@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    every = [f"self_attn.{k}_proj" for k in "qkvo"] + [f"mlp.{k}_proj" for k in ("gate", "up", "down")]
    return _pair(tmp_path_factory, "qwen3", every + ["model.embed_tokens"], ["self_attn.q_proj", "mlp.down_proj"],
                 ftt=("dora", "lora"))


def test_dora_needs_the_base_model(dora, tmp_path):
    from conftest import run_cli

    a, b = dora["adapters"]
    r = run_cli("fuse", a, b, "--out", tmp_path / "out")
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    assert r.stderr.startswith(f"error: {a}: DoRA adapter (15 modules") and "--base" in r.stderr
    r = run_cli("validate", a, b, "--base", tmp_path / "nowhere")
    assert r.returncode == 2 and r.stderr.strip() == (f"error: {tmp_path / 'nowhere'}: base model directory does "
                                                      f"not exist (needed by {a})")
    r = run_cli("validate", a, b, "--base", dora["base"])
    assert r.returncode == 0 and "a: 1 embedding, DoRA on 15 modules" in r.stdout, r.stderr


@pytest.mark.parametrize("method", list(METHODS))
def test_dora_fuses_exactly_at_full_rank(dora, method, tmp_path):
    """Each DoRA source's delta (linear layers and the embedding, mlx-lm's DoRALinear and
    DoRAEmbedding) is mlx-lm's own DoRA fuse() minus the base; at a rank that holds it the plain
    LoRA written reproduces the method's result on those deltas."""
    record, got = check_fusion(dora, method, tmp_path, rank=64, base=dora["base"])
    assert "model.embed_tokens.weight" in got
    cfg = json.loads((tmp_path / f"fused_{method}" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and record["base_model_path"] == str(dora["base"])
    assert f"dora deltas computed from the base model {dora['base']}" in " ".join(record["notes"])


def test_dora_at_the_default_rank_records_its_error(dora, tmp_path):
    """At the default rank (the sources' largest LoRA rank) the DoRA delta, not low-rank, is cut: the
    recorded error is the measured one."""
    record, got = check_fusion(dora, "linear", tmp_path, base=dora["base"], exact_logits=False)
    assert record["output"]["rank"] == 4
    want = expected_exact("linear", dora["deltas"], WEIGHTS, T)
    name = "model.layers.0.mlp.gate_proj"
    err = np.linalg.norm(got[f"{name}.weight"] - want[f"{name}.weight"]) / np.linalg.norm(want[f"{name}.weight"])
    assert record["modules"][name]["error"] > 1e-3
    assert abs(err - record["modules"][name]["error"]) < 1e-4


def test_dora_on_a_quantized_base(tmp_path_factory, tmp_path):
    """DoRA trained on a quantized base (mlx-lm's QLoRA-style DoRA): the delta is taken from the
    dequantized weight, as mlx-lm's DoRALinear does; the fusion is exact at full rank."""
    root = tmp_path_factory.mktemp("quantized")
    base = vm.quantize(vm.build_model("qwen3", root / "full", seed=0), root / "base")
    assert "quantization" in json.loads((base / "config.json").read_text())
    a = vm.train_adapter(base, root / "a", seed=1, keys=["self_attn.q_proj", "mlp.up_proj"], rank=4,
                         fine_tune_type="dora")
    b = vm.train_adapter(base, root / "b", seed=2, keys=["self_attn.q_proj"], rank=2, fine_tune_type="dora")
    case = {"base": base, "adapters": [a, b], "deltas": [vm.fused_layers_logits(base, p)[1] for p in (a, b)]}
    check_fusion(case, "linear", tmp_path, rank=64, base=base)
