"""TSV-Merge, Iso-C, Iso-CTS and KnOTS against slow dense float64 references written here from their
definitions (../shared/notes/frontier-methods.md, sections 1-4; docs/methods.md), and the properties
the definitions promise."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from conftest import make_mlx_adapter, make_source, run_cli
from pipeline.errors import FusionError
from pipeline.methods import METHODS, ModuleParams, fuse_module, source_rng
from pipeline.methods.ops import merge_task_vectors

SHAPE = (32, 48)  # (out, in)
NAME = "model.layers.2.self_attn.v_proj"
FRONTIER = ("tsv", "iso_c", "iso_cts", "knots")
INNER = {"linear": ("magnitude", None), "ties": ("magnitude", "total"),
         "dare_linear": ("random", None), "dare_ties": ("random", "total")}


@pytest.fixture(scope="module")
def sources():
    """Four adapters on one module: mixed ranks (4, 8, 3) and scales (1, 3, 0.2), and one lacking it."""
    return [make_source(4, 1), make_source(8, 2, scale=3.0), None, make_source(3, 3, scale=0.2)]


def dense(s, shape=SHAPE):
    return np.zeros(shape) if s is None else s[1].astype(np.float64) @ s[0].astype(np.float64)


def product(f):
    assert f.a.dtype == f.b.dtype == np.float32 and f.a.shape[0] == f.b.shape[1] == f.rank
    return f.b.astype(np.float64) @ f.a.astype(np.float64)


def close(x, y, tol=1e-5):
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * max(np.abs(y).max(), 1e-30))


def spectrum(m):
    s = np.linalg.svd(m, compute_uv=False)
    return s[s > 1e-6 * s[0]] if s[0] > 0 else s[:0]


# --- the dense references, literally from the definitions ------------------------------------------

def rank_of(s, ref=None):
    ref = s[0] if ref is None else ref
    return int(np.sum(s > 1e-6 * ref)) if ref > 0 else 0


def polar(x):
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def ref_tsv(deltas, w):
    """polar(U_cat) diag(w S_cat) polar(V_cat)^T, k = int(min(out, in) * (1/K)) per task."""
    shape = next(d for d in deltas if d is not None).shape
    k = int(min(shape) * (1 / len(deltas)))
    us, ss, vs = [], [], []
    for d, wi in zip(deltas, w):
        if d is None or wi == 0:
            continue
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        ki = min(rank_of(s), k)
        us.append(u[:, :ki]), ss.append(wi * s[:ki]), vs.append(vt[:ki].T)
    return polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.hstack(vs)).T


def ref_iso_c(deltas, w):
    total = sum(wi * d for d, wi in zip(deltas, w) if d is not None)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    n = rank_of(s)
    return s[:n].mean() * u[:, :n] @ vt[:n]


def ref_iso_cts(deltas, w, fraction=0.8):
    ts = [wi * d for d, wi in zip(deltas, w) if d is not None]
    u, s, vt = np.linalg.svd(sum(ts), full_matrices=False)
    n, k = rank_of(s), len(deltas)
    c0 = int(n * fraction)
    n_ts = round((n - c0) / k)
    k_c = n - k * n_ts
    us, vs, vals = [u[:, :k_c]], [vt[:k_c].T], [s[:k_c]]
    perp = np.eye(ts[0].shape[0]) - u[:, :k_c] @ u[:, :k_c].T
    for t in ts:
        ur, sr, vrt = np.linalg.svd(perp @ t, full_matrices=False)
        kr = min(n_ts, rank_of(sr, np.linalg.norm(t, 2)))
        us.append(ur[:, :kr]), vs.append(vrt[:kr].T), vals.append(sr[:kr])
    return np.concatenate(vals).mean() * polar(np.hstack(us)) @ polar(np.hstack(vs)).T


def ref_knots(deltas, w, inner="ties", density=1.0, seed=0, name=NAME, sign="total", consensus="peft"):
    """SVD of [dW_1 ... dW_K], X_i = diag(s) V_i^T, merged with the project's task-vector reference."""
    idx = [i for i, d in enumerate(deltas) if d is not None]
    u, s, vt = np.linalg.svd(np.hstack([deltas[i] for i in idx]), full_matrices=False)
    r = rank_of(s)
    flip = np.sign(u[:, :r].sum(axis=0))   # the sign convention: U's column sums positive
    u, vt = u[:, :r] * flip, vt[:r] * flip[:, None]
    fin = deltas[idx[0]].shape[1]
    xs = [s[:r, None] * vt[:, j * fin:(j + 1) * fin] for j in range(len(idx))]
    sparsify, elect = INNER[inner]
    rngs = [source_rng(seed, name, i) for i in idx]
    merged = merge_task_vectors(xs, [w[i] for i in idx], sparsify=sparsify, density=density,
                                elect=sign if elect else None, consensus=consensus, rngs=rngs)
    return u @ merged


REFERENCES = {"tsv": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts, "knots": ref_knots}
WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (0.7, 0.5, 0.3, 1.2), (0.9, -0.4, 1.0, 0.6)]


def fuse(srcs, method, **kw):
    kw.setdefault("weights", (1.0,) * len(srcs))
    return fuse_module(srcs, SHAPE, method, ModuleParams(**kw), NAME)


# --- each method equals its dense reference --------------------------------------------------------

@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("w", WEIGHTS)
def test_spectral_methods_equal_the_dense_reference(sources, method, w):
    f = fuse(sources, method, weights=w)
    want = REFERENCES[method]([None if s is None else dense(s) for s in sources], w)
    close(product(f), want)
    assert f.error == 0.0 and f.rank == len(spectrum(want))


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("density", [1.0, 0.4])
@pytest.mark.parametrize("w", WEIGHTS[1:])
def test_knots_equals_the_dense_reference(sources, inner, density, w):
    f = fuse(sources, "knots", weights=w, inner_method=inner, density=density, seed=7)
    want = ref_knots([None if s is None else dense(s) for s in sources], w, inner, density, seed=7)
    close(product(f), want)
    assert f.error == 0.0


@pytest.mark.parametrize("sign,consensus", [("frequency", "peft"), ("total", "mergekit"),
                                            ("frequency", "mergekit")])
def test_knots_ties_follows_the_projects_ties_options(sources, sign, consensus):
    w = (0.9, -0.4, 1.0, 0.6)
    f = fuse(sources, "knots", weights=w, density=0.5, majority_sign_method=sign, consensus=consensus)
    want = ref_knots([None if s is None else dense(s) for s in sources], w, "ties", 0.5, sign=sign,
                     consensus=consensus)
    close(product(f), want)


@pytest.mark.parametrize("method", FRONTIER)
def test_rank_keeps_the_best_components_and_records_the_error(sources, method):
    w = WEIGHTS[1]
    full = product(fuse(sources, method, weights=w))
    f = fuse(sources, method, weights=w, rank=5)
    s = spectrum(full)
    assert f.rank == 5
    assert f.error == pytest.approx(math.sqrt(np.sum(s[5:] ** 2) / np.sum(s ** 2)), rel=1e-6)
    close(np.linalg.norm(full - product(f)) / np.linalg.norm(full), f.error, tol=1e-5)


def test_iso_rank_keeps_the_sums_strongest_directions(sources):
    w = WEIGHTS[1]
    total = sum(wi * dense(s) for s, wi in zip(sources, w))
    u, s, vt = np.linalg.svd(total)
    f = fuse(sources, "iso_c", weights=w, rank=3)
    n = len(spectrum(total))
    close(product(f), s[:n].mean() * u[:, :3] @ vt[:3])


# --- properties -----------------------------------------------------------------------------------

def test_tsv_one_adapter_gives_itself_back(sources):
    close(product(fuse([sources[1]], "tsv", weights=(-0.6,))), -0.6 * dense(sources[1]))


def test_tsv_spectrum_is_the_kept_weighted_singular_values():
    shape = (12, 20)   # k = int(12 / 3) = 4 < the ranks: each task keeps its top 4
    srcs = [make_source(6, 10 + i, shape, 1.0 + i) for i in range(3)]
    w = (0.5, -1.5, 2.0)
    f = fuse_module(srcs, shape, "tsv", ModuleParams(weights=w), NAME)
    kept = np.concatenate([abs(wi) * np.linalg.svd(dense(s, shape), compute_uv=False)[:4]
                           for s, wi in zip(srcs, w)])
    np.testing.assert_allclose(np.linalg.svd(product(f), compute_uv=False), np.sort(kept)[::-1], rtol=1e-5)
    # the factors are an SVD: a has orthonormal rows, b orthogonal columns of those norms
    np.testing.assert_allclose(f.a.astype(np.float64) @ f.a.T, np.eye(f.rank), atol=1e-5)
    bt_b = f.b.astype(np.float64).T @ f.b
    np.testing.assert_allclose(bt_b, np.diag(np.diag(bt_b)), atol=1e-5 * bt_b.max())


def orthogonal_tasks(ranks, shape=SHAPE, seed=0):
    """Sources whose column spaces and row spaces are mutually orthogonal."""
    rng = np.random.default_rng(seed)
    qu = np.linalg.qr(rng.standard_normal((shape[0], sum(ranks))))[0]
    qv = np.linalg.qr(rng.standard_normal((shape[1], sum(ranks))))[0]
    srcs, r0 = [], 0
    for r in ranks:
        s = rng.uniform(0.5, 2.0, r)
        srcs.append(((qv[:, r0:r0 + r].T).astype(np.float32), (qu[:, r0:r0 + r] * s).astype(np.float32)))
        r0 += r
    return srcs


@pytest.mark.parametrize("method,kw", [("tsv", {}), ("knots", {"inner_method": "linear"})])
def test_orthogonal_tasks_give_the_weighted_sum(method, kw):
    srcs = orthogonal_tasks([3, 5, 2])
    w = (0.8, 1.3, -0.5)
    close(product(fuse(srcs, method, weights=w, **kw)), sum(wi * dense(s) for s, wi in zip(srcs, w)))


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_spectrum_is_flat(sources, method):
    f = fuse(sources, method, weights=WEIGHTS[2])
    s = spectrum(product(f))
    np.testing.assert_allclose(s, s[0], rtol=1e-5)


def test_iso_c_keeps_the_sums_column_and_row_spaces(sources):
    w = WEIGHTS[2]
    total = sum(wi * dense(s) for s, wi in zip(sources, w))
    u, s, vt = np.linalg.svd(total)
    n = len(spectrum(total))
    got = product(fuse(sources, "iso_c", weights=w))
    close(u[:, :n] @ (u[:, :n].T @ got), got)
    close((got @ vt[:n].T) @ vt[:n], got)
    assert np.linalg.norm(got, 2) == pytest.approx(s[:n].mean(), rel=1e-5)


def test_iso_cts_has_the_sums_rank_and_one_adapter_is_iso_c():
    srcs = [make_source(4, 1), make_source(8, 2, scale=3.0), make_source(3, 3, scale=0.2)]
    f = fuse(srcs, "iso_cts", weights=(0.7, 0.5, 1.2), common_fraction=0.6)
    s = spectrum(product(f))
    assert len(s) == 15 and np.allclose(s, s[0], rtol=1e-5)   # N = 15 = rank of the sum
    for frac in (0.8, 0.3):
        close(product(fuse(srcs[1:2], "iso_cts", weights=(-0.7,), common_fraction=frac)),
              product(fuse(srcs[1:2], "iso_c", weights=(-0.7,))))


def test_iso_cts_without_room_for_the_common_subspace_is_a_fusion_error():
    # N = 3, K = 2, common_fraction 0.1: c0 = 0, n_ts = round(1.5) = 2, k_c = 3 - 4 < 0
    srcs = [make_source(1, 1), make_source(2, 2)]
    with pytest.raises(FusionError, match=r"v_proj: iso_cts with common_fraction 0.1 .*raise common_fraction"):
        fuse(srcs, "iso_cts", common_fraction=0.1)


def test_knots_linear_and_one_adapter_ties_at_full_density(sources):
    w = WEIGHTS[2]
    total = sum(wi * dense(s) for s, wi in zip(sources, w))
    close(product(fuse(sources, "knots", weights=w, inner_method="linear")), total)
    close(product(fuse([sources[1]], "knots", weights=(0.6,))), 0.6 * dense(sources[1]))


def test_knots_ties_is_linear_in_uniform_weights(sources):
    one = product(fuse(sources, "knots", density=0.3))
    close(product(fuse(sources, "knots", weights=(0.4,) * 4, density=0.3)), 0.4 * one)


@pytest.mark.parametrize("inner", ["dare_linear", "dare_ties"])
def test_knots_dare_is_reproducible_per_seed(sources, inner):
    p = dict(weights=WEIGHTS[1], inner_method=inner, density=0.5, seed=3)
    f1, f2 = fuse(sources, "knots", **p), fuse(sources, "knots", **p)
    assert f1.a.tobytes() == f2.a.tobytes() and f1.b.tobytes() == f2.b.tobytes()
    assert not np.array_equal(product(f1), product(fuse(sources, "knots", **{**p, "seed": 4})))


def test_knots_dare_linear_is_the_weighted_sum_in_expectation(sources):
    w = WEIGHTS[1]
    total = sum(wi * dense(s) for s, wi in zip(sources, w))
    draws = [product(fuse(sources, "knots", weights=w, inner_method="dare_linear", density=0.5, seed=k))
             for k in range(400)]
    single = np.linalg.norm(draws[0] - total)
    mean_err = np.linalg.norm(np.mean(draws, axis=0) - total)
    # 400 independent draws: the error of the mean shrinks by about sqrt(400) = 20
    assert mean_err < single / 10


@pytest.mark.parametrize("method", FRONTIER)
def test_missing_module_and_zero_weight(sources, method):
    """A source that lacks the module counts in K like a zero delta; weight 0 removes a task."""
    w = (0.7, 0.0, 0.5, 1.2)
    f = fuse(sources, method, weights=w)
    want = REFERENCES[method]([None if s is None or wi == 0 else dense(s) for s, wi in zip(sources, w)], w)
    if method != "knots":        # knots: a zero-weight task still shapes the shared basis
        close(product(f), want)
    assert np.isfinite(product(f)).all()


# --- the registry, the command line and params.yaml ------------------------------------------------

def test_registered_with_their_parameters():
    for m in FRONTIER:
        assert m in METHODS and METHODS[m].exact and METHODS[m].default_weights(3) == [1.0] * 3
    assert "common_fraction" in METHODS["iso_cts"].params
    assert {"inner_method", "density", "seed"} <= set(METHODS["knots"].params)


def test_fuse_command_runs_each_method_and_help_lists_them(tmp_path):
    a, _ = make_mlx_adapter(tmp_path / "a", rank=4, seed=1)
    b, _ = make_mlx_adapter(tmp_path / "b", rank=6, seed=2)
    help_text = run_cli("fuse", "--help").stdout
    for m in FRONTIER:
        assert m in help_text
    assert "KnOTS" in help_text and "Iso" in help_text    # the registry's summaries, in the epilog
    for m, extra in (("tsv", []), ("iso_c", []), ("iso_cts", ["--common-fraction", "0.5"]),
                     ("knots", ["--inner-method", "dare_ties", "--density", "0.5", "--seed", "2"])):
        res = run_cli("fuse", a, b, "--out", tmp_path / m, "--method", m, *extra)
        assert res.returncode == 0, res.stderr
        rec = json.loads((tmp_path / m / "fusion.json").read_text())
        assert rec["method"] == m and rec["output"]["max_error"] == 0.0
    rec = json.loads((tmp_path / "knots" / "fusion.json").read_text())
    assert rec["params"]["inner_method"] == "dare_ties"
    res = run_cli("fuse", a, b, "--out", tmp_path / "bad", "--method", "knots", "--inner-method", "mean")
    assert res.returncode == 2 and "inner_method must be one of" in res.stderr
    assert not (tmp_path / "bad").exists()


def test_params_yaml_can_use_them():
    from pipeline.params import resolve

    raw = {"base_model": "m", "adapters": {"a": {"path": "x"}, "b": {"path": "y"}},
           "method": "linear", "weights": [0.5, 0.5],
           "fusions": {"k": {"adapters": ["a", "b"], "method": "knots", "inner_method": "dare_linear",
                             "density": 0.3, "weights": [1, 1]},
                       "c": {"adapters": ["a", "b"], "method": "iso_cts", "common_fraction": 0.6},
                       "bad": {"adapters": ["a", "b"], "method": "iso_cts", "common_fraction": 0}}}
    with pytest.raises(FusionError, match="fusion 'bad': common_fraction must be in"):
        resolve(raw)
    del raw["fusions"]["bad"]
    p = resolve(raw)
    assert (p.fusions["k"].spec.method, p.fusions["k"].spec.inner_method) == ("knots", "dare_linear")
    assert p.fusions["c"].spec.common_fraction == 0.6


def test_per_module_rules_reach_the_method(tmp_path):
    """A rule on a module name changes that module's parameters only (here iso_cts' common_fraction
    is not scheduled, so the rule varies the weights)."""
    from pipeline.fuse import FusionSpec, fuse as fuse_adapters
    from pipeline.formats import read_adapter

    a, _ = make_mlx_adapter(tmp_path / "a", rank=4, seed=1)
    b, _ = make_mlx_adapter(tmp_path / "b", rank=6, seed=2)
    out = tmp_path / "f"
    fuse_adapters([a, b], out, FusionSpec(method="tsv", weights=[1.0, 1.0],
                                          rules=[{"match": "mlp", "weights": [0.5, 0.5]}]))
    fused, srcs = read_adapter(out), [read_adapter(a), read_adapter(b)]
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        ds = [s * B.astype(np.float64) @ A.astype(np.float64) for A, B, s in (x.factors(name) for x in srcs)]
        A, B, s = fused.factors(name)
        got = s * B.astype(np.float64) @ A.astype(np.float64)
        k = 0.5 if "mlp" in name else 1.0
        want = ref_tsv(ds, [k, k])
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())



@pytest.mark.parametrize("shape", [(6, 40), (40, 6)])
@pytest.mark.parametrize("method", FRONTIER)
def test_more_rank_than_rows_or_columns(method, shape):
    """The stacked ranks (4 + 5 + 3) exceed min(out, in): the bases are then Householder QRs."""
    srcs = [make_source(4, 1, shape, 1.0), make_source(5, 2, shape, 2.0), make_source(3, 3, shape, 0.5)]
    w = (0.7, -0.4, 1.1)
    f = fuse_module(srcs, shape, method, ModuleParams(weights=w, common_fraction=0.5), NAME)
    deltas = [dense(s, shape) for s in srcs]
    want = ref_iso_cts(deltas, w, 0.5) if method == "iso_cts" else REFERENCES[method](deltas, w)
    close(product(f), want)


def test_an_adapter_fused_with_itself(sources):
    """The stacked factors are rank-deficient; the polar factors are taken on the nonzero singular
    values, so TSV averages the two copies (as TIES does) instead of picking arbitrary vectors."""
    s = sources[1]
    d = dense(s)
    close(product(fuse([s, s], "tsv")), d)
    close(product(fuse([s, s], "knots")), d)
    close(product(fuse([s, s], "knots", inner_method="linear")), 2 * d)
    close(product(fuse([s, s], "iso_c")), product(fuse([s], "iso_c", weights=(2.0,))))
    f = fuse([s, s], "iso_cts")
    sv = spectrum(product(f))
    assert np.allclose(sv, sv[0], rtol=1e-5) and np.isfinite(product(f)).all()
