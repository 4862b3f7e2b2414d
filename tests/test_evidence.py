"""Off-task drift on a tiny real model, random controls of real adapters, rank correlation, league."""

from __future__ import annotations

import json
import math

import pipeline  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from pipeline import geometry
from pipeline.control import control_rng, random_factors, write_random_adapter
from pipeline.demo.tinymodel import write_tiny_llama
from pipeline.drift import base_answers, drift, offtask_prompts
from pipeline.formats import read_adapter
from pipeline.report.evidence import league, predict, predictive_power, ranks, spearman

from conftest import make_mlx_adapter, module_shapes, write_q_proj_adapter


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("base") / "model", seed=3, hidden=32, layers=2,
                            heads=2, ff=64)




def test_offtask_prompts_are_seeded_and_distinct():
    a, b = offtask_prompts(20, 0), offtask_prompts(20, 0)
    assert a == b and len(set(a)) == 20
    assert offtask_prompts(20, 1) != a


def test_drift_is_zero_for_the_base_and_grows_with_the_adapter(tmp_path, model_dir):
    rows = base_answers(model_dir, offtask_prompts(6, 0), max_tokens=4, batch_size=3)
    path = tmp_path / "offtask.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = drift(model_dir, None, path, batch_size=4)
    assert base["kl"] == 0.0 and base["agreement"] == 1.0 and base["n"] == 6
    small = drift(model_dir, write_q_proj_adapter(tmp_path / "small", scale=0.05), path, batch_size=4)
    large = drift(model_dir, write_q_proj_adapter(tmp_path / "large", scale=2.0), path, batch_size=4)
    assert 0 < small["kl"] < large["kl"]
    assert large["loss"] > base["loss"] and large["tokens"] == base["tokens"]

    # by hand on one example: KL(p_base || p_model) over the answer tokens, EOS included
    model, tok = mlx_lm.load(str(model_dir))
    adapted, _ = mlx_lm.load(str(model_dir), adapter_path=str(tmp_path / "large"))
    total = count = 0.0
    for r in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                         add_generation_prompt=True, return_dict=False)
        tokens = tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["completion"]}],
                                         return_dict=False)
        x = mx.array(tokens)[None]
        lp = model(x)[0]
        lq = adapted(x)[0]
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        lq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
        end = tokens.index(tok.eos_token_id, len(prompt)) + 1
        for t in range(len(prompt), end):
            p = mx.exp(lp[t - 1])
            total += (p * (lp[t - 1] - lq[t - 1])).sum().item()
            count += 1
    assert large["kl"] == pytest.approx(total / count, rel=1e-4)


def test_random_adapter_keeps_ranks_and_norms(tmp_path):
    src, factors = make_mlx_adapter(tmp_path / "src", rank=4, scale=2.0, seed=5)
    out = write_random_adapter(src, tmp_path / "rand", control_rng(0, "src"))
    again = random_factors(src, control_rng(0, "src"))
    rand = read_adapter(out)
    assert set(rand.modules) == set(factors)
    for name, (a, b) in factors.items():
        ra, rb, s = rand.factors(name)
        assert ra.shape == a.shape and rb.shape == b.shape and s == 1.0
        assert geometry.lowrank_norm((ra, rb)) == pytest.approx(2.0 * geometry.lowrank_norm((a, b)), rel=1e-5)
        # random directions: nearly orthogonal to the source's
        cos = geometry.lowrank_inner((ra, rb), (a, b)) / (geometry.lowrank_norm((ra, rb)) * geometry.lowrank_norm((a, b)))
        assert abs(cos) < 0.5
        np.testing.assert_array_equal(again[name][0], ra)
    other = random_factors(src, control_rng(1, "src"))
    assert not np.array_equal(other[sorted(factors)[0]][0], rand.factors(sorted(factors)[0])[0])


def test_spearman_with_ties_and_direction():
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    # round-off is not an order: figures equal to 1e-14 are ties, so the correlation cannot flip
    assert ranks([1.0, 0.9999999999999998, 0.5, 1.0 + 1e-6]) == [2.5, 2.5, 1.0, 4.0]
    assert spearman([1.0, 0.9999999999999998, 0.5], [1, 2, 0]) == spearman([0.9999999999999998, 1.0, 0.5], [1, 2, 0])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    # against the textbook formula without ties
    x, y = [0.1, 0.5, 0.3, 0.9, 0.7], [1.0, 3.0, 2.0, 4.0, 6.0]
    d = [a - b for a, b in zip(ranks(x), ranks(y))]
    assert spearman(x, y) == pytest.approx(1 - 6 * sum(v * v for v in d) / (5 * (25 - 1)))


def test_predictive_power_picks_the_signal_that_ranks_retention():
    points = [{"fusion": f"f{i}", "kind": "fusion", "retention": r,
               "signals": {"min_kept": k, "interference": (i * 7) % 5 / 10}}
              for i, (k, r) in enumerate([(0.1, 0.2), (0.5, 0.6), (0.9, 0.95), (0.3, 0.4), (0.7, 0.8)])]
    power = predictive_power(points)
    assert power["best"] == "min_kept" and power["signals"]["min_kept"]["n"] == 5
    assert power["signals"]["min_kept"]["spearman"] == pytest.approx(1.0)
    assert power["signals"]["min_alignment"]["n"] == 0
    fit = power["fit"]
    assert predict(fit, {"min_kept": 0.5}) == pytest.approx(fit["intercept"] + 0.5 * fit["slope"])
    assert 0.55 < predict(fit, {"min_kept": 0.5}) < 0.65


def test_a_signal_of_the_sources_alone_cannot_win_by_telling_pairs_from_triples():
    """Across two source sets, a source-only signal (one value per set) ranks a pair above a
    three-way fusion perfectly overall, but has no spread inside a set: the signal that orders the
    fusions of each set wins, and its prediction stays in the measured range."""
    rows = [(("a", "b"), 0.9, 0.9), (("a", "b"), 0.5, 0.7), (("a", "b"), 0.2, 0.6), (("a", "b"), 0.7, 0.8),
            (("a", "b", "c"), 0.6, 0.4), (("a", "b", "c"), 0.1, 0.1), (("a", "b", "c"), 0.3, 0.2)]
    points = [{"fusion": f"f{i}", "kind": "fusion", "retention": r, "sources": list(src),
               "signals": {"min_kept": k, "mean_overlap": 0.9 if len(src) == 2 else 0.1}}
              for i, (src, k, r) in enumerate(rows)]
    power = predictive_power(points)
    overlap, kept = power["signals"]["mean_overlap"], power["signals"]["min_kept"]
    assert overlap["spearman"] > kept["spearman"] > 0      # overall, the source-only signal looks better
    assert overlap["within"] == {"spearman": None, "n": 0, "groups": 0}
    assert kept["within"]["spearman"] == pytest.approx(1.0) and kept["within"]["groups"] == 2
    assert power["best"] == "min_kept" and power["fit"]["range"] == [0.1, 0.9]
    assert predict(power["fit"], {"min_kept": 50.0}) == 0.9 and predict(power["fit"], {"min_kept": -50.0}) == 0.1


@pytest.mark.parametrize("retention, rho", [([0.9, 0.6, 0.3, 0.1, 0.5], -0.9), ([0.2, 0.6, 0.1, 0.5, 0.4], 0.2)])
def test_no_prediction_from_a_weak_or_negative_correlation_within_the_sets(retention, rho):
    points = [{"fusion": f"f{i}", "kind": "fusion", "retention": r, "sources": ["a", "b"],
               "signals": {"min_kept": k}} for i, (k, r) in enumerate(zip([0.1, 0.4, 0.6, 0.9, 0.7], retention))]
    power = predictive_power(points)
    assert power["signals"]["min_kept"]["within"]["spearman"] == pytest.approx(rho)
    assert power["best"] is None and power["fit"] is None


def _task(ret):
    return {"retention": ret}


def _fusion(adapters, method, test, valid, control=None, kl=0.01):
    def r(x):
        return None if x is None else {"tasks": {"a": _task(x), "b": _task(x)}, "mean_retention": x,
                                       "worst_retention": x}
    return {"adapters": adapters, "settings": {"method": method}, "retention": r(test),
            "valid_retention": r(valid), "control": None if control is None else {"retention": r(control)},
            "drift": {"kl": kl}, "joint_retention": r(0.8)}


def test_league_chooses_on_validation_not_on_test():
    data = {"fusions": {
        "lin_a": _fusion(["x", "y"], "linear", test=0.9, valid=0.5, control=0.1),
        "lin_b": _fusion(["x", "y"], "linear", test=0.7, valid=0.6, control=0.2),
        "ties": _fusion(["x", "y"], "ties", test=0.8, valid=0.4),
        "other": _fusion(["x", "y", "z"], "linear", test=0.5, valid=None)},
        "joint": {"name": "j", "drift": {"kl": 0.02}}, "adapter_drift": {"x": {"kl": 0.01}}}
    groups = league(data)
    assert [g["adapters"] for g in groups] == [["x", "y"], ["x", "y", "z"]]
    rows = {r["method"]: r for r in groups[0]["rows"]}
    assert list(rows) == ["linear", "ties"]  # the registry's order
    assert rows["linear"]["fusion"] == "lin_b" and rows["linear"]["chosen_on"] == "valid"
    assert rows["linear"]["mean"] == 0.7 and rows["linear"]["control_mean"] == 0.2
    assert rows["ties"]["chosen_on"] == "only one" and rows["ties"]["candidates"] == 1
    assert groups[1]["rows"][0]["chosen_on"] == "only one"
    assert groups[0]["joint"]["mean"] == 0.8 and groups[0]["joint"]["kl"] == 0.02
    assert math.isclose(groups[0]["source_kl"]["x"], 0.01)


def test_fusion_validate_predicts_from_a_reports_signals(tmp_path):
    """`fusion validate` with a report's signals.json: the fitted best signal's prediction for this
    fusion (computed in memory, nothing written), and the warnings of a fusion that cancels."""
    from conftest import run_cli
    from pipeline.fuse import FusionSpec, fuse
    from pipeline.safetensors_io import write_file

    a, factors = make_mlx_adapter(tmp_path / "a", rank=4, seed=1)
    b, _ = make_mlx_adapter(tmp_path / "b", rank=4, seed=1)
    write_file(b / "adapters.safetensors",
               {k: v for name, (fa, fb) in factors.items()
                for k, v in ((f"{name}.lora_a", fa.T.copy()), (f"{name}.lora_b", (-fb).T.copy()))},
               {"format": "mlx"})
    fit = {"signal": "min_kept", "intercept": 0.2, "slope": 0.6, "n": 9}
    power = tmp_path / "signals.json"
    power.write_text(json.dumps({"fit": fit, "signals": {"min_kept": {"spearman": 0.8, "n": 9,
                                                                     "within": {"spearman": 0.7, "n": 9, "groups": 2}}}}))
    r = run_cli("validate", a, b, "--weights", "1,0.5", "--signals", power)
    assert r.returncode == 0, r.stderr
    record = fuse([a, b], tmp_path / "check", FusionSpec(method="linear", weights=[1.0, 0.5]))
    want = predict(fit, record["signals"])
    assert f"predicted mean retention {want:.3f}" in r.stdout
    text = " ".join(r.stdout.split())   # rich wraps long lines
    assert "opposite signs" in text and "Spearman 0.70 within source sets, fitted over 9 fusions" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "check", "signals.json"]
    # without a signals file: validation only
    r = run_cli("validate", a, b, "--signals", tmp_path / "none.json")
    assert r.returncode == 0 and "predicted" not in r.stdout


def test_fusion_signals_pools_reports(tmp_path):
    from conftest import run_cli

    pts = [{"fusion": f"f{i}", "kind": "fusion", "retention": r, "signals": {"min_kept": k}}
           for i, (k, r) in enumerate([(0.1, 0.3), (0.4, 0.2), (0.8, 0.9), (0.6, 0.7), (0.2, 0.1)])]
    (tmp_path / "a.json").write_text(json.dumps({"points": pts[:3]}))
    (tmp_path / "b.json").write_text(json.dumps({"points": pts[3:]}))
    r = run_cli("signals", tmp_path / "a.json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    rho = predictive_power(pts)["signals"]["min_kept"]["spearman"]
    assert f"{rho:.3f}" in r.stdout and "5 fusions and random controls from 2 report(s)" in r.stdout
    (tmp_path / "bad.json").write_text("{}")
    r = run_cli("signals", tmp_path / "bad.json")
    assert r.returncode == 2 and r.stderr.startswith("error:")
