"""The PEFT layout against the real PEFT library, both ways, on a tiny Llama built here.

Optional: needs the ``peft`` extra (``pip install -e '.[peft]'``, the CPU build of torch);
without it this module is skipped. No weights are downloaded: the base model is a
``LlamaForCausalLM`` made from a ``LlamaConfig`` with a fixed seed.

PEFT -> ours: an adapter made and saved by ``peft`` itself is read by :func:`read_adapter` (and
converted to mlx-lm by the real ``fusion convert``); every module's ``s * B @ A`` must equal PEFT's
merged weight minus the base weight. Ours -> PEFT: ``fusion convert --to peft`` output (of an
mlx-lm adapter, and of a ``fusion fuse`` result) must load in ``PeftModel.from_pretrained`` with no
missing or unexpected keys, merge to the same deltas, and give the logits of the base model with
those deltas added by hand.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import make_mlx_adapter, run_cli  # noqa: E402
from pipeline.formats import read_adapter  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
KEYS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
PREFIX = "base_model.model."
# PEFT calls a transformers method that transformers has renamed (noise, not about adapters)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def tiny_llama(seed: int = 0):
    """A float32 Llama: hidden 64, 2 layers, 4 heads (2 key/value heads, so v_proj is 64 -> 32)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(torch.float32).eval()


def base_weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def shapes_of(model, keys=KEYS) -> dict[str, tuple[int, int]]:
    """``{module: (in, out)}`` of the model's linear layers named by ``keys`` (conftest's format)."""
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(tuple("." + k for k in keys))}


def our_delta(adapter, module: str) -> np.ndarray:
    a, b, s = adapter.factors(module)
    return s * (b.astype(np.float64) @ a.astype(np.float64))


def merged_deltas(peft_model, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT's own merge (on a copy): merged weight minus base weight, for each changed module."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    out = {}
    for key, w in merged.state_dict().items():
        d = w.detach().cpu().numpy().astype(np.float64) - base[key]
        if key.endswith(".weight") and np.any(d != 0):
            out[key[: -len(".weight")]] = d
    return out


def lora_modules(peft_model) -> set[str]:
    """Names (as in the base model) of the modules PEFT put a LoRA layer on."""
    from peft.tuners.lora import LoraLayer

    return {n[len(PREFIX):] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def assert_close(got: np.ndarray, want: np.ndarray, what: str, rtol: float = 1e-5):
    scale = float(np.abs(want).max())
    assert scale > 0, f"{what}: reference delta is zero"
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=what)


def cli(*args):
    r = run_cli(*args)
    assert r.returncode == 0, f"fusion {' '.join(map(str, args))}: {r.stdout}\n{r.stderr}"
    return r


def load_in_peft(path):
    """``PeftModel.from_pretrained`` on a fresh base; fail on any missing or unexpected key."""
    model = tiny_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, str(path)).eval()
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    # from_pretrained warns on missing keys only; load the same files again to see both lists
    result = pm.load_adapter(str(path), adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == [], result
    pm.delete_adapter("again")
    pm.set_adapter("default")
    return pm


def check_loads_as(path, want: dict[str, np.ndarray]):
    """The PEFT adapter at ``path`` loads cleanly and changes exactly ``want`` (module -> dW)."""
    base = base_weights(tiny_llama())
    pm = load_in_peft(path)
    assert lora_modules(pm) == set(want)
    got = merged_deltas(pm, base)
    assert set(got) == set(want)
    for name, d in want.items():
        assert_close(got[name], d, name)

    # the logits of PEFT's (unmerged) forward equal those of the base with dW added by hand
    ref = tiny_llama()
    with torch.no_grad():
        for name, d in want.items():
            ref.get_submodule(name).weight += torch.from_numpy(d.astype(np.float32))
        ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(1))
        got_logits = pm(input_ids=ids).logits.numpy()
        want_logits = ref(input_ids=ids).logits.numpy()
        base_logits = tiny_llama()(input_ids=ids).logits.numpy()
    assert np.abs(want_logits - base_logits).max() > 1e-3  # the adapter does change the output
    np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=1e-4)


# --- PEFT -> ours ---------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"use_rslora": True},
                                   {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 16}}],
                         ids=["lora", "rslora", "patterns"])
def test_adapter_saved_by_peft_reads_as_peft_merges_it(tmp_path, extra):
    model = tiny_llama()
    base = base_weights(model)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                             task_type="CAUSAL_LM", **extra)
    pm = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # PEFT starts B at zero: give every module a non-zero delta
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    want = merged_deltas(pm, base)
    assert len(want) == 2 * len(TARGETS)

    ours = read_adapter(tmp_path / "peft")
    assert ours.layout == "peft" and set(ours.modules) == set(want)
    for name, d in want.items():
        assert_close(our_delta(ours, name), d, name)
        # PEFT's own per-layer delta agrees too
        layer = pm.get_submodule(PREFIX + name)
        assert_close(our_delta(ours, name), layer.get_delta_weight("default").detach().numpy(), name)

    cli("convert", tmp_path / "peft", "--to", "mlx", "--out", tmp_path / "mlx")
    mlx = read_adapter(tmp_path / "mlx")
    assert mlx.layout == "mlx" and set(mlx.modules) == set(want)
    for name, d in want.items():
        assert_close(our_delta(mlx, name), d, name)

    # and back to PEFT: the same adapter again, as PEFT loads it
    cli("convert", tmp_path / "mlx", "--to", "peft", "--out", tmp_path / "back")
    check_loads_as(tmp_path / "back", want)


# --- ours -> PEFT ---------------------------------------------------------------------------

def test_mlx_adapter_converted_to_peft_loads_in_peft(tmp_path):
    shapes = shapes_of(tiny_llama())
    src, _ = make_mlx_adapter(tmp_path / "mlx", shapes=shapes, rank=4, scale=3.0, seed=5)
    cli("convert", src, "--to", "peft", "--out", tmp_path / "peft")
    ours = read_adapter(src)
    check_loads_as(tmp_path / "peft", {n: our_delta(ours, n) for n in ours.modules})


def test_fused_adapter_converted_to_peft_loads_in_peft(tmp_path):
    shapes = shapes_of(tiny_llama())
    a, _ = make_mlx_adapter(tmp_path / "a", shapes=shapes, rank=4, scale=2.0, seed=1)
    b, _ = make_mlx_adapter(tmp_path / "b", shapes=shapes, rank=2, scale=0.5, seed=2)
    cli("fuse", a, b, "--method", "linear", "--weights", "0.7,0.3", "--out", tmp_path / "f")
    cli("convert", tmp_path / "f", "--to", "peft", "--out", tmp_path / "p")
    A, B = read_adapter(a), read_adapter(b)
    want = {n: 0.7 * our_delta(A, n) + 0.3 * our_delta(B, n) for n in A.modules}
    check_loads_as(tmp_path / "p", want)


def test_fused_adapter_with_different_module_sets_loads_in_peft(tmp_path):
    """A fusion of adapters over different modules and layers: PEFT must target exactly those."""
    model = tiny_llama()
    a, _ = make_mlx_adapter(tmp_path / "a", shapes=shapes_of(model, KEYS[:2]), rank=4, scale=2.0, seed=1)
    down = {k: v for k, v in shapes_of(model, KEYS[2:]).items() if ".layers.1." in k}
    b, _ = make_mlx_adapter(tmp_path / "b", shapes=down, rank=2, scale=0.5, seed=2)
    cli("fuse", a, b, "--method", "linear", "--weights", "0.7,0.3", "--out", tmp_path / "f")
    cli("convert", tmp_path / "f", "--to", "peft", "--out", tmp_path / "p")
    A, B = read_adapter(a), read_adapter(b)
    want = {n: 0.7 * our_delta(A, n) for n in A.modules}
    want.update({n: 0.3 * our_delta(B, n) for n in B.modules})
    check_loads_as(tmp_path / "p", want)


# --- what PEFT saves that no output of ours would carry ---------------------------------------

@pytest.mark.parametrize("extra,reason,tensor", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save tensors", ""),
    ({"use_dora": True}, "DoRA adapter", ""),
], ids=["modules_to_save", "dora"])
def test_peft_extras_are_refused_not_dropped(tmp_path, extra, reason, tensor):
    """Adapters saved by PEFT itself with modules_to_save or DoRA, without the base model: convert and
    fuse refuse them with the reason instead of writing an output without those tensors. (With
    --base they fuse, as do embedding LoRA and LoRA biases: tests/test_peft_variants.py.)"""
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "lora_dropout": 0.0,
                                "task_type": "CAUSAL_LM", **extra})
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "peft")
    other, _ = make_mlx_adapter(tmp_path / "other", shapes=shapes_of(tiny_llama()))
    for cmd in (["convert", tmp_path / "peft", "--to", "mlx", "--out", tmp_path / "out"],
                ["fuse", other, tmp_path / "peft", "--out", tmp_path / "out"]):
        r = run_cli(*cmd)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
        assert reason in r.stderr and tensor in r.stderr and not (tmp_path / "out").exists()
