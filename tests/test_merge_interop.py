"""TIES, DARE and magnitude pruning against the real PEFT and mergekit code, on dense deltas.

Optional: needs the ``peft`` extra (PEFT's tests) and the ``mergekit`` extra (mergekit's tests),
``pip install -e '.[peft,mergekit]'`` (the CPU build of torch); a test whose library is absent is
skipped. No weights are downloaded.

What is compared: our dense merge (``merge_dense``, the blocked kernel every fusion runs) with
``peft.utils.merge_utils.ties / dare_ties / magnitude_prune / dare_linear`` (``consensus: peft``, the
default) and with mergekit's ``ties`` and ``dare_ties`` (``consensus: mergekit``), on the same
float32 dense deltas, with weights other than 1. The random streams of DARE differ between the
libraries, so each library is fed our masks: PEFT's ``torch.bernoulli`` draw is replaced by our
mask (PEFT still multiplies by it and divides by the density itself); mergekit's sparsifier is
replaced by our DARE (mergekit's own rescales the survivors to the delta's L1 norm instead of
dividing by the density), so what is tested there is everything after the mask: weights, sign
election, divisor. mergekit's ``della`` / ``della_linear`` (its probabilities checked equal to ours, its
Bernoulli draw replaced by our mask) and ``breadcrumbs`` / ``breadcrumbs_ties`` (deterministic: the
same numbers). Then a whole fusion: PEFT's ``add_weighted_adapter(combination_type="ties_svd")``
on a tiny Llama against ``fusion fuse --method ties`` of the same two adapters.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# PEFT calls a transformers method that transformers has renamed (noise, not about merging)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

from conftest import run_cli  # noqa: E402
from pipeline.methods import dense_delta, merge_dense, source_rng  # noqa: E402

SHAPE = (96, 160)  # (out, in)
NAME = "model.layers.1.mlp.down_proj"
WEIGHTS = [(0.7, -0.4, 1.3), (1.0, 1.0, 1.0), (0.2, 0.5, 0.3)]
DENSITIES = [0.3, 0.5, 1.0]
SEED = 4


@pytest.fixture(scope="module")
def sources():
    """Three adapters' factors on one module (ranks 4, 6, 8; the scale folded into B)."""
    rng = np.random.default_rng(0)
    out = []
    for r in (4, 6, 8):
        a = rng.normal(0, 1 / np.sqrt(SHAPE[1]), (r, SHAPE[1])).astype(np.float32)
        b = rng.normal(0, 0.5, (SHAPE[0], r)).astype(np.float32)
        out.append((a, b))
    return out


@pytest.fixture(scope="module")
def deltas(sources):
    """The float32 dense deltas ``B @ A`` both sides merge (the ones our kernel computes)."""
    return [dense_delta(s, SHAPE) for s in sources]


@pytest.fixture
def peft_merge():
    return pytest.importorskip("peft.utils.merge_utils")


@pytest.fixture
def mergekit_gta():
    return pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")


def ours(sources, weights, sparsify, density, elect, consensus="peft"):
    rngs = [source_rng(SEED, NAME, i) for i in range(len(sources))]
    merged, _ = merge_dense(sources, weights, SHAPE, sparsify=sparsify, density=density, elect=elect,
                            consensus=consensus, rngs=rngs)
    return merged


def our_masks(n, density):
    """Source i's DARE keep-mask as our kernel draws it (its stream, in row order)."""
    return [source_rng(SEED, NAME, i).random(SHAPE, dtype=np.float32) < np.float32(density)
            for i in range(n)]


def same_numbers(got: np.ndarray, want, what: str):
    """Equal to float32 rounding of a different summation order (at most a few ulps), and in fact
    equal entry for entry in all cases measured here."""
    want = want.detach().numpy() if hasattr(want, "detach") else want
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()), err_msg=what)
    assert np.array_equal(got, want), f"{what}: close but not equal entry for entry"


def relative_difference(x, y) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.fixture
def bernoulli_from(monkeypatch):
    """Replace ``torch.bernoulli`` by a draw that returns the given masks, one per call, in order."""
    def install(masks):
        queue = list(masks)

        def draw(probs, *args, **kwargs):
            assert queue, "more masks drawn than there are sources"
            mask = queue.pop(0)
            assert tuple(probs.shape) == mask.shape
            return torch.from_numpy(mask.astype(np.float32))

        monkeypatch.setattr(torch, "bernoulli", draw)
        return queue
    return install


# --- PEFT: consensus peft (the default) ------------------------------------------------------------

@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_ties_is_peft_ties(peft_merge, sources, deltas, weights, density, msm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        want = peft_merge.ties([torch.from_numpy(d) for d in deltas], torch.tensor(weights), density, msm)
    got = ours(sources, weights, "magnitude", density, msm)
    same_numbers(got, want, f"ties {weights} {density} {msm}")


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", DENSITIES)
def test_magnitude_prune_is_peft_magnitude_prune(peft_merge, sources, deltas, weights, density):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = peft_merge.magnitude_prune([torch.from_numpy(d) for d in deltas], torch.tensor(weights), density)
    same_numbers(ours(sources, weights, "magnitude", density, None), want, f"magnitude_prune {weights} {density}")


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_dare_ties_is_peft_dare_ties_with_the_same_masks(peft_merge, bernoulli_from, sources, deltas,
                                                         weights, density, msm):
    left = bernoulli_from(our_masks(len(deltas), density))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = peft_merge.dare_ties([torch.from_numpy(d) for d in deltas], torch.tensor(weights), density, msm)
    assert not left or density >= 1.0          # every mask was used (none drawn at density 1)
    same_numbers(ours(sources, weights, "random", density, msm), want, f"dare_ties {weights} {density} {msm}")


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", DENSITIES)
def test_dare_linear_is_peft_dare_linear_with_the_same_masks(peft_merge, bernoulli_from, sources, deltas,
                                                             weights, density):
    bernoulli_from(our_masks(len(deltas), density))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = peft_merge.dare_linear([torch.from_numpy(d) for d in deltas], torch.tensor(weights), density)
    same_numbers(ours(sources, weights, "random", density, None), want, f"dare_linear {weights} {density}")


def test_the_conventions_differ_where_the_weights_are_not_one(sources):
    """With weights [0.7, -0.4, 1.3] the two conventions are far apart (so the tests above and
    below tell them apart); with weights 1 they are the same numbers."""
    w = (0.7, -0.4, 1.3)
    peft, mk = (ours(sources, w, "magnitude", 0.5, "total", c) for c in ("peft", "mergekit"))
    assert relative_difference(mk, peft) > 0.2
    ones = [ours(sources, (1.0, 1.0, 1.0), "magnitude", 0.5, "total", c) for c in ("peft", "mergekit")]
    np.testing.assert_array_equal(*ones)


# --- mergekit: consensus mergekit ------------------------------------------------------------------

def mergekit_ties(gta, msm: str):
    """mergekit's ``ties`` (sign election ``sum``); for ``frequency`` the same class with its
    ``count`` election, which mergekit's registry does not expose by name."""
    from mergekit.merge_methods import registry

    if msm == "total":
        return registry.get("ties")
    return gta.GeneralizedTaskArithmeticMerge(
        consensus_method=gta.ConsensusMethod.count, sparsification_method=gta.SparsificationMethod.magnitude,
        default_normalize=True, default_rescale=False, method_name="ties_count",
        method_pretty_name=None, method_reference_url=None)


def run_mergekit(method, deltas, weights, density, **parameters):
    """mergekit's merge of the task vectors ``deltas`` over a zero base (so base + merge = merge)."""
    from mergekit.merge_methods.api import merge_tensors

    tensors = [torch.zeros(SHAPE, dtype=torch.float32)] + [torch.from_numpy(d) for d in deltas]
    return merge_tensors(tensors, method, base_index=0,
                         parameters={"weight": list(weights), "density": density, **parameters})


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("msm", ["total", "frequency"])
def test_ties_consensus_mergekit_is_mergekit_ties(mergekit_gta, sources, deltas, weights, density, msm):
    want = run_mergekit(mergekit_ties(mergekit_gta, msm), deltas, weights, density)
    got = ours(sources, weights, "magnitude", density, msm, "mergekit")
    same_numbers(got, want, f"mergekit ties {weights} {density} {msm}")


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", DENSITIES)
def test_dare_ties_consensus_mergekit_is_mergekit_after_the_mask(monkeypatch, mergekit_gta, sources, deltas,
                                                                 weights, density):
    """mergekit's ``dare_ties`` with ``normalize: true`` (its default is false: no division at all),
    fed our DARE-masked deltas in place of its own sparsifier."""
    from mergekit.merge_methods import registry

    from pipeline.methods import dare_mask

    order = iter(range(len(deltas)))

    def our_dare(delta, density, method, **kw):           # called once per source, in order
        i = next(order)
        assert method == mergekit_gta.SparsificationMethod.random
        np.testing.assert_array_equal(delta.numpy(), deltas[i])
        return torch.from_numpy(dare_mask(delta.numpy(), density, source_rng(SEED, NAME, i)))

    monkeypatch.setattr(mergekit_gta, "sparsify", our_dare)
    want = run_mergekit(registry.get("dare_ties"), deltas, weights, density, normalize=True)
    got = ours(sources, weights, "random", density, "total", "mergekit")
    same_numbers(got, want, f"mergekit dare_ties {weights} {density}")


def test_mergekit_and_peft_differ_as_the_issue_measured(mergekit_gta, peft_merge, sources, deltas):
    """The real libraries themselves disagree for weights other than 1; each of our conventions
    sides with one of them."""
    w = (0.7, -0.4, 1.3)
    mk = run_mergekit(mergekit_ties(mergekit_gta, "total"), deltas, w, 0.5).numpy()
    pf = peft_merge.ties([torch.from_numpy(d) for d in deltas], torch.tensor(w), 0.5, "total").numpy()
    assert relative_difference(mk, pf) > 0.2
    assert np.array_equal(ours(sources, w, "magnitude", 0.5, "total", "mergekit"), mk)
    assert np.array_equal(ours(sources, w, "magnitude", 0.5, "total", "peft"), pf)


# --- mergekit: della, della_linear, breadcrumbs, breadcrumbs_ties ---------------------------------

GAMMAS = [0.01, 0.1]


@pytest.fixture
def one_torch_thread():
    """torch's thread pool on a busy 2-core machine makes each small call 100x slower (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ours_gta(method, deltas, weights, density, msm="total", **kw):
    """Our della / breadcrumbs merge of the float32 dense deltas (what ``--method`` runs on them)."""
    from pipeline.methods import ModuleParams
    from pipeline.methods.gta import merge

    p = ModuleParams(weights=tuple(weights), density=density, majority_sign_method=msm, **kw)
    return merge(method, deltas, weights, p, [source_rng(SEED, NAME, i) for i in range(len(deltas))])


def mergekit_gta_method(gta, name: str, msm: str):
    """mergekit's registered method ``name``; for ``frequency`` the same class with its ``count`` election."""
    from mergekit.merge_methods import registry

    m = registry.get(name)
    if msm == "total":
        return m
    return gta.GeneralizedTaskArithmeticMerge(
        consensus_method=gta.ConsensusMethod.count, sparsification_method=m.sparsification_method,
        default_normalize=m.default_normalize, default_rescale=m.default_rescale, method_name=name + "_count",
        method_pretty_name=None, method_reference_url=None)


@pytest.mark.parametrize("method,msm", [("breadcrumbs", "total"), ("breadcrumbs_ties", "total"),
                                        ("breadcrumbs_ties", "frequency")])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.usefixtures("one_torch_thread")
def test_breadcrumbs_is_mergekit_breadcrumbs(mergekit_gta, deltas, method, msm, weights, density, gamma):
    """Deterministic on both sides: the same numbers entry for entry."""
    want = run_mergekit(mergekit_gta_method(mergekit_gta, method, msm), deltas, weights, density, gamma=gamma)
    got = ours_gta(method, deltas, weights, density, msm, gamma=gamma)
    same_numbers(got, want, f"{method} {msm} {weights} {density} {gamma}")


@pytest.mark.parametrize("method,msm", [("della", "total"), ("della", "frequency"), ("della_linear", "total")])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
@pytest.mark.usefixtures("one_torch_thread")
def test_della_is_mergekit_della_with_our_masks(monkeypatch, mergekit_gta, deltas, method, msm, weights,
                                                density):
    """mergekit's ``della_magprune`` draws ``torch.bernoulli(probs)``: its probabilities must equal ours,
    and with our masks in place of its draw (PEFT-style injection) the merges agree; the L1 rescale
    sums in another order (float32), hence a few ulps rather than equality."""
    from pipeline.methods.gta import della_probabilities

    eps = 0.15
    order = iter(range(len(deltas)))

    def draw(probs, *args, **kwargs):
        i = next(order)
        ours = della_probabilities(deltas[i], density, eps)
        np.testing.assert_allclose(probs.numpy(), ours, rtol=0, atol=1e-7)
        return torch.from_numpy((source_rng(SEED, NAME, i).random(SHAPE, dtype=np.float32) < ours)
                                .astype(np.float32))

    monkeypatch.setattr(torch, "bernoulli", draw)
    want = run_mergekit(mergekit_gta_method(mergekit_gta, method, msm), deltas, weights, density, epsilon=eps)
    assert next(order, None) is None or density >= 1.0      # one draw per source (none at density 1)
    got = ours_gta(method, deltas, weights, density, msm, epsilon=eps)
    want = want.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(np.abs(want).max()),
                               err_msg=f"{method} {msm} {weights} {density}")


@pytest.mark.usefixtures("one_torch_thread")
def test_della_keeps_what_mergekit_keeps_in_expectation(mergekit_gta, deltas):
    """With mergekit's own random draws: per position, the keep frequency of its ``della_magprune`` over
    many draws on one delta matches our probabilities (within 5 sigma of a binomial), and so does ours."""
    from mergekit.sparsify import RescaleNorm, della_magprune

    from pipeline.methods.gta import della_probabilities, della_prune

    x = deltas[0][:8, :40].copy()
    p = della_probabilities(x, 0.5, 0.2).astype(np.float64)
    n = 2000
    torch.manual_seed(0)
    theirs = sum((della_magprune(torch.from_numpy(x), 0.5, 0.2, RescaleNorm.l1).numpy() != 0).astype(int)
                 for _ in range(n))
    rng = np.random.default_rng(0)
    mine = sum((della_prune(x, 0.5, 0.2, rng) != 0).astype(int) for _ in range(n))
    sigma = np.sqrt(n * p * (1 - p))
    for kept in (theirs, mine):
        assert np.all(np.abs(kept - n * p) < 5 * sigma)


# --- a whole fusion: PEFT's add_weighted_adapter against fusion fuse ---------------------------------

def test_fusion_fuse_ties_is_peft_add_weighted_adapter_ties_svd(tmp_path):
    """Two PEFT adapters on a tiny Llama, fused by PEFT (``ties_svd``, full rank) and by ``fusion fuse
    --method ties`` (full rank): the same deltas on every module."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from test_peft_interop import base_weights, tiny_llama

    from pipeline.formats import read_adapter

    targets = ["q_proj", "down_proj"]   # 64 x 64 and 64 x 128: rank 64 is full rank on both
    names = ("one", "two")
    model = tiny_llama()
    gen = torch.Generator().manual_seed(3)
    pm = None
    for i, name in enumerate(names):
        config = peft.LoraConfig(r=4 + 2 * i, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                 task_type="CAUSAL_LM")
        pm = peft.get_peft_model(model, config, adapter_name=name) if pm is None else pm
        if i:
            pm.add_adapter(name, config)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if f".{name}." in pname and ("lora_A" in pname or "lora_B" in pname):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        pm.save_pretrained(tmp_path / "saved", selected_adapters=[name])
    weights, density = [0.7, 1.3], 0.5
    full = 64  # min(out, in) of every module: PEFT's SVD and ours keep everything
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_weighted_adapter(list(names), weights, "fused", combination_type="ties_svd", density=density,
                                svd_rank=full)
    pm.set_adapter("fused")
    r = run_cli("fuse", tmp_path / "saved" / "one", tmp_path / "saved" / "two", "--method", "ties",
                "--weights", ",".join(map(str, weights)), "--density", str(density), "--rank", str(full),
                "--out", tmp_path / "ours")
    assert r.returncode == 0, r.stdout + r.stderr
    fused = read_adapter(tmp_path / "ours")
    base = base_weights(tiny_llama())
    assert len(fused.modules) == 2 * len(targets)
    for module in fused.modules:
        want = pm.get_submodule("base_model.model." + module).get_delta_weight("fused").detach().numpy()
        a, b, s = fused.factors(module)
        got = s * (b.astype(np.float64) @ a.astype(np.float64))
        assert want.shape == got.shape == base[module + ".weight"].shape
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=module)
