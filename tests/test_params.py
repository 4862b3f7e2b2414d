"""The params contract: defaults, overrides, and mistakes named by fusion."""

import pytest
import yaml

from conftest import ROOT
from pipeline.errors import FusionError
from pipeline.params import resolve


def base(**over):
    raw = {"base_model": "m", "adapters": {"a": {"path": "x"}, "b": {"path": "y"}, "c": {"path": "z"}},
           "method": "linear", "weights": [0.5, 0.5], "density": 0.5,
           "fusions": {"avg": {"adapters": ["a", "b"]}}}
    raw.update(over)
    return raw


def test_shipped_params_resolve():
    p = resolve(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert p.fusions["average"].spec.weights == [0.5, 0.5]
    assert "weights" in p.fusions["average"].inherited
    assert p.fusions["up70"].spec.weights == [0.7, 0.3] and "weights" not in p.fusions["up70"].inherited
    assert p.fusions["ties"].spec.method == "ties" and p.fusions["ties"].spec.density == 0.5


def test_fusion_overrides_defaults_and_keeps_rules():
    p = resolve(base(fusions={"f": {"adapters": ["a", "b"], "method": "ties", "density": 0.3,
                                    "rules": [{"match": "mlp", "density": 0.9}]}}))
    spec = p.fusions["f"].spec
    assert (spec.method, spec.density, spec.weights) == ("ties", 0.3, [0.5, 0.5])
    assert spec.rules == [{"match": "mlp", "density": 0.9}]


@pytest.mark.parametrize("fusion,message", [
    ({"adapters": ["a", "q"]}, "fusion 'f': unknown adapter 'q'"),
    ({"adapters": ["a", "b"], "method": "avg"}, "fusion 'f': unknown method 'avg'"),
    ({"adapters": ["a", "b", "c"]}, "fusion 'f': fuses 3 adapters but the default weights have 2"),
    ({"adapters": ["a", "b"], "weights": [1, 2, 3]}, "3 weights for 2 adapters"),
    ({"adapters": ["a", "b"], "method": "ties", "density": 2}, "density"),
    ({"adapters": ["a", "b"], "wieghts": [1, 1]}, "unknown setting(s) wieghts"),
    ({"adapters": ["a", "b"], "method": "ties", "consensus": "average"},
     "consensus must be 'peft' or 'mergekit', got 'average'"),
    ({"adapters": "a"}, "needs 'adapters: [NAME, ...]'"),
    ({"adapters": ["a", "b"], "method": ["linear"]}, "fusion 'f': unknown method ['linear']"),
    ({"adapters": ["a", "b"], "method": "ties", "density": 1.5}, "fusion 'f': density must be in (0, 1]"),
    ({"adapters": ["a", "b"], "weights": [1e39, 1]}, "fusion 'f': weights must be finite"),
])
def test_mistakes_name_the_fusion(fusion, message):
    with pytest.raises(FusionError) as e:
        resolve(base(fusions={"f": fusion}))
    assert message in str(e.value)


def test_consensus_defaults_to_peft_and_is_inherited_or_overridden():
    p = resolve(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert p.fusions["ties"].spec.consensus == "peft"
    p = resolve(base(consensus="mergekit", fusions={"a": {"adapters": ["a", "b"], "method": "ties"},
                                                   "b": {"adapters": ["a", "b"], "method": "dare_ties",
                                                         "consensus": "peft"}}))
    assert p.fusions["a"].spec.consensus == "mergekit" and "consensus" in p.fusions["a"].inherited
    assert p.fusions["b"].spec.consensus == "peft" and p.fusions["b"].spec.to_json()["consensus"] == "peft"


def test_missing_sections():
    with pytest.raises(FusionError, match="base_model"):
        resolve(base(base_model=None))
    with pytest.raises(FusionError, match="no fusions"):
        resolve(base(fusions={}))


@pytest.mark.parametrize("over,message", [
    ({"adapters": [{"path": "x"}]}, "'adapters' must be a mapping, got list"),
    ({"fusions": ["avg"]}, "'fusions' must be a mapping, got list"),
    ({"eval": [1, 2]}, "'eval' must be a mapping, got list"),
    ({"eval": {"max_examples": "all"}}, "eval.max_examples must be a positive integer, got 'all'"),
    ({"eval": {"max_exmaples": 3}}, "eval has unknown setting(s) max_exmaples"),
    ({"adapters": {"a": {"path": None}, "b": {"path": "y"}}}, "adapters.a.path must be a path, got None"),
    ({"fusions": {"../../escaped": {"adapters": ["a", "b"]}}}, "fusion name '../../escaped' is not a safe"),
    ({"fusions": {".hidden": {"adapters": ["a", "b"]}}}, "fusion name '.hidden' is not a safe"),
    ({"adapters": {"a/b": {"path": "x"}}}, "adapter name 'a/b' is not a safe"),
])
def test_sections_of_the_wrong_type_and_unsafe_names_are_refused(over, message):
    with pytest.raises(FusionError) as e:
        resolve(base(**over))
    assert message in str(e.value)


def test_numbers_in_exponent_form_and_bad_files(tmp_path):
    from pipeline.params import load_params

    p = tmp_path / "params.yaml"
    p.write_text("base_model: m\nadapters: {a: {path: x}, b: {path: y}}\n"
                 "fusions: {f: {adapters: [a, b], method: ties, weights: [1e3, 1e-9], density: 5e-1}}\n")
    spec = resolve(load_params(p)).fusions["f"].spec
    assert spec.weights == [1000.0, 1e-9] and spec.density == 0.5
    p.write_bytes(b"base_model: \xff\xfe\n")
    with pytest.raises(FusionError, match="not a UTF-8 text file"):
        load_params(p)
