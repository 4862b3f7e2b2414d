"""Fusing real adapter files: what mlx-lm loads computes the fused delta; outputs are reproducible."""

import json

import numpy as np
import pytest

from conftest import make_mlx_adapter, make_peft_adapter, module_shapes, tree_bytes
from pipeline.errors import FusionError
from pipeline.formats import read_adapter
from pipeline.fuse import FusionSpec, fuse, module_params


def deltas(path):
    a = read_adapter(path)
    out = {}
    for name in a.modules:
        A, B, s = a.factors(name)
        out[name] = s * B.astype(np.float64) @ A.astype(np.float64)
    return out


@pytest.fixture
def pair(tmp_path):
    a, _ = make_mlx_adapter(tmp_path / "a", rank=4, scale=2.0, seed=1)
    # different rank, scale, and one module fewer: all fine in delta space
    shapes = module_shapes()
    shapes.pop("model.layers.0.self_attn.v_proj")
    b, _ = make_mlx_adapter(tmp_path / "b", shapes=shapes, rank=6, scale=0.5, seed=2)
    return a, b


@pytest.mark.parametrize("method,kw", [
    ("linear", {}), ("concat", {}), ("slerp", {"t": 0.3}),
    ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.7}), ("dare_ties", {"density": 0.7}),
    ("magnitude_prune", {"density": 0.5}),
])
def test_every_method_writes_a_complete_adapter(tmp_path, pair, method, kw):
    out = tmp_path / "out"
    rec = fuse(list(pair), out, FusionSpec(method=method, weights=[0.6, 0.4], **kw))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors", "fusion.json"]
    fused = read_adapter(out)
    assert set(fused.modules) == set(module_shapes())
    assert fused.scales == {1.0} and len(fused.ranks) == 1
    info = json.loads((out / "fusion.json").read_text())
    assert info == json.loads(json.dumps(rec))
    assert [i["name"] for i in info["inputs"]] == ["a", "b"]
    assert len(info["inputs"][0]["sha256"]) == 64 and info["output"]["sha256"]
    assert set(info["modules"]) == set(module_shapes())
    assert "time" not in json.dumps(info).lower()


def test_linear_is_exact_with_mixed_ranks_and_missing_modules(tmp_path, pair):
    out = tmp_path / "out"
    fuse(list(pair), out, FusionSpec(method="linear", weights=[0.7, -0.3]))
    da, db, df = deltas(pair[0]), deltas(pair[1]), deltas(out)
    for name in df:
        want = 0.7 * da[name] - 0.3 * db.get(name, 0)
        np.testing.assert_allclose(df[name], want, atol=1e-6 * np.abs(want).max())
    # exact rank: at most the sum of ranks
    assert max(read_adapter(out).ranks) <= 10


def test_concat_rank_is_sum_of_ranks(tmp_path, pair):
    out = tmp_path / "out"
    rec = fuse(list(pair), out, FusionSpec(method="concat", weights=[1, 1]))
    assert rec["output"]["rank"] == 10 and rec["output"]["max_error"] == 0.0


def test_same_seed_same_bytes_other_seed_differs(tmp_path, pair):
    spec = FusionSpec(method="dare_ties", weights=[1, 1], density=0.5, seed=3)
    fuse(list(pair), tmp_path / "x", spec)
    fuse(list(pair), tmp_path / "y", spec)
    fuse(list(pair), tmp_path / "z", FusionSpec(method="dare_ties", weights=[1, 1], density=0.5, seed=4))
    x, y, z = (tree_bytes(tmp_path / n) for n in "xyz")
    assert x == y
    assert x["adapters.safetensors"] != z["adapters.safetensors"]


def test_inputs_untouched(tmp_path, pair):
    before = [tree_bytes(p) for p in pair]
    fuse(list(pair), tmp_path / "out", FusionSpec(method="ties", weights=[1, 1], density=0.5))
    assert [tree_bytes(p) for p in pair] == before


def test_peft_and_mlx_inputs_fuse_together(tmp_path):
    a, _ = make_mlx_adapter(tmp_path / "a", rank=4, scale=2.0, seed=1, model="tiny/base")
    b, _ = make_peft_adapter(tmp_path / "b", rank=8, alpha=16, seed=2, base="tiny/base")
    fuse([a, b], tmp_path / "out", FusionSpec(weights=[0.5, 0.5]))
    da, db, df = deltas(a), deltas(b), deltas(tmp_path / "out")
    for name in df:
        np.testing.assert_allclose(df[name], 0.5 * da[name] + 0.5 * db[name], atol=1e-6)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["model"] == "tiny/base"


def test_layer_schedule_and_rules(tmp_path, pair):
    spec = FusionSpec(method="linear", weights=[[1.0, 0.0], [0.0, 1.0]],
                      rules=[{"match": "mlp", "weights": [0.5, 0.5]}])
    p0 = module_params(spec, "model.layers.0.self_attn.q_proj", 0, 2, 2)
    p1 = module_params(spec, "model.layers.1.self_attn.q_proj", 1, 2, 2)
    pm = module_params(spec, "model.layers.1.mlp.down_proj", 1, 2, 2)
    assert p0.weights == (1.0, 0.0) and p1.weights == (0.0, 1.0) and pm.weights == (0.5, 0.5)
    out = tmp_path / "out"
    fuse(list(pair), out, spec)
    da, db, df = deltas(pair[0]), deltas(pair[1]), deltas(out)
    np.testing.assert_allclose(df["model.layers.0.self_attn.q_proj"], da["model.layers.0.self_attn.q_proj"], atol=1e-6)
    np.testing.assert_allclose(df["model.layers.1.self_attn.q_proj"], db["model.layers.1.self_attn.q_proj"], atol=1e-6)
    np.testing.assert_allclose(df["model.layers.1.mlp.down_proj"],
                               0.5 * da["model.layers.1.mlp.down_proj"] + 0.5 * db["model.layers.1.mlp.down_proj"], atol=1e-6)


def test_density_schedule_interpolates(tmp_path):
    spec = FusionSpec(method="ties", weights=[1, 1], density=[0.2, 0.6, 1.0])
    assert module_params(spec, "model.layers.2.x", 2, 5, 2).density == pytest.approx(0.6)
    assert module_params(spec, "model.layers.1.x", 1, 5, 2).density == pytest.approx(0.4)


@pytest.mark.parametrize("spec,msg", [
    (FusionSpec(method="mean"), "unknown method 'mean'"),
    (FusionSpec(weights=[1.0]), "1 weights for 2 adapters"),
    (FusionSpec(method="ties", density=1.5, weights=[1, 1]), "density"),
    (FusionSpec(method="ties", density=0.0, weights=[1, 1]), "density"),
    (FusionSpec(method="slerp", t=2.0), "t"),
    (FusionSpec(rules=[{"match": "mlp", "scale": 2}]), "rules may set"),
])
def test_bad_specs_fail_before_writing(tmp_path, pair, spec, msg):
    with pytest.raises(FusionError, match=msg):
        fuse(list(pair), tmp_path / "out", spec)
    assert not (tmp_path / "out").exists()


def test_factor_space_needs_equal_ranks(tmp_path, pair):
    with pytest.raises(FusionError, match="equal ranks"):
        fuse(list(pair), tmp_path / "out", FusionSpec(space="factors"))


def test_refuses_dora_and_full(tmp_path):
    a, _ = make_mlx_adapter(tmp_path / "a")
    d, _ = make_mlx_adapter(tmp_path / "d", fine_tune_type="dora")
    f, _ = make_mlx_adapter(tmp_path / "f", fine_tune_type="full")
    with pytest.raises(FusionError, match="DoRA"):
        fuse([a, d], tmp_path / "out")
    with pytest.raises(FusionError, match="'full' fine-tune"):
        fuse([a, f], tmp_path / "out")


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_worker_threads_do_not_change_a_byte(tmp_path, pair, monkeypatch, method):
    spec = FusionSpec(method=method, weights=[1, 1], density=0.5, seed=1)
    outs = []
    for threads in ("1", "3"):
        monkeypatch.setenv("FUSION_THREADS", threads)
        fuse(list(pair), tmp_path / threads, spec)
        outs.append(tree_bytes(tmp_path / threads))
    assert outs[0] == outs[1]


def test_blas_threads_restores_the_count(monkeypatch):
    from pipeline import threads

    libs = threads._openblas_libs()
    before = [get() for _, get in libs]
    with threads.blas_threads(1):
        assert all(get() == 1 for _, get in libs)
    assert [get() for _, get in libs] == before
    monkeypatch.setenv("FUSION_THREADS", "0")
    assert threads.worker_count() == 1
    monkeypatch.setenv("FUSION_THREADS", "x")
    with pytest.raises(FusionError, match="FUSION_THREADS"):
        threads.worker_count()


def test_versions_match_installed_metadata():
    import sys
    from importlib import metadata

    fz = sys.modules["pipeline.fuse"]
    want = {}
    for pkg in fz.VERSIONED:
        try:
            want[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    assert fz._versions() == want
