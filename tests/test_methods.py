"""Fusion methods against slow, literal dense references written here in plain numpy."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np
import pytest

from pipeline.errors import FusionError
from pipeline.methods import (METHODS, FusedModule, ModuleParams, agreement, check_params, dare_mask,
                              disjoint_mean, elect_sign, fuse_module, keep_count, magnitude_threshold,
                              prune_magnitude, randomized_svd, refactor_exact, slerp_coefficients,
                              stack_factors, ties_merge)

from conftest import make_source

SHAPE = (32, 48)  # (out, in)
NAME = "model.layers.3.self_attn.q_proj"
MASKING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
FULL = min(SHAPE)  # a rank that keeps everything: the re-factoring is then exact


@pytest.fixture(scope="module")
def sources():
    """Three adapters on one module: ranks 4 and 8, and one that lacks the module."""
    return [make_source(4, 1), make_source(8, 2), None]


# --- the dense references ------------------------------------------------------------------------

def dense(s, shape=SHAPE):
    if s is None:
        return np.zeros(shape)
    a, b = s
    return b.astype(np.float64) @ a.astype(np.float64)


def product(f: FusedModule):
    assert f.a.dtype == np.float32 and f.b.dtype == np.float32
    assert f.a.shape[0] == f.b.shape[1] == f.rank
    return f.b.astype(np.float64) @ f.a.astype(np.float64)


def close(x, y, tol=2e-5):
    scale = max(np.abs(y).max(), 1e-30)
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * scale)


def ref_linear(srcs, w):
    return sum(wi * dense(s) for s, wi in zip(srcs, w))


def ref_truncate(m, r):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], math.sqrt(np.sum(s[r:] ** 2) / np.sum(s ** 2))


def ref_slerp_vec(x, y, t):
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return (1 - t) * x + t * y
    cos = np.sum(x * y) / (nx * ny)
    if abs(cos) > 1 - 1e-6:
        return (1 - t) * x + t * y
    th = math.acos(cos)
    return math.sin((1 - t) * th) / math.sin(th) * x + math.sin(t * th) / math.sin(th) * y


def ref_slerp_many(xs, w):
    acc, total = xs[0], w[0]
    for x, wk in zip(xs[1:], w[1:]):
        total += wk
        acc = ref_slerp_vec(acc, x, wk / total if total > 0 else 0.0)
    return acc


def ref_prune(x, density):
    """PEFT's count, int(density * size), keeping every tie at the k-th largest magnitude."""
    flat = np.abs(x).ravel()
    k = int(density * flat.size)
    if k == 0:
        return np.zeros_like(x)
    thr = sorted(flat, reverse=True)[k - 1]
    return np.where(np.abs(x) >= thr, x, 0.0)


def ref_rng(seed, name, idx):
    d = hashlib.sha256(name.encode()).digest()
    chunks = [int.from_bytes(d[i:i + 4], "little") for i in range(0, 32, 4)]
    return np.random.default_rng(np.random.SeedSequence([seed, idx, *chunks]))


def ref_dare(x, density, rng):
    keep = rng.random(x.shape, dtype=np.float32) < np.float32(density)
    return np.where(keep, x / density, 0.0)


def ref_ties_entrywise(vals, w, method, consensus="peft"):
    """vals: list of equally shaped arrays (already sparsified, not weighted).

    peft: the sign is elected on the values themselves, the agreeing weighted values are summed
    and divided by how many agree. mergekit: elected on the weighted values, divided by the sum of
    the agreeing weights (or by 1 where that sum is 0)."""
    out = np.zeros(vals[0].shape)
    for idx in np.ndindex(out.shape):
        v = [x[idx] for x in vals]
        voters = v if consensus == "peft" else [wi * e for wi, e in zip(w, v)]
        if method == "total":
            vote = sum(voters)
        else:
            vote = sum((1 if e > 0 else -1 if e < 0 else 0) for e in voters)
        sign = 1 if vote >= 0 else -1
        agree = [i for i, e in enumerate(voters) if (e > 0 if sign > 0 else e < 0)]
        total = sum(w[i] * v[i] for i in agree)
        divisor = len(agree) if consensus == "peft" else sum(w[i] for i in agree)
        out[idx] = total / (divisor if divisor != 0 else 1)
    return out


def ref_masking(method, tensors, w, p, rngs=None):
    """Sparsify, then the weighted sum or the election + disjoint merge."""
    vals = []
    for i, x in enumerate(tensors):
        if method in ("ties", "magnitude_prune"):
            x = ref_prune(x, p.density)
        elif p.density < 1:
            x = ref_dare(x, p.density, rngs[i])
        vals.append(x)
    if method in ("ties", "dare_ties"):
        return ref_ties_entrywise(vals, w, p.majority_sign_method, p.consensus)
    return sum(wi * x for wi, x in zip(w, vals))


def ref_masking_delta(method, srcs, p, seed=0, name=NAME):
    idx = [i for i, s in enumerate(srcs) if s is not None]
    rngs = [ref_rng(seed, name, i) for i in idx]
    return ref_masking(method, [dense(srcs[i]) for i in idx], [p.weights[i] for i in idx], p, rngs)


# --- exact methods ---------------------------------------------------------------------------

@pytest.mark.parametrize("w", [(0.5, 0.3, 0.2), (1.0, -0.7, 3.0)])
def test_linear_matches_dense(sources, w):
    f = fuse_module(sources, SHAPE, "linear", ModuleParams(weights=w), NAME)
    close(product(f), ref_linear(sources, w))
    assert f.rank == 12 and f.error == 0.0


def test_linear_output_convention(sources):
    f = fuse_module(sources, SHAPE, "linear", ModuleParams(weights=(0.5, 0.3, 0.2)), NAME)
    # a has orthonormal rows; the singular values sit in b, in decreasing order
    np.testing.assert_allclose(f.a @ f.a.T, np.eye(f.rank), atol=1e-5)
    norms = np.linalg.norm(f.b, axis=0)
    assert np.all(np.diff(norms) <= 1e-5)
    # each component's largest |a| entry is positive
    assert np.all(f.a[np.arange(f.rank), np.abs(f.a).argmax(axis=1)] > 0)


def test_linear_rank_truncation_is_eckart_young(sources):
    w = (0.5, 0.3, 0.2)
    ref = ref_linear(sources, w)
    for r in (1, 5, 11):
        f = fuse_module(sources, SHAPE, "linear", ModuleParams(weights=w, rank=r), NAME)
        best, err = ref_truncate(ref, r)
        assert f.rank == r
        close(product(f), best)
        assert f.error == pytest.approx(err, rel=1e-6)
        assert np.linalg.norm(ref - product(f)) / np.linalg.norm(ref) == pytest.approx(err, rel=1e-4)


def test_rank_larger_than_needed_is_not_padded(sources):
    f = fuse_module(sources, SHAPE, "linear", ModuleParams(weights=(1, 1, 1), rank=30), NAME)
    assert f.rank == 12 and f.error == 0.0


def test_exact_rank_drops_negligible_directions():
    s = make_source(6, 3)
    twice = (s[0], 2 * s[1])
    f = fuse_module([s, twice], SHAPE, "linear", ModuleParams(weights=(1.0, -0.25)), NAME)
    assert f.rank == 6 and f.error == 0.0
    close(product(f), 0.5 * dense(s))


def test_concat_is_exact_stacking(sources):
    w = (0.5, -0.3, 0.2)
    f = fuse_module(sources, SHAPE, "concat", ModuleParams(weights=w), NAME)
    assert f.rank == 4 + 8 and f.error == 0.0
    np.testing.assert_array_equal(f.a, np.concatenate([sources[0][0], sources[1][0]]))
    np.testing.assert_array_equal(f.b, np.concatenate([0.5 * sources[0][1].astype(np.float64),
                                                       -0.3 * sources[1][1].astype(np.float64)],
                                                      axis=1).astype(np.float32))
    close(product(f), ref_linear(sources, w))


def test_concat_with_rank_refactors(sources):
    w = (0.5, 0.3, 0.2)
    f = fuse_module(sources, SHAPE, "concat", ModuleParams(weights=w, rank=5), NAME)
    best, err = ref_truncate(ref_linear(sources, w), 5)
    assert f.rank == 5 and f.error == pytest.approx(err, rel=1e-6)
    close(product(f), best)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_two_matches_dense(t):
    srcs = [make_source(4, 1), make_source(8, 2)]
    f = fuse_module(srcs, SHAPE, "slerp", ModuleParams(weights=(0.5, 0.5), t=t), NAME)
    close(product(f), ref_slerp_vec(dense(srcs[0]), dense(srcs[1]), t))


def test_slerp_endpoints():
    srcs = [make_source(4, 1), make_source(8, 2)]
    for t, k in ((0.0, 0), (1.0, 1)):
        f = fuse_module(srcs, SHAPE, "slerp", ModuleParams(weights=(0.5, 0.5), t=t), NAME)
        close(product(f), dense(srcs[k]))
        assert f.rank == srcs[k][0].shape[0]


def test_slerp_is_not_linear_for_orthogonal_deltas():
    srcs = [make_source(4, 1), make_source(8, 2)]
    f = fuse_module(srcs, SHAPE, "slerp", ModuleParams(weights=(0.5, 0.5)), NAME)
    lin = 0.5 * dense(srcs[0]) + 0.5 * dense(srcs[1])
    assert np.linalg.norm(product(f) - lin) > 0.1 * np.linalg.norm(lin)


def test_slerp_parallel_and_antiparallel_fall_back_to_linear():
    s = make_source(4, 5)
    for c in (2.0, -3.0):
        other = (s[0], (c * s[1].astype(np.float64)).astype(np.float32))
        f = fuse_module([s, other], SHAPE, "slerp", ModuleParams(weights=(1, 1), t=0.3), NAME)
        close(product(f), 0.7 * dense(s) + 0.3 * c * dense(s))


def test_slerp_missing_module_is_linear_to_zero(sources):
    f = fuse_module([sources[0], None], SHAPE, "slerp", ModuleParams(weights=(1, 1), t=0.25), NAME)
    close(product(f), 0.75 * dense(sources[0]))


@pytest.mark.parametrize("w", [(1.0, 1.0, 1.0), (0.2, 0.5, 0.3), (0.0, 2.0, 1.0)])
def test_slerp_barycentric_matches_dense(w):
    srcs = [make_source(4, 1), make_source(8, 2), make_source(3, 3)]
    f = fuse_module(srcs, SHAPE, "slerp", ModuleParams(weights=w, t=0.9), NAME)
    close(product(f), ref_slerp_many([dense(s) for s in srcs], w))


def test_slerp_barycentric_reduces_to_pairwise():
    gram = np.array([[4.0, 1.0, 0.0], [1.0, 9.0, 0.0], [0.0, 0.0, 1.0]])
    # three inputs with w_3 = 0 are two-input slerp at t = w_2 / (w_1 + w_2)
    three = slerp_coefficients(gram, (0.3, 0.7, 0.0), 0.5)
    two = slerp_coefficients(gram[:2, :2], (0.3, 0.7), 0.7)
    np.testing.assert_allclose(three, [*two, 0.0], atol=1e-12)
    # two inputs use t, not the weights
    np.testing.assert_array_equal(slerp_coefficients(gram[:2, :2], (0.9, 0.1), 0.0), [1.0, 0.0])


def test_slerp_weight_scale_does_not_matter():
    srcs = [make_source(4, 1), make_source(8, 2), make_source(3, 3)]
    f1 = fuse_module(srcs, SHAPE, "slerp", ModuleParams(weights=(1, 2, 3)), NAME)
    f2 = fuse_module(srcs, SHAPE, "slerp", ModuleParams(weights=(10, 20, 30)), NAME)
    close(product(f1), product(f2), 1e-6)


# --- masking methods -------------------------------------------------------------------------

@pytest.mark.parametrize("method", MASKING)
@pytest.mark.parametrize("density,msm,w", [(0.3, "total", (1.0, 1.0, 1.0)),
                                           (0.6, "frequency", (0.7, -0.4, 1.0)),
                                           (1.0, "total", (0.5, 2.0, 1.0))])
def test_masking_matches_dense(sources, method, density, msm, w):
    p = ModuleParams(weights=w, density=density, majority_sign_method=msm, seed=7, rank=FULL)
    f = fuse_module(sources, SHAPE, method, p, NAME)
    close(product(f), ref_masking_delta(method, sources, p, seed=7))
    assert f.error < 1e-5


@pytest.mark.parametrize("method", MASKING)
def test_masking_default_rank_is_near_optimal(sources, method):
    p = ModuleParams(weights=(1.0, 1.0, 1.0), density=0.4, seed=3)
    f = fuse_module(sources, SHAPE, method, p, NAME)
    ref = ref_masking_delta(method, sources, p, seed=3)
    assert f.rank == 8  # the largest input rank
    _, opt = ref_truncate(ref, 8)
    measured = np.linalg.norm(ref - product(f)) / np.linalg.norm(ref)
    assert f.error == pytest.approx(measured, rel=1e-3)
    assert opt * (1 - 1e-6) <= f.error <= 1.01 * opt


def test_ties_frequency_and_total_differ():
    srcs = [make_source(4, 11), make_source(4, 12), make_source(4, 13)]
    w = (3.0, 1.0, 1.0)
    fs = [fuse_module(srcs, SHAPE, "ties", ModuleParams(weights=w, majority_sign_method=m, rank=FULL), NAME)
          for m in ("total", "frequency")]
    assert np.abs(product(fs[0]) - product(fs[1])).max() > 1e-3


@pytest.mark.parametrize("method", MASKING)
def test_dense_zero_weights_give_zero_module(sources, method):
    f = fuse_module(sources, SHAPE, method, ModuleParams(weights=(0.0, 0.0, 0.0)), NAME)
    assert f.rank == 1 and f.error == 0.0 and not f.a.any() and not f.b.any()


# --- properties ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["linear", "concat", *MASKING])
def test_weights_one_zero_give_the_first_adapter(sources, method):
    """A weight of 0 removes an adapter, in mergekit's TIES convention too (its values never agree
    and its weight adds nothing to the divisor)."""
    srcs = [sources[1], sources[0]]  # rank 8 first: masking's default rank holds it exactly
    f = fuse_module(srcs, SHAPE, method, ModuleParams(weights=(1.0, 0.0), consensus="mergekit"), NAME)
    close(product(f), dense(srcs[0]))
    assert f.error < 1e-5


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_peft_ties_counts_an_adapter_of_weight_zero(sources, method):
    """In PEFT's convention a weight-0 adapter still votes and still counts among the agreeing
    ones: where both agree, the first adapter's value is halved."""
    srcs = [sources[1], sources[0]]
    p = ModuleParams(weights=(1.0, 0.0), rank=FULL)
    f = fuse_module(srcs, SHAPE, method, p, NAME)
    d1, d2 = dense(srcs[0]), dense(srcs[1])
    both = np.sign(d1) == np.sign(d2)
    close(product(f), np.where(both, d1 / 2, np.where(np.sign(d1 + d2) == np.sign(d1), d1, 0.0)))
    assert 0.2 < both.mean() < 0.8


def test_slerp_barycentric_one_zero_zero_gives_the_first_adapter(sources):
    srcs = [make_source(4, 1), make_source(8, 2), make_source(3, 3)]
    f = fuse_module(srcs, SHAPE, "slerp", ModuleParams(weights=(1.0, 0.0, 0.0)), NAME)
    close(product(f), dense(srcs[0]))


@pytest.mark.parametrize("method,w", [("linear", (0.5, 0.5)), ("slerp", (0.5, 0.5)),
                                      ("ties", (1.0, 1.0)), ("dare_ties", (1.0, 1.0)),
                                      ("magnitude_prune", (0.5, 0.5)), ("dare_linear", (0.5, 0.5))])
def test_adapter_fused_with_itself_gives_it_back(method, w):
    s = make_source(6, 9)
    f = fuse_module([s, s], SHAPE, method, ModuleParams(weights=w), NAME)
    close(product(f), dense(s))
    assert f.rank == 6


def test_ties_weights_in_the_two_conventions():
    """peft: weights scale the agreeing values and the mean divides by their number, so weights
    act as scale factors ([0.5, 0.5] halves a self-fusion) and a negative weight does not vote.
    mergekit: weights vote and the divisor is the sum of the agreeing weights, so a self-fusion
    at any positive weights gives the adapter back."""
    s = make_source(6, 9)
    d = dense(s)
    peft = {w: product(fuse_module([s, s], SHAPE, "ties", ModuleParams(weights=w, rank=FULL), NAME))
            for w in ((0.5, 0.5), (1.0, -1.0), (0.7, 0.2))}
    close(peft[(0.5, 0.5)], 0.5 * d)
    close(peft[(1.0, -1.0)], 0 * d, 1e-6)          # both agree (d votes twice): (d - d) / 2
    close(peft[(0.7, 0.2)], 0.45 * d)
    mk = {w: product(fuse_module([s, s], SHAPE, "ties", ModuleParams(weights=w, rank=FULL, consensus="mergekit"),
                                 NAME))
          for w in ((0.5, 0.5), (1.0, -1.0), (0.7, 0.2))}
    close(mk[(0.5, 0.5)], d)
    close(mk[(0.7, 0.2)], d)
    # (d, -d) votes 0 everywhere, which elects +: the positive one agrees, divided by its own
    # weight (1 or -1), which gives d back
    close(mk[(1.0, -1.0)], d)


def test_dare_density_one_equals_linear_and_ties(sources):
    w = (0.7, -0.2, 0.4)
    lin = fuse_module(sources, SHAPE, "linear", ModuleParams(weights=w), NAME)
    dare = fuse_module(sources, SHAPE, "dare_linear", ModuleParams(weights=w, density=1.0, rank=FULL), NAME)
    close(product(dare), product(lin))
    ties = fuse_module(sources, SHAPE, "ties", ModuleParams(weights=w, rank=FULL), NAME)
    dties = fuse_module(sources, SHAPE, "dare_ties", ModuleParams(weights=w, seed=5, rank=FULL), NAME)
    np.testing.assert_array_equal(dties.a, ties.a)
    np.testing.assert_array_equal(dties.b, ties.b)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_seed_reproducible_bytes(sources, method):
    p = ModuleParams(weights=(1.0, 1.0, 1.0), density=0.5, seed=42)
    f1 = fuse_module(sources, SHAPE, method, p, NAME)
    fuse_module(sources, SHAPE, method, p, "model.layers.0.mlp.down_proj")  # other modules first
    f2 = fuse_module(sources, SHAPE, method, p, NAME)
    assert f1.a.tobytes() == f2.a.tobytes() and f1.b.tobytes() == f2.b.tobytes()
    f3 = fuse_module(sources, SHAPE, method, replace(p, seed=43), NAME)
    assert not np.array_equal(product(f1), product(f3))
    f4 = fuse_module(sources, SHAPE, method, p, NAME.replace("q_proj", "k_proj"))
    assert not np.array_equal(product(f1), product(f4))


def test_everything_is_float32_and_rank_matches(sources):
    for method in METHODS:
        p = ModuleParams(weights=(0.5, 0.3, 0.2), density=0.5)
        f = fuse_module(sources, SHAPE, method, p, NAME)
        assert f.a.dtype == f.b.dtype == np.float32
        assert f.a.shape == (f.rank, SHAPE[1]) and f.b.shape == (SHAPE[0], f.rank)
        assert 0.0 <= f.error < 1.0


@pytest.mark.parametrize("method", list(METHODS))
def test_all_missing_gives_one_zero_pair(method):
    f = fuse_module([None, None], SHAPE, method, ModuleParams(weights=(0.5, 0.5)), NAME)
    assert f.rank == 1 and f.error == 0.0
    assert f.a.shape == (1, SHAPE[1]) and f.b.shape == (SHAPE[0], 1)
    assert not f.a.any() and not f.b.any()


# --- randomized SVD ----------------------------------------------------------------------------

def _low_rank_plus_noise(rng, out, fin, r, noise):
    m = rng.standard_normal((out, r)) @ rng.standard_normal((r, fin)) / math.sqrt(r)
    return (m + noise * rng.standard_normal((out, fin))).astype(np.float32)


def _prune_fast(d, density):
    """``ref_prune`` with a partition instead of a sort, for big matrices."""
    flat = np.abs(d).ravel()
    k = int(density * flat.size)
    return np.where(np.abs(d) >= np.partition(flat, flat.size - k)[flat.size - k], d, 0.0)


def _masked_sum(rng, out, fin, r, density):
    parts = [_prune_fast(rng.standard_normal((out, r)) @ rng.standard_normal((r, fin)), density)
             for _ in range(2)]
    return (parts[0] + parts[1]).astype(np.float32)


def _slow_decay(rng, out, fin):
    k = min(out, fin)
    u = np.linalg.qr(rng.standard_normal((out, k)))[0]
    v = np.linalg.qr(rng.standard_normal((fin, k)))[0]
    return ((u / np.sqrt(np.arange(1, k + 1))) @ v.T).astype(np.float32)


def singular_values(m):
    """All singular values, from the eigenvalues of the smaller Gram matrix (cheap, float64)."""
    m = np.asarray(m, np.float64)
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return np.sqrt(np.clip(np.linalg.eigvalsh(g)[::-1], 0, None))


def optimal_error(m, r):
    s = singular_values(m)
    return math.sqrt(np.sum(s[r:] ** 2) / np.sum(s ** 2))


@pytest.mark.parametrize("case,kind,out,fin,rank", [(0, "noise", 512, 2048, 16),
                                                    (1, "noise", 2048, 512, 8),
                                                    (2, "masked", 512, 2048, 16),
                                                    (3, "decay", 160, 640, 8),
                                                    (4, "masked", 200, 300, 16)])
def test_randomized_svd_within_one_percent_of_optimal(case, kind, out, fin, rank):
    rng = np.random.default_rng(case)
    if kind == "noise":
        m = _low_rank_plus_noise(rng, out, fin, 24, 0.3)
    elif kind == "masked":
        m = _masked_sum(rng, out, fin, 8, 0.3)
    else:
        m = _slow_decay(rng, out, fin)
    s_all = singular_values(m)
    opt = math.sqrt(np.sum(s_all[rank:] ** 2) / np.sum(s_all ** 2))
    u, s, vt = randomized_svd(m, rank, np.random.default_rng(0))
    assert u.shape == (out, rank) and s.shape == (rank,) and vt.shape == (rank, fin)
    err = np.linalg.norm(m - (u * s) @ vt) / np.linalg.norm(m)
    assert opt * (1 - 1e-6) <= err <= 1.01 * opt
    np.testing.assert_allclose(s, s_all[:rank], rtol=0.02)


def test_randomized_svd_recovers_exact_low_rank():
    rng = np.random.default_rng(0)
    m = (rng.standard_normal((300, 5)) @ rng.standard_normal((5, 400))).astype(np.float32)
    u, s, vt = randomized_svd(m, 5, np.random.default_rng(1))
    close((u * s) @ vt, m.astype(np.float64), 1e-5)


def test_fuse_error_on_a_big_module_is_near_optimal():
    out, fin = 512, 2048
    srcs = [make_source(8, 21, (out, fin)), make_source(16, 22, (out, fin))]
    p = ModuleParams(weights=(1.0, 1.0), density=0.3)
    f = fuse_module(srcs, (out, fin), "ties", p, NAME)
    assert f.rank == 16
    ref = ref_ties_vectorised([_prune_fast(dense(s, (out, fin)), 0.3) for s in srcs])
    opt = optimal_error(ref, 16)
    measured = np.linalg.norm(ref - product(f)) / np.linalg.norm(ref)
    assert f.error == pytest.approx(measured, rel=1e-3)
    assert opt * (1 - 1e-6) <= measured <= 1.01 * opt


def ref_ties_vectorised(vals):
    """The same TIES as ``ref_ties_entrywise`` ('total'), vectorised for big matrices."""
    st = np.stack(vals)
    sign = np.where(st.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(st) == sign) & (st != 0)
    return (st * agree).sum(0) / np.maximum(agree.sum(0), 1)


# --- factor space ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def equal_rank():
    return [make_source(4, 31), make_source(4, 32)]


def test_factor_space_linear_is_per_tensor_average(equal_rank):
    w = (0.7, 0.3)
    f = fuse_module(equal_rank, SHAPE, "linear", ModuleParams(weights=w, space="factors"), NAME)
    a = sum(wi * s[0].astype(np.float64) for s, wi in zip(equal_rank, w))
    b = sum(wi * s[1].astype(np.float64) for s, wi in zip(equal_rank, w))
    np.testing.assert_allclose(f.a, a, atol=1e-6)
    np.testing.assert_allclose(f.b, b, atol=1e-6)
    assert f.rank == 4 and f.error == 0.0
    # it is a different function from the delta average (cross terms)
    delta = fuse_module(equal_rank, SHAPE, "linear", ModuleParams(weights=w), NAME)
    assert np.linalg.norm(product(f) - product(delta)) > 0.1 * np.linalg.norm(product(delta))


@pytest.mark.parametrize("method", MASKING)
def test_factor_space_masking_is_per_tensor(equal_rank, method):
    p = ModuleParams(weights=(1.0, 0.5), density=0.5, seed=4, space="factors")
    f = fuse_module(equal_rank, SHAPE, method, p, NAME)
    rngs = [ref_rng(4, NAME, i) for i in range(2)]  # each stream draws A's mask, then B's
    a = ref_masking(method, [s[0].astype(np.float64) for s in equal_rank], p.weights, p, rngs)
    b = ref_masking(method, [s[1].astype(np.float64) for s in equal_rank], p.weights, p, rngs)
    np.testing.assert_allclose(f.a, a, atol=1e-6)
    np.testing.assert_allclose(f.b, b, atol=1e-6)


def test_factor_space_slerp_is_per_tensor(equal_rank):
    f = fuse_module(equal_rank, SHAPE, "slerp", ModuleParams(weights=(1, 1), t=0.3, space="factors"), NAME)
    a = ref_slerp_vec(*(s[0].astype(np.float64) for s in equal_rank), 0.3)
    b = ref_slerp_vec(*(s[1].astype(np.float64) for s in equal_rank), 0.3)
    np.testing.assert_allclose(f.a, a, atol=1e-6)
    np.testing.assert_allclose(f.b, b, atol=1e-6)


def test_factor_space_rank_truncation(equal_rank):
    p = ModuleParams(weights=(0.5, 0.5), space="factors", rank=2)
    f = fuse_module(equal_rank, SHAPE, "linear", p, NAME)
    full = fuse_module(equal_rank, SHAPE, "linear", replace(p, rank=None), NAME)
    best, err = ref_truncate(product(full), 2)
    assert f.rank == 2 and f.error == pytest.approx(err, rel=1e-5)
    close(product(f), best)


def test_factor_space_refuses_unequal_ranks_and_missing_modules(sources):
    with pytest.raises(FusionError, match=r"equal ranks.*\[4, 8\]"):
        fuse_module(sources[:2], SHAPE, "linear", ModuleParams(weights=(0.5, 0.5), space="factors"), NAME)
    with pytest.raises(FusionError, match=r"q_proj.*adapter 2 lacks it"):
        fuse_module([sources[0], None], SHAPE, "ties", ModuleParams(weights=(1, 1), space="factors"), NAME)
    with pytest.raises(FusionError, match="concat.*works in delta space, not space"):
        check_params("concat", 2, ModuleParams(weights=(1, 1), space="factors"))


# --- helpers on tiny arrays --------------------------------------------------------------------

def test_prune_magnitude_keeps_ties_at_threshold():
    x = np.array([[3.0, -1.0, 2.0], [-2.0, 0.5, 0.0], [1.0, -3.0, 0.1]], np.float32)
    # 9 * 0.4 = 3.6 -> k = 3 (int, as PEFT): 3, -3, then 2 and -2 tie at the threshold: both kept
    np.testing.assert_array_equal(prune_magnitude(x, 0.4), [[3, 0, 2], [-2, 0, 0], [0, -3, 0]])
    # 9 * 0.12 -> k = 1: 3 and -3 tie
    np.testing.assert_array_equal(prune_magnitude(x, 0.12), [[3, 0, 0], [0, 0, 0], [0, -3, 0]])
    # 9 * 0.1 = 0.9 -> k = 0: PEFT keeps nothing, and so do we
    np.testing.assert_array_equal(prune_magnitude(x, 0.1), np.zeros((3, 3)))
    assert prune_magnitude(x, 1.0) is x


def test_keep_count_is_peft_int_of_density_times_size():
    assert [keep_count(d, n) for d, n in [(0.3, 10), (0.7, 10), (0.29, 100), (0.5, 3), (0.1, 9)]] == \
        [3, 7, 28, 1, 0]   # 0.29 * 100 = 28.999999999999996 in floating point: int() gives 28


def test_density_below_one_entry_prunes_a_module_to_zero(sources):
    """k = 0 (density * size < 1) keeps nothing, as in PEFT: every source pruned to zero."""
    p = ModuleParams(weights=(1.0, 1.0, 1.0), density=0.5 / (SHAPE[0] * SHAPE[1]))
    for method in ("ties", "magnitude_prune"):
        f = fuse_module(sources, SHAPE, method, p, NAME)
        assert f.rank == 1 and not f.a.any() and not f.b.any()
    assert magnitude_threshold(sources[0], SHAPE, p.density) == np.inf


def test_dare_mask_rescales_survivors():
    x = np.ones((200, 200), np.float32)
    y = dare_mask(x, 0.25, np.random.default_rng(0))
    assert set(np.unique(y)) <= {0.0, 4.0}
    assert abs((y != 0).mean() - 0.25) < 0.01
    assert dare_mask(x, 1.0, np.random.default_rng(0)) is x


def test_elect_sign_and_disjoint_mean():
    st = np.array([[1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [-5.0, 1.0, 0.0]], np.float32)[:, None, :]
    np.testing.assert_array_equal(elect_sign(st, "total")[0], [-1, -1, 1])
    np.testing.assert_array_equal(elect_sign(st, "frequency")[0], [1, -1, 1])  # zero votes elect +
    total, freq = agreement(st, elect_sign(st, "total")), agreement(st, elect_sign(st, "frequency"))
    np.testing.assert_array_equal(total[:, 0], [[0, 1, 0], [0, 1, 0], [1, 0, 0]])  # zeros never agree
    np.testing.assert_array_equal(disjoint_mean(st, total)[0], [-5, -1, 0])
    np.testing.assert_array_equal(disjoint_mean(st, freq)[0], [1, -1, 0])
    np.testing.assert_array_equal(disjoint_mean(st, total, np.array([[2.0, 0.0, 0.0]], np.float32))[0],
                                  [-2.5, -2, 0])   # a divisor of 0 divides by 1


def test_ties_merge_conventions_on_a_tiny_array():
    """One entry, three sources (1, 2, -4) with weights (1, 1, 0.25): unweighted the vote is -1
    (only -4 agrees: 0.25 * -4 / 1); weighted it is 1 + 2 - 1 = +2 (1 and 2 agree: 3 / (1 + 1))."""
    st = np.array([1.0, 2.0, -4.0], np.float32).reshape(3, 1, 1)
    w = (1.0, 1.0, 0.25)
    assert ties_merge(st, w, "total", "peft").item() == -1.0
    assert ties_merge(st, w, "total", "mergekit").item() == 1.5
    # frequency: two + against one -, in both conventions
    assert ties_merge(st, w, "frequency", "peft").item() == 1.5
    assert ties_merge(st, (1.0, 2.0, 0.25), "frequency", "mergekit").item() == np.float32(5) / np.float32(3)


def test_stack_factors_and_refactor_exact(sources):
    bc, ac = stack_factors(sources, (2.0, -1.0, 5.0), SHAPE)
    assert bc.shape == (32, 12) and ac.shape == (12, 48)
    close(bc @ ac, 2 * dense(sources[0]) - dense(sources[1]))
    f = refactor_exact(bc, ac, rank=3)
    best, err = ref_truncate(bc @ ac, 3)
    close(product(f), best)
    assert f.error == pytest.approx(err, rel=1e-6)


# --- parameter checks --------------------------------------------------------------------------

BAD = [
    ("nope", 2, {}, r"unknown method 'nope' \(known: linear, concat, slerp, ties, dare_linear"),
    ("linear", 3, {}, r"2 weights for 3 adapters"),
    ("ties", 2, {"density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
    ("ties", 2, {"density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
    ("ties", 2, {"density": float("nan")}, r"density must be in \(0, 1\]"),
    ("slerp", 2, {"t": -0.1}, r"t must be in \[0, 1\], got -0.1"),
    ("slerp", 2, {"t": 1.5}, r"t must be in \[0, 1\], got 1.5"),
    ("ties", 2, {"majority_sign_method": "mean"}, r"majority_sign_method must be 'total' or 'frequency'"),
    ("dare_ties", 2, {"consensus": "mean"}, r"consensus must be 'peft' or 'mergekit', got 'mean'"),
    ("slerp", 2, {"weights": (1.0, -0.5)}, r"slerp weights .* cannot be negative"),
    ("slerp", 3, {"weights": (0.0, 0.0, 0.0)}, r"slerp of 3 adapters needs weights with a positive sum"),
    ("slerp", 1, {"weights": (1.0,)}, r"slerp' needs at least 2 adapters"),
    ("linear", 2, {"rank": 0}, r"rank must be a positive integer, got 0"),
    ("linear", 2, {"rank": 2.5}, r"rank must be a positive integer"),
    ("dare_linear", 2, {"seed": -1}, r"seed must be a non-negative integer"),
    ("linear", 2, {"space": "tensors"}, r"space must be one of delta, factors, core"),
    ("linear", 2, {"weights": (1.0, float("inf"))}, r"weights must be finite numbers"),
]


@pytest.mark.parametrize("method,n,change,message", BAD)
def test_bad_params_raise_fusion_error(method, n, change, message):
    p = replace(ModuleParams(weights=(0.5, 0.5)), **change)
    with pytest.raises(FusionError, match=message):
        check_params(method, n, p)
    srcs = [make_source(2, i) for i in range(n)]
    with pytest.raises(FusionError, match=message):
        fuse_module(srcs, SHAPE, method, p, NAME)


def test_good_params_pass():
    for name, m in METHODS.items():
        n = max(2, m.min_adapters)
        check_params(name, n, ModuleParams(weights=(0.5,) * n, density=0.3, t=1.0, rank=4, seed=3))
        assert m.name == name and m.summary and "weights" in m.params


def test_source_shape_mismatch_is_named():
    bad = make_source(4, 1, (32, 40))
    with pytest.raises(FusionError, match=r"q_proj: adapter 2 has factors A \(4, 40\)"):
        fuse_module([make_source(4, 2), bad], SHAPE, "linear", ModuleParams(weights=(1, 1)), NAME)


# --- the fast paths, held to the slow references --------------------------------------------------

import pipeline.methods.dense as dense_mod  # noqa: E402
import pipeline.methods.lowrank as lowrank_mod  # noqa: E402
from pipeline.methods import (dense_delta, magnitude_threshold, merge_dense,  # noqa: E402
                              merge_task_vectors, refactor_dense, source_rng)

ELECTIONS = [("total", "peft"), ("frequency", "peft"), ("total", "mergekit"), ("frequency", "mergekit")]
COMBOS = [(None, None, "peft"), ("magnitude", None, "peft"), ("random", None, "peft"),
          *[(sp, el, c) for sp in ("magnitude", "random", None) for el, c in ELECTIONS]]


def _reference_merge(srcs, w, shape, sparsify, density, elect, consensus="peft", seed=5):
    rngs = [source_rng(seed, NAME, i) for i in range(len(srcs))]
    return merge_task_vectors((dense_delta(s, shape) for s in srcs), w, sparsify=sparsify,
                              density=density, elect=elect, consensus=consensus, rngs=rngs)


def _fast_merge(srcs, w, shape, sparsify, density, elect, consensus="peft", seed=5):
    rngs = [source_rng(seed, NAME, i) for i in range(len(srcs))]
    return merge_dense(srcs, w, shape, sparsify=sparsify, density=density, elect=elect,
                       consensus=consensus, rngs=rngs)


@pytest.mark.parametrize("sparsify,elect,consensus", COMBOS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("shape,density", [((32, 48), 0.3), ((300, 700), 0.55), ((97, 1500), 1.0)])
def test_blocked_merge_equals_the_dense_reference_entry_for_entry(monkeypatch, sparsify, elect, consensus, n,
                                                                  shape, density):
    """merge_dense (row blocks, in-place ops, sign flips by bit, selected threshold) gives the same
    float32 numbers as merge_task_vectors on the whole dense deltas; small blocks force many of them,
    and the bracketed threshold selection runs on every module."""
    monkeypatch.setattr(lowrank_mod, "BLOCK", 1000)
    monkeypatch.setattr(dense_mod, "GEMM_BLOCK", 300)
    monkeypatch.setattr(dense_mod, "EXACT_SELECT", 0)
    srcs = [make_source(3 + 2 * i, 40 + i, shape) for i in range(n)]
    w = (1.0, -0.7, 0.5, 2.0)[:n]
    ref = _reference_merge(srcs, w, shape, sparsify, density, elect, consensus)
    got, norm2 = _fast_merge(srcs, w, shape, sparsify, density, elect, consensus)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, ref)
    assert norm2 == pytest.approx(float(np.sum(ref.astype(np.float64) ** 2)), rel=1e-5)


def test_blocked_merge_with_ties_at_the_threshold_and_zero_votes():
    """Repeated magnitudes (ties at the k-th largest), cancelling sources (zero votes elect +),
    negative and zero weights."""
    a = np.tile(np.array([[1.0, -1.0, 2.0, 0.5]], np.float32), (2, 10))
    b = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    s1, s2 = (a, b), (a, -b)
    shape = (3, 40)
    for w in [(1.0, 1.0), (1.0, -1.0), (0.0, 2.0), (-1.0, -1.0), (0.5, 0.0)]:
        for sparsify, elect, consensus in COMBOS:
            for density in (0.2, 0.5, 0.9):
                ref = _reference_merge([s1, s2], w, shape, sparsify, density, elect, consensus)
                got, _ = _fast_merge([s1, s2], w, shape, sparsify, density, elect, consensus)
                np.testing.assert_array_equal(got, ref)


def ref_ties_many(vals, w, method, consensus):
    """The election and disjoint merge of many sources, vectorised in float64 (``ref_ties_entrywise``
    is too slow for 300 sources)."""
    st = np.stack(vals).astype(np.float64)
    wv = st * np.asarray(w, np.float64)[:, None, None]
    voters = st if consensus == "peft" else wv
    votes = voters.sum(0) if method == "total" else np.sign(voters).sum(0)
    agree = np.sign(voters) == np.where(votes >= 0, 1.0, -1.0)
    divisor = agree.sum(0) if consensus == "peft" else (agree * np.asarray(w)[:, None, None]).sum(0)
    return (wv * agree).sum(0) / np.where(divisor == 0, 1, divisor)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("msm,consensus", ELECTIONS)
def test_three_hundred_adapters_do_not_overflow_the_agreement_count(method, msm, consensus):
    """300 sources, most of them agreeing on most entries: the count of agreeing sources passes 255
    (a uint8 counter wrapped there, giving 256x too large a delta at 256 agreeing sources)."""
    shape = (24, 40)
    base = make_source(2, 1000, shape)
    srcs = [(base[0] + 0.05 * make_source(2, 1001 + i, shape)[0], base[1]) for i in range(300)]
    w = tuple(1.0 + 0.5 * math.sin(i) for i in range(300))
    p = ModuleParams(weights=w, density=0.9, majority_sign_method=msm, consensus=consensus, seed=3)
    sparsify = "magnitude" if method == "ties" else "random"
    ref = _reference_merge(srcs, w, shape, sparsify, p.density, msm, consensus, seed=3)
    got, _ = _fast_merge(srcs, w, shape, sparsify, p.density, msm, consensus, seed=3)
    np.testing.assert_array_equal(got, ref)
    rngs = [source_rng(3, NAME, i) for i in range(300)]
    vals = [ref_prune(dense(s, shape), p.density) if method == "ties" else
            ref_dare(dense(s, shape), p.density, rngs[i]) for i, s in enumerate(srcs)]
    want = ref_ties_many(vals, w, msm, consensus)
    close(ref, want, 1e-5)
    f = fuse_module(srcs, shape, method, replace(p, rank=min(shape)), NAME)
    close(product(f), want, 1e-5)
    agreeing = np.sign(np.stack(vals)) == np.sign(want)
    assert agreeing.sum(0).max() > 256


@pytest.mark.parametrize("exact_below", [0, 10**9])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.97, 1.0])
def test_magnitude_threshold_is_the_kth_largest(exact_below, density):
    s = make_source(16, 3, (400, 900))
    mag = np.abs(dense_delta(s, (400, 900))).ravel()
    thr = magnitude_threshold(s, (400, 900), density, exact_below=exact_below)
    if density >= 1.0:
        assert thr is None
        return
    k = int(density * mag.size)
    assert thr == np.sort(mag)[::-1][k - 1]
    assert np.count_nonzero(mag >= thr) >= k


def test_magnitude_threshold_falls_back_when_the_bracket_misses(monkeypatch):
    """A bracket that cannot hold the k-th largest (forced here) hands over to the full partition."""
    s = make_source(16, 4, (300, 800))
    mag = np.abs(dense_delta(s, (300, 800))).ravel()
    k = int(math.floor(0.4 * mag.size + 0.5))
    calls = []
    real = np.partition

    def spy(x, kth, *a, **kw):
        calls.append(x.size)
        return real(x, kth, *a, **kw)

    monkeypatch.setattr(dense_mod, "SELECT_SIGMAS", -20.0)   # an inverted, empty bracket
    monkeypatch.setattr(dense_mod.np, "partition", spy)
    thr = magnitude_threshold(s, (300, 800), 0.4, exact_below=0)
    assert thr == np.sort(mag)[::-1][k - 1]
    assert calls == [mag.size]                                 # only the full partition ran
    calls.clear()
    monkeypatch.setattr(dense_mod, "SELECT_SIGMAS", 6.0)
    assert magnitude_threshold(s, (300, 800), 0.4, exact_below=0) == thr
    assert len(calls) == 1 and calls[0] < mag.size / 10        # the bracket held: a few candidates


def test_dare_stream_drawn_in_row_blocks_is_the_whole_matrix_stream():
    g1, g2 = source_rng(3, NAME, 1), source_rng(3, NAME, 1)
    whole = g1.random((37, 53), dtype=np.float32)
    parts = []
    for rows in (1, 5, 13, 18):
        buf = np.empty((rows, 53), np.float32)
        g2.random(dtype=np.float32, out=buf)
        parts.append(buf)
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_masking_error_is_near_optimal_with_four_sources():
    """The re-factoring of a masked merge (sketch spanning the sources' whole rank, one power
    iteration): within 1% of the best rank-16 error, the recorded error equal to the measured one."""
    shape = (384, 1024)
    srcs = [make_source(16, 60 + i, shape) for i in range(4)]
    for method in ("magnitude_prune", "ties", "dare_linear"):
        p = ModuleParams(weights=(1.0,) * 4, density=0.5, seed=2)
        f = fuse_module(srcs, shape, method, p, NAME)
        ref = ref_masking_delta(method, srcs, p, seed=2) if method != "ties" else \
            ref_ties_vectorised([_prune_fast(dense(s, shape), 0.5) for s in srcs])
        measured = np.linalg.norm(ref - product(f)) / np.linalg.norm(ref)
        assert f.rank == 16
        assert f.error == pytest.approx(measured, rel=1e-4)
        assert optimal_error(ref, 16) * (1 - 1e-6) <= measured <= 1.01 * optimal_error(ref, 16)


def test_refactor_dense_small_error_comes_from_the_residual():
    """Below ERR_FORMULA the error is the measured residual, not a difference of norms."""
    rng = np.random.default_rng(1)
    m = (rng.standard_normal((200, 6)) @ rng.standard_normal((6, 300))
         + 1e-3 * rng.standard_normal((200, 300))).astype(np.float32)
    f = refactor_dense(m, 6, np.random.default_rng(0), signal_rank=6)
    measured = np.linalg.norm(m - product(f)) / np.linalg.norm(m)
    assert 0 < f.error < 0.01 and f.error == pytest.approx(measured, rel=1e-3)


def test_exact_refactoring_paths_agree(monkeypatch, sources):
    """R from the Gram matrix, R from Householder QR, and the explicit-Q reference give the same
    factors (to float32 rounding); rank-deficient stacks take the explicit-Q path and stay exact."""
    bc, ac = stack_factors(sources, (0.7, -1.3, 0.2), SHAPE)
    ref = dense(sources[0]) * 0.7 - 1.3 * dense(sources[1])
    results = []
    for gram, cmax in [(100.0, 1e8), (0.0, 1e8), (0.0, 0.0)]:
        monkeypatch.setattr(lowrank_mod, "COND_GRAM", gram)
        monkeypatch.setattr(lowrank_mod, "COND_MAX", cmax)
        for rank in (None, 5):
            f = refactor_exact(bc, ac, rank)
            results.append((rank, f))
            if rank is None:
                close(product(f), ref, 1e-6)
    for rank in (None, 5):
        fs = [f for r, f in results if r == rank]
        for f in fs[1:]:
            assert f.rank == fs[0].rank and f.error == pytest.approx(fs[0].error, rel=1e-9, abs=1e-12)
            np.testing.assert_allclose(f.a, fs[0].a, atol=1e-6)
            np.testing.assert_allclose(f.b, fs[0].b, atol=1e-6 * np.abs(fs[0].b).max())
    monkeypatch.undo()
    s = make_source(6, 9)
    bc, ac = stack_factors([s, s], (0.5, 0.5), SHAPE)              # rank 6 of 12: deficient
    assert lowrank_mod._triangular(bc) is None
    f = refactor_exact(bc, ac)
    assert f.rank == 6
    close(product(f), dense(s), 1e-6)


def test_fused_module_does_not_alias_the_workspace(sources):
    p = ModuleParams(weights=(1.0, 1.0, 1.0), density=0.5)
    f1 = fuse_module(sources, SHAPE, "ties", p, NAME)
    a1, b1 = f1.a.copy(), f1.b.copy()
    fuse_module([make_source(8, 70), make_source(8, 71), None], SHAPE, "dare_ties", p, NAME)
    np.testing.assert_array_equal(f1.a, a1)
    np.testing.assert_array_equal(f1.b, b1)
