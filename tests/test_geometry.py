"""Geometry figures from factors against dense computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline import geometry

SHAPE = (24, 40)
NAME = "model.layers.1.mlp.down_proj"


def make_source(rank, seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.3, (rank, shape[1])).astype(np.float32),
            rng.normal(0, 0.3, (shape[0], rank)).astype(np.float32))


def dense(s, shape=SHAPE):
    return np.zeros(shape) if s is None else s[1].astype(np.float64) @ s[0].astype(np.float64)


def ref_conflict(d1, d2):
    both = (d1 != 0) & (d2 != 0)
    if not both.any():
        return None
    return float(np.mean(np.sign(d1[both]) != np.sign(d2[both])))


def ref_conflict_all(ds):
    count = mixed = 0
    for idx in np.ndindex(ds[0].shape):
        vals = [d[idx] for d in ds if d[idx] != 0]
        if len(vals) >= 2:
            count += 1
            mixed += any(v > 0 for v in vals) and any(v < 0 for v in vals)
    return mixed / count if count else None


@pytest.fixture(scope="module")
def sources():
    base = make_source(4, 1)
    similar = (base[0], (base[1] + 0.3 * make_source(4, 2)[1]).astype(np.float32))
    return [base, make_source(6, 3), None, similar]


def test_norms_and_inner_products_match_dense(sources):
    for s in sources:
        assert geometry.lowrank_norm(s) == pytest.approx(np.linalg.norm(dense(s)), rel=1e-9, abs=1e-12)
    g = geometry.gram_matrix(sources)
    ds = [dense(s) for s in sources]
    np.testing.assert_allclose(g, [[np.sum(x * y) for y in ds] for x in ds], rtol=1e-9, atol=1e-12)
    assert geometry.lowrank_inner(sources[0], None) == 0.0


def test_cosine_matrix_matches_dense(sources):
    cos = geometry.cosine_matrix(sources)
    ds = [dense(s) for s in sources]
    for i, x in enumerate(ds):
        for j, y in enumerate(ds):
            if sources[i] is None or sources[j] is None:
                assert cos[i][j] is None
            else:
                ref = np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y))
                assert cos[i][j] == pytest.approx(ref, abs=1e-9)
    assert cos[0][3] > 0.8 and abs(cos[0][1]) < 0.5  # a perturbed copy is close, a stranger is not


def test_cosine_is_bounded_for_identical_and_negated():
    s = make_source(5, 4)
    neg = (s[0], -s[1])
    cos = geometry.cosine_matrix([s, s, neg])
    assert cos[0][1] == pytest.approx(1.0) and cos[0][2] == pytest.approx(-1.0)
    assert all(-1.0 <= c <= 1.0 for row in cos for c in row)


def test_sign_conflicts_match_dense(sources):
    pair, overall = geometry.sign_conflicts(sources, SHAPE, NAME)
    ds = [dense(s) for s in sources]
    for i in range(len(ds)):
        for j in range(len(ds)):
            ref = ref_conflict(ds[i], ds[j])
            assert pair[i][j] == (None if ref is None else pytest.approx(ref))
    assert overall == pytest.approx(ref_conflict_all(ds))
    assert pair[0][0] == 0.0 and pair[0][3] < pair[0][1]


def test_sign_conflict_of_negated_copy_is_one():
    s = make_source(3, 5)
    pair, overall = geometry.sign_conflicts([s, (s[0], -s[1])], SHAPE, NAME)
    assert pair[0][1] == 1.0 and overall == 1.0
    pair, overall = geometry.sign_conflicts([s, None], SHAPE, NAME)
    assert pair[0][1] is None and overall is None


def test_sign_conflict_row_sample_is_deterministic_and_matches_dense_on_those_rows():
    shape = (300, 20)
    srcs = [make_source(3, 6, shape), make_source(2, 7, shape), make_source(4, 8, shape)]
    rows = geometry.sample_rows(shape[0], NAME, 50)
    assert len(rows) == 50 and len(set(rows.tolist())) == 50 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, geometry.sample_rows(shape[0], NAME, 50))
    assert not np.array_equal(rows, geometry.sample_rows(shape[0], NAME + "x", 50))
    pair, overall = geometry.sign_conflicts(srcs, shape, NAME, max_rows=50)
    ds = [dense(s, shape)[rows] for s in srcs]
    assert pair[0][1] == pytest.approx(ref_conflict(ds[0], ds[1]))
    assert pair[1][2] == pytest.approx(ref_conflict(ds[1], ds[2]))
    assert overall == pytest.approx(ref_conflict_all(ds))
    np.testing.assert_array_equal(geometry.sample_rows(30, NAME, 50), np.arange(30))
    # the sample is a fair estimate of the full rate
    full = ref_conflict(dense(srcs[0], shape), dense(srcs[1], shape))
    assert abs(pair[0][1] - full) < 0.1


def test_module_geometry_and_summary_are_json_ready(sources):
    per_module = {}
    for k, name in enumerate(["model.layers.0.q", "model.layers.1.q"]):
        srcs = sources if k == 0 else [sources[1], sources[0], sources[3], None]
        g = geometry.module_geometry(srcs, SHAPE, name)
        assert set(g) == {"norms", "cosine", "sign_conflict", "sign_conflict_all"}
        per_module[name] = {"rank": 4, "error": 0.0, **g}
    names = ["a", "b", "c", "d"]
    summary = geometry.summarize(per_module, names)
    json.dumps(per_module)
    json.dumps(summary)
    assert summary["modules"] == 2
    m0, m1 = per_module.values()
    # adapter a: present in both modules; its total norm is the root of the sum of squares
    ad = summary["adapters"][0]
    assert ad["name"] == "a" and ad["modules"] == 2
    assert ad["norm"] == pytest.approx(math.hypot(m0["norms"][0], m1["norms"][0]))
    assert summary["adapters"][2]["modules"] == 1
    pairs = {tuple(p["adapters"]): p for p in summary["pairs"]}
    assert len(pairs) == 6
    ab = pairs[("a", "b")]
    assert ab["cosine"]["mean"] == pytest.approx((m0["cosine"][0][1] + m1["cosine"][0][1]) / 2)
    assert ab["cosine"]["modules"] == 2
    ad_pair = pairs[("a", "d")]  # d lacks the second module: only the first counts
    assert ad_pair["cosine"]["modules"] == 1
    assert ad_pair["sign_conflict"]["mean"] == pytest.approx(m0["sign_conflict"][0][3])
    cd = pairs[("c", "d")]  # never both present
    assert cd["cosine"] == {"mean": None, "min": None, "max": None, "modules": 0}
    allc = [m["sign_conflict_all"] for m in (m0, m1)]
    assert summary["sign_conflict_all"]["mean"] == pytest.approx(np.mean(allc))


def test_default_row_sample_scales_with_width():
    assert geometry.default_rows(2048) == 64 and geometry.default_rows(8192) == 16
    assert geometry.default_rows(40) == geometry.MAX_ROWS and geometry.default_rows(10**6) == geometry.MIN_ROWS
    shape = (600, 3000)
    srcs = [make_source(3, 11, shape), make_source(5, 12, shape), make_source(2, 13, shape)]
    rows = geometry.sample_rows(shape[0], NAME, geometry.default_rows(shape[1]))
    pair, overall = geometry.sign_conflicts(srcs, shape, NAME)
    ds = [dense(s, shape)[rows] for s in srcs]
    assert pair[0][2] == pytest.approx(ref_conflict(ds[0], ds[2]))
    assert overall == pytest.approx(ref_conflict_all([d[:, :200] for d in ds]), abs=0.05)
    two, both = geometry.sign_conflicts(srcs[:2], shape, NAME)
    assert both == pytest.approx(ref_conflict(ds[0], ds[1])) == two[0][1]


def test_module_geometry_equals_its_parts(sources):
    g = geometry.module_geometry(sources, SHAPE, NAME)
    assert g["norms"] == pytest.approx([geometry.lowrank_norm(s) for s in sources], rel=1e-12)
    assert g["cosine"] == geometry.cosine_matrix(sources)
    assert (g["sign_conflict"], g["sign_conflict_all"]) == geometry.sign_conflicts(sources, SHAPE, NAME)


@pytest.mark.parametrize("method,space", [("linear", "delta"), ("ties", "core"), ("dare_ties", "core"),
                                          ("tsv", "delta"), ("iso_c", "delta"), ("iso_cts", "delta")])
def test_grams_from_the_methods_span_match_the_written_factors(method, space):
    """Where a method gives the fused factors' coordinates in the sources' stacks, the Gram matrices of
    ``[*sources, fused]`` come from them in R x R arithmetic; they are those of the written factors up to
    the factors' rounding to float32, and the sources' blocks are the sources' own Gram matrices."""
    from pipeline.methods import ModuleParams, get_method, run_method

    sources = [make_source(3, 1), None, make_source(5, 2), (make_source(2, 3)[0], 4.0 * make_source(2, 3)[1])]
    p = ModuleParams(weights=(0.7, 1.0, -0.4, 0.5), space=space, density=0.6)
    result = run_method(get_method(method), sources, SHAPE, p, NAME)
    assert result.span is not None
    fused = (result.a, result.b)
    got, want = geometry.JointGrams.of(sources, fused, result.span), geometry.JointGrams([*sources, fused])
    assert got.spans == want.spans
    for mine, theirs in ((got.gb, want.gb), (got.ga, want.ga)):
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())
        np.testing.assert_allclose(mine[:10, :10], theirs[:10, :10], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got.inner_matrix(), want.inner_matrix(), rtol=1e-5, atol=1e-9)
    # and the fused block is the written delta's: its norm from the factors, densely
    d = dense(fused)
    assert math.sqrt(got.inner(4, 4)) == pytest.approx(np.linalg.norm(d), rel=1e-6)


def test_grams_without_a_span_are_the_factors_own():
    sources = [make_source(3, 1), make_source(4, 2)]
    fused = make_source(2, 5)
    assert geometry.JointGrams.of(sources, fused, None).gb.tobytes() == geometry.JointGrams([*sources, fused]).gb.tobytes()
