"""Core space and the mergekit methods (della, della_linear, breadcrumbs, breadcrumbs_ties) against
slow float64 references written here from the definitions (docs/methods.md), on small random
adapters with mixed ranks and scales."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import FusionError
from pipeline.methods import METHODS, ModuleParams, check_params, fuse_module
from pipeline.methods import core_space
from pipeline.methods.gta import breadcrumbs_prune, della_probabilities, della_prune, l1_rescale
from test_methods import (NAME, SHAPE, close, dense, make_source, product, ref_dare, ref_prune, ref_rng,
                          ref_ties_entrywise)

CORE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "della", "della_linear",
        "breadcrumbs", "breadcrumbs_ties")
GTA = ("della", "della_linear", "breadcrumbs", "breadcrumbs_ties")
W = (0.7, -0.4, 1.3, 0.9)


@pytest.fixture(scope="module")
def sources():
    """Four adapters on one module: ranks 3, 6 and 2 with scales 2, 0.5 and 1, and one lacking it."""
    return [make_source(3, 11, scale=2.0), make_source(6, 12, scale=0.5), None, make_source(2, 13)]


# --- the references ------------------------------------------------------------------------------

def ref_bases(srcs):
    """The SVD bases of the stacked B's and A's (all singular vectors, float64), each vector's sign
    such that the largest-magnitude entry of its partner on the other side of the SVD is positive."""
    present = [s for s in srcs if s is not None]
    bs = np.hstack([s[1].astype(np.float64) for s in present])
    as_ = np.vstack([s[0].astype(np.float64) for s in present])
    out = []
    for x in (bs, as_.T):
        q, _, partner = np.linalg.svd(x, full_matrices=False)
        for j in range(q.shape[1]):
            if partner[j, np.argmax(np.abs(partner[j]))] < 0:
                q[:, j] = -q[:, j]
        out.append(q)
    return tuple(out)


def ref_della_probs(x, d, eps):
    """Per row, rank 1 = smallest |x|: p = d - eps + 2 eps (rank - 1) / (cols - 1)."""
    p = np.empty(x.shape)
    n = x.shape[1]
    for r in range(x.shape[0]):
        order = sorted(range(n), key=lambda j: abs(x[r, j]))
        for rank, j in enumerate(order):
            p[r, j] = d - eps + 2 * eps * rank / (n - 1)
    return p


def ref_della(x, d, eps, rng):
    if d >= 1:
        return x
    keep = rng.random(x.shape, dtype=np.float32) < ref_della_probs(x, d, eps)
    m = np.where(keep, x, 0.0)
    before, after = np.abs(x).sum(), np.abs(m).sum()
    return m if before < 1e-7 or after < 1e-7 else m * before / after


def ref_breadcrumbs(x, d, gamma):
    """mergekit 0.1.5: sort |x| ascending, keep positions [n_bot, n_bot + int(d n))."""
    if d >= 1:
        return x
    flat = np.abs(x).ravel()
    n = flat.size
    target, n_top = int(d * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    keep = np.zeros(n, bool)
    keep[np.argsort(flat, kind="stable")[n_bot:n_bot + target]] = True
    return np.where(keep.reshape(x.shape), x, 0.0)


def ref_gta(vals, w, msm, normalize):
    """mergekit's consensus, entry by entry, on the weighted values y_i = w_i x_i."""
    out = np.zeros(vals[0].shape)
    for idx in np.ndindex(out.shape):
        y = [wi * x[idx] for wi, x in zip(w, vals)]
        vote = sum(y) if msm == "total" else sum(np.sign(e) for e in y)
        sign = 1 if vote >= 0 else -1
        agree = [i for i, e in enumerate(y) if np.sign(e) == sign]
        total = sum(y[i] for i in agree)
        div = sum(w[i] for i in agree)
        out[idx] = total / (div if div != 0 else 1) if normalize else total
    return out


def ref_merge(method, tensors, w, p, idx, name=NAME):
    """The element-wise merge of ``method`` on ``tensors`` (float64), source streams by ``idx``."""
    rngs = [ref_rng(p.seed, name, i) for i in idx]
    if method == "linear":
        return sum(wi * x for wi, x in zip(w, tensors))
    if method in ("ties", "magnitude_prune", "dare_linear", "dare_ties"):
        if method in ("ties", "magnitude_prune"):
            vals = [ref_prune(x, p.density) for x in tensors]
        else:
            vals = [x if p.density >= 1 else ref_dare(x, p.density, r) for x, r in zip(tensors, rngs)]
        if method in ("ties", "dare_ties"):
            return ref_ties_entrywise(vals, w, p.majority_sign_method, p.consensus)
        return sum(wi * x for wi, x in zip(w, vals))
    if method.startswith("della"):
        vals = [ref_della(x, p.density, p.epsilon, r) for x, r in zip(tensors, rngs)]
    else:
        vals = [ref_breadcrumbs(x, p.density, p.gamma) for x in tensors]
    if method.endswith("linear") or method == "breadcrumbs":
        return sum(wi * x for wi, x in zip(w, vals))
    return ref_gta(vals, w, p.majority_sign_method, normalize=method == "della")


def ref_core(method, srcs, p, name=NAME, shape=SHAPE):
    """Cores from the DENSE deltas, M_i = Q_B^T dW_i Q_A, merged, mapped back: Q_B M Q_A^T."""
    q_b, q_a = ref_bases(srcs)
    idx = [i for i, s in enumerate(srcs) if s is not None]
    ms = [q_b.T @ dense(srcs[i], shape) @ q_a for i in idx]
    return q_b @ ref_merge(method, ms, [p.weights[i] for i in idx], p, idx, name) @ q_a.T


def ref_delta(method, srcs, p, name=NAME, shape=SHAPE):
    idx = [i for i, s in enumerate(srcs) if s is not None]
    return ref_merge(method, [dense(srcs[i], shape) for i in idx], [p.weights[i] for i in idx], p, idx, name)


def params(method, **kw):
    kw.setdefault("weights", W)
    kw.setdefault("space", "core")
    if method.startswith("della"):
        kw.setdefault("density", 0.5)
        kw.setdefault("epsilon", 0.2)
    return ModuleParams(**kw)


# --- core space against the reference ------------------------------------------------------------

@pytest.mark.parametrize("method", CORE)
@pytest.mark.parametrize("density", [0.3, 0.6, 1.0])
def test_core_space_matches_the_dense_reference(sources, method, density):
    if method.startswith("della") and density == 0.3:
        density = 0.35          # density - epsilon must stay above 0
    p = params(method, density=density, seed=3)
    f = fuse_module(sources, SHAPE, method, p, NAME)
    close(product(f), ref_core(method, sources, p), tol=1e-5)
    assert f.error == 0.0 and f.rank <= 3 + 6 + 2


@pytest.mark.parametrize("method,consensus", [("ties", "peft"), ("ties", "mergekit"), ("dare_ties", "peft"),
                                              ("dare_ties", "mergekit"), ("della", "peft"),
                                              ("breadcrumbs_ties", "peft")])   # the last two ignore consensus
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_core_space_elections_match_the_reference(sources, method, msm, consensus):
    p = params(method, density=0.5, majority_sign_method=msm, consensus=consensus, seed=1)
    close(product(fuse_module(sources, SHAPE, method, p, NAME)), ref_core(method, sources, p), tol=1e-5)


def test_core_space_linear_is_the_plain_weighted_sum(sources):
    want = sum(w * dense(s) for s, w in zip(sources, W))
    f = fuse_module(sources, SHAPE, "linear", params("linear"), NAME)
    close(product(f), want, tol=1e-6)
    assert f.rank == 3 + 6 + 2 and f.error == 0.0


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "dare_ties", "della",
                                    "breadcrumbs", "breadcrumbs_ties"])
def test_density_one_in_core_space_is_linear_where_the_method_is(sources, method):
    """At density 1 nothing is dropped: the weighted sum for the methods without election."""
    p = params(method, density=1.0)
    got = product(fuse_module(sources, SHAPE, method, p, NAME))
    if method in ("magnitude_prune", "dare_linear", "breadcrumbs"):
        close(got, sum(w * dense(s) for s, w in zip(sources, W)), tol=1e-6)
    else:
        close(got, ref_core(method, sources, p), tol=1e-5)


@pytest.mark.parametrize("method", CORE)
def test_core_space_is_invariant_to_sign_flips_of_the_basis(monkeypatch, sources, method):
    """Element-wise methods depend on the basis, but not on the signs of its vectors (with the
    ``total`` election; a tied ``frequency`` vote elects +, which a flip does not follow)."""
    p = params(method, density=0.5, seed=2)
    want = product(fuse_module(sources, SHAPE, method, p, NAME))
    rng = np.random.default_rng(9)
    plain = core_space.basis_pair

    def flipped(*stacks):
        return tuple(q.times(np.diag(rng.choice([-1.0, 1.0], q.q.shape[1]))) for q in plain(*stacks))

    monkeypatch.setattr(core_space, "basis_pair", flipped)
    close(product(fuse_module(sources, SHAPE, method, p, NAME)), want, tol=1e-6)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties"])
def test_deterministic_methods_are_invariant_to_permutations_of_the_basis(monkeypatch, sources, method):
    p = params(method, density=0.4)
    want = product(fuse_module(sources, SHAPE, method, p, NAME))
    plain = core_space.basis_pair

    def permuted(*stacks):
        rng = np.random.default_rng(4)
        return tuple(q.times(np.eye(q.q.shape[1])[:, rng.permutation(q.q.shape[1])]) for q in plain(*stacks))

    monkeypatch.setattr(core_space, "basis_pair", permuted)
    close(product(fuse_module(sources, SHAPE, method, p, NAME)), want, tol=1e-6)


def test_another_basis_of_the_same_spans_changes_ties(monkeypatch, sources):
    """QR bases span the same spaces but give another TIES result: the SVD bases are the definition."""
    p = params("ties", density=0.3)
    want = product(fuse_module(sources, SHAPE, "ties", p, NAME))
    plain = core_space.basis_pair
    rotation = [np.linalg.qr(np.random.default_rng(i).normal(size=(11, 11)))[0] for i in (1, 2)]
    monkeypatch.setattr(core_space, "basis_pair",
                        lambda *stacks: tuple(q.times(g) for q, g in zip(plain(*stacks), rotation)))
    got = product(fuse_module(sources, SHAPE, "ties", p, NAME))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) > 0.05


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_one_adapter_at_density_one_gives_w_times_itself(method):
    s = make_source(5, 21, scale=1.5)
    p = params(method, weights=(0.6,), density=1.0)
    close(product(fuse_module([s], SHAPE, method, p, NAME)), 0.6 * dense(s) if method != "della"
          else dense(s), tol=1e-6)   # della divides by the agreeing weight: dW itself


def test_none_behaves_like_a_zero_delta_under_linear(sources):
    zero = (np.zeros((4, SHAPE[1]), np.float32), np.zeros((SHAPE[0], 4), np.float32))
    want = W[0] * dense(sources[0]) + W[1] * dense(sources[1])
    p = params("linear", weights=W[:3])
    for third in (None, zero):
        close(product(fuse_module([sources[0], sources[1], third], SHAPE, "linear", p, NAME)), want, tol=1e-6)


def test_core_space_rank_truncation_is_eckart_young(sources):
    p = params("ties", density=0.5)
    full = ref_core("ties", sources, p)
    f = fuse_module(sources, SHAPE, "ties", params("ties", density=0.5, rank=3), NAME)
    u, s, vt = np.linalg.svd(full)
    close(product(f), (u[:, :3] * s[:3]) @ vt[:3], tol=1e-5)
    assert f.rank == 3
    assert math.isclose(f.error, math.sqrt(np.sum(s[3:] ** 2) / np.sum(s ** 2)), rel_tol=1e-5)


def test_core_space_never_forms_a_dense_module():
    """A module of 4e9 entries (16 GB dense in float32) fuses in core space in well under a second's
    worth of memory: only (out + in) x R and R x R arrays are formed."""
    shape = (80_000, 50_000)
    srcs = [make_source(3, 31, shape=shape), make_source(2, 32, shape=shape)]
    f = fuse_module(srcs, shape, "ties", params("ties", weights=(1.0, 0.5), density=0.5), NAME)
    assert f.b.shape[0] == shape[0] and f.a.shape[1] == shape[1] and 1 <= f.rank <= 5


def test_all_missing_gives_one_zero_pair_in_core_space():
    f = fuse_module([None, None], SHAPE, "ties", params("ties", weights=(1.0, 1.0)), NAME)
    assert f.rank == 1 and not f.a.any() and not f.b.any()


@pytest.mark.parametrize("method", ["dare_ties", "della", "della_linear"])
@pytest.mark.parametrize("space", ["core", "delta"])
def test_random_methods_are_reproducible_per_seed(sources, method, space):
    p = params(method, density=0.5, space=space, seed=7)
    one, two = (fuse_module(sources, SHAPE, method, p, NAME) for _ in range(2))
    assert one.a.tobytes() == two.a.tobytes() and one.b.tobytes() == two.b.tobytes()
    other = fuse_module(sources, SHAPE, method, params(method, density=0.5, space=space, seed=8), NAME)
    assert not np.allclose(product(other), product(one))


# --- della and breadcrumbs in delta space --------------------------------------------------------

@pytest.mark.parametrize("method", GTA)
@pytest.mark.parametrize("density", [0.35, 0.7])
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_delta_space_matches_the_dense_reference(sources, method, density, msm):
    p = params(method, density=density, space="delta", rank=min(SHAPE), majority_sign_method=msm, seed=5)
    f = fuse_module(sources, SHAPE, method, p, NAME)
    close(product(f), ref_delta(method, sources, p), tol=2e-5)


def test_della_at_density_one_is_mergekit_ties_at_density_one(sources):
    p = params("della", density=1.0, space="delta", rank=min(SHAPE))
    want = product(fuse_module(sources, SHAPE, "ties", ModuleParams(weights=W, consensus="mergekit",
                                                                   rank=min(SHAPE)), NAME))
    close(product(fuse_module(sources, SHAPE, "della", p, NAME)), want, tol=1e-6)


def test_della_probabilities_are_the_definition_and_average_to_density():
    x = np.random.default_rng(0).normal(size=(7, 11))
    p = della_probabilities(x, 0.4, 0.15)
    np.testing.assert_allclose(p, ref_della_probs(x, 0.4, 0.15), rtol=0, atol=1e-12)
    np.testing.assert_allclose(p.mean(axis=1), 0.4, rtol=0, atol=1e-12)
    assert math.isclose(p.min(), 0.25) and math.isclose(p.max(), 0.55)
    np.testing.assert_array_equal(della_probabilities(x[:, :1], 0.4, 0.15), 0.4)


def test_della_l1_rescale_is_exact_and_keeps_a_subset():
    x = np.random.default_rng(1).normal(size=(30, 40))
    for seed in range(5):
        y = della_prune(x, 0.5, 0.2, np.random.default_rng(seed))
        assert math.isclose(np.abs(y).sum(), np.abs(x).sum(), rel_tol=1e-12)
        assert np.all((y == 0) | (np.sign(y) == np.sign(x)))
        np.testing.assert_allclose(y[y != 0] / x[y != 0], np.abs(x).sum() / np.abs(np.where(y != 0, x, 0)).sum())
    tiny = np.full((3, 3), 1e-9)
    np.testing.assert_array_equal(l1_rescale(tiny, tiny * [1, 0, 1]), tiny * [1, 0, 1])


def test_della_keep_frequency_matches_the_probabilities():
    """Over n draws each position is kept ~Binomial(n, p): every frequency within 5 sigma of p."""
    x = np.random.default_rng(2).normal(size=(6, 25))
    p = della_probabilities(x, 0.5, 0.3)
    n = 4000
    rng = np.random.default_rng(3)
    kept = sum((della_prune(x, 0.5, 0.3, rng) != 0).astype(int) for _ in range(n))
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(kept - n * p) < 5 * sigma), np.abs(kept - n * p).max() / sigma.max()
    # the magnitude ranking matters: the largest entry of each row is kept more often than the smallest
    rows = np.arange(6)
    assert np.all(kept[rows, np.abs(x).argmax(1)] > kept[rows, np.abs(x).argmin(1)])


@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.1), (0.95, 0.1), (0.2, 0.0)])
def test_breadcrumbs_counts_are_exact(density, gamma):
    x = np.random.default_rng(4).normal(size=(20, 30))
    n = x.size
    y = breadcrumbs_prune(x, density, gamma)
    assert np.count_nonzero(y) == int(density * n)
    n_top = min(int(gamma * n), n - int(density * n))      # the cut shrinks when density + gamma > 1
    order = np.argsort(np.abs(x).ravel())
    assert not y.ravel()[order[n - n_top:]].any()
    np.testing.assert_array_equal(y, ref_breadcrumbs(x, density, gamma))
    np.testing.assert_array_equal(breadcrumbs_prune(x, 1.0, gamma), x)


def test_breadcrumbs_of_one_adapter_is_w_times_its_mask():
    s = make_source(4, 41)
    p = params("breadcrumbs", weights=(0.8,), density=0.4, gamma=0.05, space="delta", rank=min(SHAPE))
    close(product(fuse_module([s], SHAPE, "breadcrumbs", p, NAME)), 0.8 * ref_breadcrumbs(dense(s), 0.4, 0.05),
          tol=2e-5)


def test_breadcrumbs_ties_sums_the_agreeing_entries():
    """mergekit's breadcrumbs_ties does not divide (normalize: false): two equal adapters at weights 1
    give twice the masked delta, della (normalize: true) gives it once."""
    s = make_source(4, 42)
    for method, factor in (("breadcrumbs_ties", 2.0), ("della", 1.0)):
        p = params(method, weights=(1.0, 1.0), density=1.0, space="delta", rank=min(SHAPE))
        close(product(fuse_module([s, s], SHAPE, method, p, NAME)), factor * dense(s), tol=2e-5)


def test_della_refuses_keep_probabilities_outside_zero_one():
    for d, eps in ((0.1, 0.15), (0.9, 0.15)):
        with pytest.raises(FusionError, match="density - epsilon > 0 and density \\+ epsilon < 1"):
            check_params("della", 2, ModuleParams(weights=(1, 1), density=d, epsilon=eps))
    check_params("della", 2, ModuleParams(weights=(1, 1), density=1.0, epsilon=0.15))


def test_registry_offers_core_space_for_the_element_wise_methods():
    assert [m for m in METHODS if "core" in METHODS[m].spaces] == list(CORE)
    with pytest.raises(FusionError, match="slerp.*not space 'core'"):
        check_params("slerp", 2, ModuleParams(weights=(0.5, 0.5), space="core"))


@pytest.mark.parametrize("case", ["well-conditioned", "rank-deficient", "wide"])
def test_left_singular_vectors_are_the_svds_up_to_signs(case):
    rng = np.random.default_rng(5)
    x = {"well-conditioned": rng.normal(size=(40, 6)),
         "rank-deficient": np.hstack([rng.normal(size=(40, 3))] * 2),
         "wide": rng.normal(size=(5, 9))}[case]
    u = core_space.left_singular_vectors(x)
    want, s, _ = np.linalg.svd(x, full_matrices=False)
    assert u.shape == want.shape
    keep = s > 1e-10 * s[0]                # null directions of a rank-deficient x are arbitrary
    np.testing.assert_allclose(np.abs(np.sum(u[:, keep] * want[:, keep], axis=0)), 1.0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["well-conditioned", "rank-deficient", "wide"])
def test_a_basis_known_by_its_gram_matrix_acts_as_the_formed_one(case):
    """The cores' products ``Q^T x_cols`` and the mapping back ``Q m`` agree with the formed ``Q``
    on both paths: the Gram map (well-conditioned) and the SVD (anything else)."""
    rng = np.random.default_rng(8)
    x = {"well-conditioned": rng.normal(size=(40, 6)),
         "rank-deficient": np.hstack([rng.normal(size=(40, 3))] * 2),
         "wide": rng.normal(size=(5, 9))}[case]
    basis = core_space.Basis(x)
    assert (basis.w is not None) == (case == "well-conditioned")
    q = basis.q
    want, _, _ = np.linalg.svd(x, full_matrices=False)
    assert q.shape == want.shape
    cols = slice(1, 4)
    np.testing.assert_allclose(basis.t_cols(cols), q.T @ x[:, cols], rtol=0, atol=1e-10)
    m = rng.normal(size=(q.shape[1], 3))
    np.testing.assert_allclose(basis.apply(m), q @ m, rtol=0, atol=1e-10)
    g = np.linalg.qr(rng.normal(size=(q.shape[1],) * 2))[0]
    np.testing.assert_allclose(basis.times(g).q, q @ g, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_an_adapter_fused_with_itself_gives_it_back_in_core_space(method):
    """The stacks [B, B] and [A; A] are rank-deficient: the SVD path, half of each core's entries zero."""
    s = make_source(4, 51, scale=1.3)
    p = params(method, weights=(1.0, 1.0), density=1.0)
    factor = 2.0 if method == "breadcrumbs_ties" else 1.0
    close(product(fuse_module([s, s], SHAPE, method, p, NAME)), factor * dense(s), tol=1e-6)


def test_della_row_order_is_the_stable_sort_with_ties():
    from pipeline.methods.gta import stable_row_order

    x = np.abs(np.round(np.random.default_rng(6).normal(size=(50, 300)) * 8) / 8).astype(np.float32)
    np.testing.assert_array_equal(stable_row_order(x), np.argsort(x, axis=1, kind="stable"))


def test_fusion_fuse_in_core_space_and_della_on_the_command_line(tmp_path):
    """The real command: --space core and --epsilon reach the record; the same command gives the same
    bytes; a della density the epsilon does not fit is one error line and exit 2, nothing written."""
    import json

    from conftest import make_mlx_adapter, module_shapes, run_cli, tree_bytes

    a, _ = make_mlx_adapter(tmp_path / "a", rank=4, scale=2.0, seed=1)
    shapes = module_shapes()
    shapes.pop("model.layers.1.mlp.down_proj")
    b, _ = make_mlx_adapter(tmp_path / "b", shapes=shapes, rank=8, scale=1.0, seed=2)
    args = ["fuse", a, b, "--method", "della", "--space", "core", "--density", "0.5", "--epsilon", "0.2",
            "--seed", "3", "--weights", "0.7,1.2"]
    outs = []
    for name in ("one", "two"):
        r = run_cli(*args, "--out", tmp_path / name)
        assert r.returncode == 0, r.stdout + r.stderr
        outs.append(tree_bytes(tmp_path / name))
    assert outs[0] == outs[1]
    rec = json.loads((tmp_path / "one" / "fusion.json").read_text())
    assert rec["method"] == "della" and rec["params"]["space"] == "core" and rec["params"]["epsilon"] == 0.2
    assert rec["output"]["max_error"] == 0.0 and rec["output"]["rank"] <= 12
    r = run_cli("fuse", a, b, "--method", "della", "--density", "0.1", "--out", tmp_path / "bad")
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "epsilon" in r.stderr
    assert not (tmp_path / "bad").exists()
