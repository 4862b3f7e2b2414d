"""Data-free quality signals from factors, against dense computations and on real adapter files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import geometry, signals
from pipeline.fuse import FusionSpec, fuse
from conftest import make_mlx_adapter

SHAPE = (24, 40)


def make_source(rank, seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.3, (rank, shape[1])), rng.normal(0, 0.3, (shape[0], rank)))


def dense(s):
    return s[1] @ s[0]


def dense_svd(d):
    u, s, vt = np.linalg.svd(d)
    k = int(np.sum(s > 1e-9 * s[0]))
    return u[:, :k], s[:k], vt[:k].T


def test_overlap_is_the_mean_squared_cosine_of_the_principal_angles():
    s1, s2 = make_source(3, 1), make_source(5, 2)
    u1, _, v1 = dense_svd(dense(s1))
    u2, _, v2 = dense_svd(dense(s2))
    got = signals.module_signals([s1, s2])
    cos = np.linalg.svd(u1.T @ u2, compute_uv=False)
    assert got["column_overlap"][0][1] == pytest.approx(np.mean(cos ** 2), rel=1e-9)
    cos = np.linalg.svd(v1.T @ v2, compute_uv=False)
    assert got["row_overlap"][0][1] == pytest.approx(np.mean(cos ** 2), rel=1e-9)
    assert got["column_overlap"][0][0] == pytest.approx(1.0)
    # a subspace inside another overlaps fully; orthogonal ones not at all
    a, b = s2
    inside = (a[:2], b[:, :2] @ np.array([[1.0, 2.0], [0.5, -1.0]]))
    assert signals.module_signals([inside, s2])["column_overlap"][0][1] == pytest.approx(1.0)
    e = np.eye(SHAPE[0])
    orth = [(np.ones((2, SHAPE[1])), e[:, :2]), (np.ones((2, SHAPE[1])), e[:, 2:4])]
    assert signals.module_signals(orth)["column_overlap"][0][1] == pytest.approx(0.0, abs=1e-12)


def test_interference_matches_the_dense_definition():
    srcs = [make_source(3, 1), make_source(4, 2), None, make_source(2, 3)]
    svds = [dense_svd(dense(s)) for s in srcs if s is not None]
    u = np.concatenate([x[0] for x in svds], 1)
    s = np.concatenate([x[1] for x in svds])
    v = np.concatenate([x[2] for x in svds], 1)
    i = np.eye(s.size)
    want = np.abs((u.T @ u - i) @ np.diag(s) @ (v.T @ v - i)).sum() / s.sum()
    assert signals.module_signals(srcs)["interference"] == pytest.approx(want, rel=1e-8)
    # sources in mutually orthogonal row and column spaces do not interfere
    e_out, e_in = np.eye(SHAPE[0]), np.eye(SHAPE[1])
    orth = [(e_in[:2], e_out[:, :2] * 3.0), (e_in[2:5] * 2.0, e_out[:, 2:5])]
    assert signals.module_signals(orth)["interference"] == pytest.approx(0.0, abs=1e-12)
    assert signals.module_signals([srcs[0]])["interference"] is None


def test_kept_and_alignment_match_dense_projections():
    s1, s2 = make_source(3, 1), make_source(4, 2)
    fused = (np.concatenate([s1[0], s2[0]]), np.concatenate([0.7 * s1[1], 0.3 * s2[1]], 1))
    got = signals.module_signals([s1, s2, None], fused, 0.1)
    df = dense(fused)
    u, s, _ = np.linalg.svd(df)
    energy = np.cumsum(s ** 2)
    k = int(np.searchsorted(energy, signals.ALIGNMENT_ENERGY * energy[-1]) + 1)
    assert got["alignment_rank"] == k
    for i, src in enumerate([s1, s2]):
        d = dense(src)
        assert got["kept"][i] == pytest.approx(np.sum(d * df) / np.sum(d * d), rel=1e-9)
        assert got["alignment"][i] == pytest.approx(
            np.linalg.norm(u[:, :k] @ (u[:, :k].T @ d)) / np.linalg.norm(d), rel=1e-9)
    assert got["kept"][2] is None and got["alignment"][2] is None
    assert got["energy_kept"] == pytest.approx(0.99)
    # a fusion that is one source exactly keeps all of it
    alone = signals.module_signals([s1], s1, 0.0)
    assert alone["kept"][0] == pytest.approx(1.0) and alone["alignment"][0] == pytest.approx(1.0)


def test_alignment_rank_takes_every_tied_singular_value():
    # a flat spectrum (Iso-C's): the top 95% of the energy is no subspace of the span, so all of it counts
    rng = np.random.default_rng(5)
    qb = np.linalg.qr(rng.standard_normal((SHAPE[0], 22)))[0]
    qa = np.linalg.qr(rng.standard_normal((SHAPE[1], 22)))[0]
    flat = (qa.T.astype(np.float32), (2.0 * qb).astype(np.float32))
    src = make_source(3, 1)
    got = signals.module_signals([src], flat, 0.0)
    assert got["alignment_rank"] == 22  # 21 hold 95.5% of the energy
    d = dense(src)
    assert got["alignment"][0] == pytest.approx(np.linalg.norm(qb @ (qb.T @ d)) / np.linalg.norm(d), rel=1e-6)
    # one value clearly below the rest is not tied: the rank stops before it
    steep = (flat[0], flat[1] * np.r_[np.ones(21), 0.01].astype(np.float32))
    assert signals.module_signals([src], steep, 0.0)["alignment_rank"] == 21


def test_summary_pools_over_modules_like_one_big_matrix():
    m1 = [make_source(2, 1), make_source(3, 2)]
    m2 = [make_source(2, 3, (16, 8)), make_source(3, 4, (16, 8))]
    fused = {}
    per = {}
    for name, srcs, w in (("a", m1, (1.0, 0.2)), ("b", m2, (0.4, 1.0))):
        f = (np.concatenate([srcs[0][0], srcs[1][0]]), np.concatenate([w[0] * srcs[0][1], w[1] * srcs[1][1]], 1))
        fused[name] = f
        per[name] = signals.module_signals(srcs, f, 0.0)
    summary = signals.summarize(per, ["x", "y"])
    for i, name in enumerate("xy"):
        num = sum(np.sum(dense(s[i]) * dense(fused[k])) for k, s in (("a", m1), ("b", m2)))
        den = sum(np.sum(dense(s[i]) ** 2) for s in (m1, m2))
        assert summary["adapters"][i]["kept"] == pytest.approx(num / den, rel=1e-9)
    assert summary["min_kept"] == min(a["kept"] for a in summary["adapters"])
    assert summary["energy_kept"] == pytest.approx(1.0)
    json.dumps(summary)


def test_opposite_signs_on_the_same_directions_are_flagged(tmp_path):
    """Two real adapters writing the same directions with opposite signs: averaging them cancels
    both, and the fusion record says so before any evaluation."""
    a, factors = make_mlx_adapter(tmp_path / "a", rank=4, seed=1)
    b, _ = make_mlx_adapter(tmp_path / "b", rank=4, seed=1)
    from pipeline.safetensors_io import write_file

    tensors = {}
    for name, (fa, fb) in factors.items():
        tensors[f"{name}.lora_a"] = fa.T.copy()
        tensors[f"{name}.lora_b"] = (-0.9 * fb).T.copy()  # same directions, opposite sign
    write_file(b / "adapters.safetensors", tensors, {"format": "mlx"})
    c, _ = make_mlx_adapter(tmp_path / "c", rank=4, seed=7)

    bad = fuse([a, b], tmp_path / "bad", FusionSpec(method="linear", weights=[0.5, 0.5]))
    good = fuse([a, c], tmp_path / "good", FusionSpec(method="linear", weights=[0.5, 0.5]))
    sb, sg = bad["signals"], good["signals"]
    assert sb["min_kept"] < 0.1 < 0.4 < sg["min_kept"]
    assert sb["mean_overlap"] == pytest.approx(1.0) and sg["mean_overlap"] < 0.5
    assert any("opposite signs" in w for w in sb["warnings"])
    assert any("largely cancelled" in w for w in sb["warnings"])
    assert sg["warnings"] == []
    # per module in fusion.json, the same figures the summary pools
    record = json.loads((tmp_path / "bad" / "fusion.json").read_text())
    for m in record["modules"].values():
        assert m["column_overlap"][0][1] == pytest.approx(1.0)
        assert m["kept"][0] < 0.1 and m["energy_kept"] == pytest.approx(1.0)
    assert record["signals"] == json.loads(json.dumps(sb))


def _check_factor_svd(source, rank):
    """factor_svd's U = B xb, s, V = A^T xa against the dense SVD of B @ A."""
    a, b = source
    grams = geometry.JointGrams([source])
    xb, s, xa = signals.factor_svd(grams.gb, grams.ga)
    u, v = b @ xb, a.T @ xa
    want = np.linalg.svd(b @ a, compute_uv=False)
    assert s.size == rank
    np.testing.assert_allclose(s, want[:rank], rtol=1e-8)
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-8)
    np.testing.assert_allclose(v.T @ v, np.eye(rank), atol=1e-8)
    np.testing.assert_allclose((u * s) @ v.T, b @ a, atol=1e-10 * want[0])


def test_factor_svd_from_grams_on_well_and_ill_conditioned_factors():
    """The Cholesky path (factors with condition number 10 and 1e4), the eigh path it falls back to
    (a column 1e-9 of the largest, two equal columns, a zero column) and a delta whose A kills a
    direction of B: each gives the delta's own SVD, without its zero directions (nor one below
    RANK_TOL)."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(4, 30)), rng.normal(size=(20, 4))
    _check_factor_svd((a, b), 4)
    q, _ = np.linalg.qr(rng.normal(size=(20, 4)))
    _check_factor_svd((a, q * np.array([1.0, 1e-2, 1e-3, 1e-4])), 4)
    _check_factor_svd((a, q * np.array([1.0, 1e-2, 1e-4, 1e-9])), 3)  # below RANK_TOL: not a direction
    _check_factor_svd((a, np.c_[b[:, :3], b[:, 2]]), 3)
    _check_factor_svd((a, np.c_[b[:, :3], np.zeros(20)]), 3)
    _check_factor_svd((np.r_[a[:3], a[2:3]], b), 3)
    zero = geometry.JointGrams([(np.zeros((2, 30)), np.zeros((20, 2)))])
    assert signals.factor_svd(zero.gb, zero.ga)[1].size == 0


def test_joint_grams_give_every_inner_product_of_the_deltas():
    srcs = [make_source(3, 1), None, make_source(5, 2), make_source(2, 3)]
    grams = geometry.JointGrams(srcs)
    ds = [np.zeros(SHAPE) if s is None else dense(s) for s in srcs]
    np.testing.assert_allclose(grams.inner_matrix(), [[np.sum(x * y) for y in ds] for x in ds],
                               rtol=1e-12, atol=1e-12)
    gb, ga = grams.blocks(0, 2)
    np.testing.assert_allclose(gb, srcs[0][1].T @ srcs[2][1], rtol=1e-12)
    np.testing.assert_allclose(ga, srcs[0][0] @ srcs[2][0].T, rtol=1e-12)
    assert grams.inner(1, 2) == 0.0
