"""The weight search: CMA-ES on a known objective, the weights layout, settings, stage helpers.

The search on a real fused model runs in test_experiments.py (the search stage of the scratch pipeline).
"""

from __future__ import annotations

import pytest

from pipeline.errors import FusionError
from pipeline.search import SETTINGS, search, settings, trace_figure, vector_weights, weights_vector
from pipeline.search import setting_text, valid_split

PEAK = (0.9, 0.2)


def bowl(x):
    return 1.0 - (x[0] - PEAK[0]) ** 2 - (x[1] - PEAK[1]) ** 2


def test_search_improves_on_the_start_within_the_budget():
    calls = []

    def objective(x):
        calls.append(list(x))
        return bowl(x)

    r = search(objective, [0.5, 0.5], budget=30, seed=0)
    assert len(calls) == r.evaluations == 30
    assert calls[0] == r.start == [0.5, 0.5] and r.start_value == pytest.approx(bowl([0.5, 0.5]))
    assert r.value > r.start_value and abs(r.best[0] - PEAK[0]) < 0.1 and abs(r.best[1] - PEAK[1]) < 0.1
    assert r.best in calls and r.value == pytest.approx(bowl(r.best))
    assert [row["evaluation"] for row in r.trace] == list(range(1, 31))
    bests = [row["best"] for row in r.trace]
    assert bests == sorted(bests) and bests[-1] == r.value


def test_search_is_repeatable_with_a_seed_and_varies_across_seeds():
    a = search(bowl, [0.5, 0.5], budget=12, seed=3)
    b = search(bowl, [0.5, 0.5], budget=12, seed=3)
    c = search(bowl, [0.5, 0.5], budget=12, seed=4)
    assert a.trace == b.trace
    assert [r["x"] for r in a.trace] != [r["x"] for r in c.trace]


def test_points_stay_in_bounds_and_are_rounded():
    r = search(lambda x: x[0] + x[1], [0.2, 0.3], budget=20, seed=0, bounds=(0.0, 1.0), decimals=2)
    for row in r.trace:
        assert all(0.0 <= v <= 1.0 and round(v, 2) == v for v in row["x"])
    assert r.value > 1.0


def test_never_worse_than_the_start_and_a_budget_of_one_is_the_start():
    r = search(lambda x: -abs(x[0] - 0.5) - abs(x[1] - 0.5), [0.5, 0.5], budget=8, seed=0)
    assert r.best == [0.5, 0.5] and r.value == 0.0
    one = search(bowl, [0.1, 0.1], budget=1, seed=0)
    assert one.evaluations == 1 and one.best == [0.1, 0.1]


def test_search_refuses_one_dimension_and_bad_values():
    with pytest.raises(FusionError, match="at least two weights"):
        search(bowl, [0.5], budget=4)
    with pytest.raises(FusionError, match="gave nan"):
        search(lambda x: float("nan"), [0.5, 0.5], budget=4)


def test_weights_layout_round_trips():
    assert weights_vector([0.7, 0.3], 2, 1) == [0.7, 0.3]
    assert weights_vector([0.7, 0.3], 2, 3) == [0.7, 0.7, 0.7, 0.3, 0.3, 0.3]
    # a per-layer list is sampled at the group positions
    assert weights_vector([[1.0, 0.0], 0.5], 2, 3) == [1.0, 0.5, 0.0, 0.5, 0.5, 0.5]
    assert vector_weights([1, 2, 3, 4], 2, 2) == [[1.0, 2.0], [3.0, 4.0]]
    assert vector_weights([0.25, 0.75], 2, 1) == [0.25, 0.75]
    with pytest.raises(FusionError):
        vector_weights([1, 2, 3], 2, 2)
    with pytest.raises(FusionError):
        weights_vector([1.0], 2, 1)


def test_settings_defaults_and_errors():
    assert settings(None) == SETTINGS
    s = settings({"enabled": True, "fusion": "average", "bounds": [0, 2]})
    assert s["bounds"] == [0.0, 2.0] and s["budget"] == SETTINGS["budget"]
    for bad, message in (({"budgett": 3}, "unknown setting(s) budgett"),
                         ({"budget": 0}, "budget: expected a whole number >= 1"),
                         ({"bounds": [1, 0]}, "bounds: expected [LOW, HIGH]"),
                         ({"objective": "mean"}, "objective: expected one of"),
                         ({"enabled": "yes"}, "enabled: expected true or false"),
                         ({"layer_groups": 1.5}, "layer_groups")):
        with pytest.raises(FusionError) as e:
            settings(bad)
        assert message in str(e.value)


def test_trace_figure_is_a_deterministic_png():
    trace = search(bowl, [0.5, 0.5], budget=6, seed=0).trace
    png = trace_figure(trace, "mean retention (valid)", "title", 0.5)
    assert png[:4] == b"\x89PNG" and png == trace_figure(trace, "mean retention (valid)", "title", 0.5)


def test_valid_split_and_setting_text(tmp_path):
    (tmp_path / "valid.jsonl").write_text("{}\n")
    (tmp_path / "test.jsonl").write_text("{}\n")
    assert valid_split(tmp_path, "up") == tmp_path / "valid.jsonl"
    assert valid_split(tmp_path / "test.jsonl", "up") == tmp_path / "valid.jsonl"
    (tmp_path / "valid.jsonl").unlink()
    with pytest.raises(FusionError, match="adapters.up.data: the search needs a valid.jsonl"):
        valid_split(tmp_path, "up")
    with pytest.raises(FusionError, match="no 'data'"):
        valid_split(None, "up")
    assert setting_text("average", [0.62, 0.4]) == "++fusions.average.weights=[0.62,0.4]"
    assert setting_text("a", [[1.0, 0.5], [0.0, 0.5]]) == "++fusions.a.weights=[[1.0,0.5],[0.0,0.5]]"
