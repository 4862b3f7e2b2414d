"""Reading and writing adapters: mlx-lm and PEFT layouts, bf16, conversion, broken files."""

import hashlib
import json

import numpy as np
import pytest

from conftest import make_mlx_adapter, make_peft_adapter, module_shapes, tree_bytes
from pipeline.errors import FusionError
from pipeline.formats import read_adapter
from pipeline.writers import convert
from pipeline.safetensors_io import SafetensorsFile, to_bf16_bits, write_file


def test_mlx_adapter_reads_as_scaled_factors(tmp_path):
    path, factors = make_mlx_adapter(tmp_path / "a", rank=4, scale=2.0)
    a = read_adapter(path)
    assert a.layout == "mlx" and a.ranks == {4} and a.scales == {2.0} and a.layers == {0, 1}
    assert a.keys == {"self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"}
    name = "model.layers.1.mlp.down_proj"
    A, B, s = a.factors(name)
    assert A.shape == (4, 64) and B.shape == (32, 4)
    np.testing.assert_array_equal(A, factors[name][0])
    np.testing.assert_array_equal(B, factors[name][1])
    assert a.modules[name].layer == 1 and a.modules[name].key == "mlp.down_proj"


def test_best_adapters_file_is_found(tmp_path):
    path, _ = make_mlx_adapter(tmp_path / "a", weights_name="best_adapters.safetensors")
    assert read_adapter(path).weights_file.name == "best_adapters.safetensors"


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_scale_and_names(tmp_path, rslora):
    path, factors = make_peft_adapter(tmp_path / "p", rank=4, alpha=8, rslora=rslora)
    a = read_adapter(path)
    assert a.layout == "peft" and a.base_model == "tiny/base"
    assert a.scales == {8 / 2.0 if rslora else 8 / 4}
    name = "model.layers.0.self_attn.q_proj"
    A, B, _ = a.factors(name)
    np.testing.assert_array_equal(A, factors[name][0])
    np.testing.assert_array_equal(B, factors[name][1])


def test_bf16_round_trip_is_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000).astype(np.float32)
    bits = to_bf16_bits(x)
    widened = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.max(np.abs(widened - x) / np.abs(x)) < 2 ** -8  # bf16 has 8 bits of mantissa
    np.testing.assert_array_equal(to_bf16_bits(widened), bits)  # exact once in bf16


def test_safetensors_readable_by_the_reference_library(tmp_path):
    from safetensors.numpy import load_file

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_file(tmp_path / "t.safetensors", {"b": x, "a": x.T.copy()}, {"format": "mlx"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    np.testing.assert_array_equal(loaded["b"], x)
    np.testing.assert_array_equal(loaded["a"], x.T)


@pytest.mark.parametrize("dtype", [None, "BF16"])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_to_mlx_to_peft_is_exact(tmp_path, dtype, rslora):
    src, _ = make_peft_adapter(tmp_path / "peft", rank=4, alpha=16, rslora=rslora, dtype=dtype)
    mlx = convert(src, tmp_path / "mlx", "mlx")
    assert mlx.layout == "mlx"
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["scale"] == pytest.approx(16 / 2 if rslora else 16 / 4)
    back = convert(tmp_path / "mlx", tmp_path / "back", "peft")
    assert back.layout == "peft"
    assert tree_bytes(tmp_path / "back")["adapter_model.safetensors"] == (src / "adapter_model.safetensors").read_bytes()
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text()) == json.loads(
        (src / "adapter_config.json").read_text())


def test_mlx_to_peft_keeps_the_delta(tmp_path):
    src, factors = make_mlx_adapter(tmp_path / "m", rank=4, scale=3.0)
    convert(src, tmp_path / "p", "peft")
    p = read_adapter(tmp_path / "p")
    for name, (a, b) in factors.items():
        A, B, s = p.factors(name)
        np.testing.assert_allclose(s * B @ A, 3.0 * b @ a, rtol=1e-6, atol=1e-7)


def test_peft_config_targets_exactly_the_modules_present(tmp_path):
    """Every target in every layer: suffixes and layers. Otherwise: the module names themselves,
    so that PEFT puts no LoRA layer on a module the file has no weights for."""
    full, _ = make_mlx_adapter(tmp_path / "full", num_layers=2)
    cfg = convert(full, tmp_path / "full_p", "peft").config
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert cfg["layers_to_transform"] == [0, 1]
    shapes = {k: v for k, v in module_shapes().items() if "mlp" not in k or ".layers.1." in k}
    partial, _ = make_mlx_adapter(tmp_path / "partial", shapes=shapes)
    cfg = convert(partial, tmp_path / "partial_p", "peft").config
    assert cfg["target_modules"] == sorted(shapes) and cfg["layers_to_transform"] is None


def test_mlx_converted_from_peft_loads_in_mlx_lm(tmp_path, tiny_model):
    import mlx.core as mx
    from mlx_lm import load

    src, factors = make_peft_adapter(tmp_path / "p", rank=4, alpha=8)
    convert(src, tmp_path / "m", "mlx")
    model, _ = load(str(tiny_model), adapter_path=str(tmp_path / "m"))
    layer = model.model.layers[1].self_attn.q_proj
    a, b = factors["model.layers.1.self_attn.q_proj"]
    np.testing.assert_allclose(np.array(layer.lora_a), a.T)
    assert float(layer.scale) == 2.0
    del mx


def test_truncated_file_is_named(tmp_path):
    path, _ = make_mlx_adapter(tmp_path / "a")
    f = path / "adapters.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(FusionError, match=r"adapters.safetensors: truncated"):
        read_adapter(path)


def test_garbage_header_is_named(tmp_path):
    path, _ = make_mlx_adapter(tmp_path / "a")
    (path / "adapters.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(FusionError, match="corrupted safetensors header"):
        read_adapter(path)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FusionError, match="does not exist"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FusionError, match="no adapter weights found"):
        read_adapter(tmp_path / "empty")
    path, _ = make_mlx_adapter(tmp_path / "a")
    (path / "adapter_config.json").unlink()
    with pytest.raises(FusionError, match="adapter_config.json: missing"):
        read_adapter(path)


def test_nan_detection_streams_tensors(tmp_path):
    path, _ = make_mlx_adapter(tmp_path / "a", dtype="BF16")
    assert read_adapter(path).check_finite() == []
    f = SafetensorsFile(path / "adapters.safetensors")
    tensors = {n: f.get(n) for n in f.tensors}
    tensors["model.layers.0.self_attn.q_proj.lora_b"][0, 0] = np.inf
    write_file(path / "adapters.safetensors", tensors, None, {n: "BF16" for n in tensors})
    assert read_adapter(path).check_finite() == ["model.layers.0.self_attn.q_proj.lora_b"]


def test_shapes_helper_matches_tiny_model():
    assert module_shapes()["model.layers.0.mlp.down_proj"] == (64, 32)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("where", ["none", "first", "last", "middle", "neg_inf"])
def test_nonfinite_scan_reads_in_chunks(tmp_path, dtype, where):
    """The sequential scan finds NaN/Inf wherever it is, across chunk boundaries (a 64-byte chunk
    cuts every tensor into pieces), for every float dtype, and leaves integer tensors alone."""
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.normal(size=(7, 13)).astype(np.float32) for i in range(4)}
    tensors["ints"] = np.arange(10, dtype=np.int32)
    bad = {"first": ("t0", (0, 0), np.nan), "last": ("t3", (6, 12), np.inf),
           "middle": ("t2", (3, 5), np.nan), "neg_inf": ("t1", (6, 0), -np.inf)}.get(where)
    if bad:
        tensors[bad[0]][bad[1]] = bad[2]
    np_dtype = {"F32": None, "F16": "F16", "BF16": "BF16", "F64": "F64"}[dtype]
    dtypes = {n: np_dtype for n in tensors if n != "ints"} if np_dtype else None
    write_file(tmp_path / "x.safetensors", tensors, None, dtypes)
    f = SafetensorsFile(tmp_path / "x.safetensors")
    want = [bad[0]] if bad else []
    for chunk in (64, 96, 1 << 22):
        assert f.nonfinite(chunk) == want
        h = hashlib.sha256()  # the same pass, reading every byte, gives the file's digest
        assert f.nonfinite(chunk, hasher=h) == want
        assert h.hexdigest() == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    assert [n for n in sorted(f.tensors) if not f.check_finite(n)] == want


def test_validation_digests_the_inputs_in_its_read(tmp_path):
    """``validate(digest=True)`` gives each adapter the sha256 of its weights file, the figure a
    fusion records, without a second read; NaN in one input is still named."""
    from pipeline.validate import validate

    a, _ = make_mlx_adapter(tmp_path / "a", seed=1)
    b, _ = make_mlx_adapter(tmp_path / "b", seed=2)
    got = validate([a, b], digest=True).adapters
    assert [x.sha256 for x in got] == [hashlib.sha256((p / "adapters.safetensors").read_bytes()).hexdigest()
                                       for p in (a, b)]
    assert all(x.sha256 is None for x in validate([a, b]).adapters)
    f = SafetensorsFile(b / "adapters.safetensors")
    tensors = {n: f.get(n) for n in f.tensors}
    tensors["model.layers.0.mlp.down_proj.lora_a"][2, 1] = np.nan
    write_file(b / "adapters.safetensors", tensors)
    with pytest.raises(FusionError, match="down_proj.lora_a. holds NaN"):
        validate([a, b], digest=True)


def test_writer_streams_views_and_returns_the_hash(tmp_path):
    import hashlib

    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 9)).astype(np.float32)
    y = rng.normal(size=(3, 4)).astype(np.float32)
    d1 = write_file(tmp_path / "views.safetensors", {"x": x.T, "y": y[:, ::2], "e": np.zeros((0, 3), np.float32)},
                    {"format": "mlx"}, {"y": "BF16"})
    d2 = write_file(tmp_path / "copies.safetensors", {"x": x.T.copy(), "y": y[:, ::2].copy(),
                                                      "e": np.zeros((0, 3), np.float32)}, {"format": "mlx"}, {"y": "BF16"})
    raw = (tmp_path / "views.safetensors").read_bytes()
    assert raw == (tmp_path / "copies.safetensors").read_bytes()
    assert d1 == d2 == hashlib.sha256(raw).hexdigest()
    f = SafetensorsFile(tmp_path / "views.safetensors")
    np.testing.assert_array_equal(f.get("x"), x.T)
    assert f.get("e").shape == (0, 3)
