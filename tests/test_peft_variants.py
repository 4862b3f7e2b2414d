"""PEFT's embedding LoRA and LoRA biases against the real PEFT library: adapters saved by PEFT itself
are read as PEFT merges them, and their fusion loads in ``PeftModel.from_pretrained`` with no
missing or unexpected key, merging to the weighted sum of the sources' own merged deltas (weights
and biases alike).

Optional: needs the ``peft`` extra; without it this module is skipped. No download: the base is a
``LlamaForCausalLM`` from a ``LlamaConfig`` (with biases on every linear layer, which PEFT's
``lora_bias`` needs to merge).
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import run_cli  # noqa: E402
from pipeline.formats import read_adapter  # noqa: E402

WEIGHTS = (0.7, 0.4)
# PEFT's own noise: a renamed transformers method; the embedding-layer save notice; its sharding
# check, which takes every 1-D lora_B.bias it saves itself for an ungathered shard
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")]


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True)
    return transformers.LlamaForCausalLM(config).to(torch.float32).eval()


def state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in model.state_dict().items()}


def merged_deltas(pm) -> dict[str, np.ndarray]:
    """PEFT's own merge (on a copy) minus the base: every weight and bias it changes."""
    base = state(tiny_llama())
    merged = state(copy.deepcopy(pm).merge_and_unload())
    return {k: merged[k] - base[k] for k in base if np.any(merged[k] != base[k])}


def peft_adapter(path, seed: int, **config):
    """A PEFT adapter saved by PEFT, every factor (and LoRA bias) random, so every delta is non-zero."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           task_type="CAUSAL_LM", **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.save_pretrained(path)
    return merged_deltas(pm)


def load_in_peft(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(path)).eval()
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    result = pm.load_adapter(str(path), adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == [], result
    pm.delete_adapter("again")
    pm.set_adapter("default")
    return pm


def cli(*args):
    r = run_cli(*args)
    assert r.returncode == 0, f"fusion {' '.join(map(str, args))}: {r.stdout}\n{r.stderr}"
    return r


def check_fused(path, sources: list[dict]):
    """The PEFT adapter at ``path`` merges to ``sum_i w_i * source_i`` (a key a source lacks: zero)."""
    got = merged_deltas(load_in_peft(path))
    want = {}
    for w, d in zip(WEIGHTS, sources):
        for k, v in d.items():
            want[k] = want.get(k, 0.0) + w * v
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-5 * np.abs(v).max(), err_msg=k)


def test_embedding_lora_saved_by_peft(tmp_path):
    """lora_embedding_A (r, V) and lora_embedding_B (D, r): read as PEFT merges them; two adapters,
    one with an embedding LoRA and one without, fuse and load back in PEFT."""
    d1 = peft_adapter(tmp_path / "a", 1, target_modules=["embed_tokens", "q_proj"])
    d2 = peft_adapter(tmp_path / "b", 2, target_modules=["v_proj"])
    assert "model.embed_tokens.weight" in d1
    a = read_adapter(tmp_path / "a")
    emb = a.modules["model.embed_tokens"]
    assert emb.kind == "embedding" and (emb.out_features, emb.in_features) == (259, 32)
    A, B, s = a.factors("model.embed_tokens")
    np.testing.assert_allclose(s * B.astype(np.float64) @ A, d1["model.embed_tokens.weight"], atol=1e-6)
    cli("fuse", tmp_path / "a", tmp_path / "b", "--weights", "0.7,0.4", "--out", tmp_path / "f")
    cli("convert", tmp_path / "f", "--to", "peft", "--out", tmp_path / "p")
    check_fused(tmp_path / "p", [d1, d2])


def test_lora_bias_saved_by_peft(tmp_path):
    """lora_bias=True: each lora_B.bias moves the layer's bias by scale * bias; the fusion sums the
    bias deltas with the same weights as the weight deltas, written for PEFT (mlx-lm has no LoRA bias)."""
    d1 = peft_adapter(tmp_path / "a", 1, target_modules=["q_proj", "down_proj"], lora_bias=True)
    d2 = peft_adapter(tmp_path / "b", 2, target_modules=["q_proj", "v_proj"], lora_bias=True)
    assert "model.layers.0.self_attn.q_proj.bias" in d1
    r = cli("validate", tmp_path / "a", tmp_path / "b")
    assert "a: 4 LoRA biases" in r.stdout
    r = cli("fuse", tmp_path / "a", tmp_path / "b", "--weights", "0.7,0.4", "--out", tmp_path / "f")
    assert "written in the PEFT layout" in r.stdout
    record = json.loads((tmp_path / "f" / "fusion.json").read_text())
    assert record["output"]["layout"] == "peft"
    check_fused(tmp_path / "f", [d1, d2])
    r = run_cli("convert", tmp_path / "f", "--to", "mlx", "--out", tmp_path / "m")
    assert r.returncode == 2 and "mlx-lm's LoRA layers cannot hold" in r.stderr and not (tmp_path / "m").exists()


def mlx_loadable_base(path):
    """The PEFT tests' base model saved by transformers with the byte tokenizer: ``mlx_lm.load``
    loads it (mlx-lm's llama reads transformers' names), so it can be the fusion's --base."""
    from pipeline.demo.tinymodel import write_byte_tokenizer

    tiny_llama().save_pretrained(path, safe_serialization=True)
    write_byte_tokenizer(path)
    return path


@pytest.mark.parametrize("extra", [{"use_dora": True, "target_modules": ["q_proj", "down_proj"]},
                                   {"modules_to_save": ["lm_head"], "target_modules": ["q_proj"]}],
                         ids=["dora", "modules_to_save"])
def test_adapters_that_need_the_base_saved_by_peft(tmp_path, extra):
    """PEFT DoRA (m (W + s B A) / |W + s B A| per output row) and modules_to_save (a whole trained
    lm_head): with --base, each source's delta is what PEFT merges; the fusion, a plain LoRA at a
    rank that holds the dense deltas, loads in PEFT and merges to their weighted sum."""
    d1 = peft_adapter(tmp_path / "a", 1, **extra)
    d2 = peft_adapter(tmp_path / "b", 2, target_modules=["q_proj", "v_proj"])
    if "modules_to_save" in extra:  # PEFT copies lm_head: give the copy a delta of its own
        from safetensors.numpy import load_file, save_file

        f = tmp_path / "a" / "adapter_model.safetensors"
        tensors = load_file(str(f))
        tensors["base_model.model.lm_head.weight"] += np.random.default_rng(3).normal(
            0, 0.05, tensors["base_model.model.lm_head.weight"].shape).astype(np.float32)
        save_file(tensors, str(f), metadata={"format": "pt"})
        d1 = merged_deltas(peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a")).eval())
        assert "lm_head.weight" in d1
    base = mlx_loadable_base(tmp_path / "base")
    r = run_cli("fuse", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "f")
    assert r.returncode == 2 and "--base" in r.stderr and not (tmp_path / "f").exists()
    cli("fuse", tmp_path / "a", tmp_path / "b", "--weights", "0.7,0.4", "--rank", "64", "--base", base,
        "--out", tmp_path / "f")
    cli("convert", tmp_path / "f", "--to", "peft", "--out", tmp_path / "p")
    check_fused(tmp_path / "p", [d1, d2])
