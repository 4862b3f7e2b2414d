"""The method registry dispatches: a method added through it alone is validated, listed and fused by
the command line, and everything that names methods reads the registry."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_mlx_adapter
from pipeline.formats import read_adapter
from pipeline.methods import METHODS, Method, get_method, method_list, register
from pipeline.methods.lowrank import refactor_exact, stack_factors


def opposite(sources, shape, p, name):
    """A toy method: minus the weighted sum of the deltas, exact through the stacked factors."""
    bc, ac = stack_factors(sources, [-w for w in p.weights], shape)
    return refactor_exact(bc, ac, p.rank)


@pytest.fixture
def toy():
    m = register(Method("opposite", "minus the weighted sum (a test method)", ("weights", "rank"),
                        delta=opposite, exact=True, default_weight="mean"))
    yield m
    del METHODS["opposite"]


def delta(adapter_dir, module):
    a = read_adapter(adapter_dir)
    A, B, s = a.factors(module)
    return (B * s) @ A


def test_a_method_registered_in_a_test_fuses_through_the_cli(tmp_path, toy):
    from pipeline.cli import app

    a, fa = make_mlx_adapter(tmp_path / "a", rank=4, scale=2.0, seed=1)
    b, fb = make_mlx_adapter(tmp_path / "b", rank=2, scale=1.0, seed=2)
    runner = CliRunner()
    r = runner.invoke(app, ["validate", str(a), str(b), "--method", "opposite"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fuse", str(a), str(b), "--method", "opposite", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    fused = read_adapter(tmp_path / "out")
    for name in fused.modules:
        (A1, B1), (A2, B2) = fa[name], fb[name]
        # default weights come from the entry ("mean": 1/2 each)
        want = -(0.5 * 2.0 * B1 @ A1 + 0.5 * 1.0 * B2 @ A2)
        np.testing.assert_allclose(delta(tmp_path / "out", name), want, rtol=1e-4, atol=1e-6)
    assert "opposite" in method_list()
    # the params a method does not declare are still checked by the shared rules
    r = runner.invoke(app, ["fuse", str(a), str(b), "--method", "opposite", "--weights", "1",
                            "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "1 weights for 2 adapters" in str(r.exception)
    assert not (tmp_path / "bad").exists()


def test_unknown_method_lists_the_registry(toy):
    from pipeline.errors import FusionError

    with pytest.raises(FusionError, match=r"unknown method 'nope' \(known: linear, .*opposite\)"):
        get_method("nope")


def test_registry_answers_the_method_specific_questions():
    assert METHODS["linear"].default_weights(4) == [0.25] * 4
    assert METHODS["ties"].default_weights(3) == [1.0] * 3
    assert not METHODS["slerp"].uses_weights(2) and METHODS["slerp"].uses_weights(3)
    assert METHODS["concat"].spaces == ("delta",) and "factors" in METHODS["ties"].spaces
    with pytest.raises(ValueError, match="unknown parameter"):
        register(Method("bad", "reads a parameter nobody declared", ("strength",), delta=opposite, exact=True))
    assert "bad" not in METHODS


def test_the_registry_loads_without_numpy():
    import subprocess
    import sys

    code = ("import sys; import pipeline.methods.registry as r, pipeline.methods.catalog; "
            "print(r.method_list(), 'numpy' in sys.modules)")
    # importing the pipeline package itself enables the BLAS shim; load the files on their own
    out = subprocess.run([sys.executable, "-c", "import importlib.util, sys, types; "
                          "sys.modules['pipeline'] = types.ModuleType('pipeline'); "
                          "sys.modules['pipeline'].__path__ = [__import__('os').path.abspath('pipeline')]; "
                          + code], capture_output=True, text=True, cwd=str(__import__('conftest').ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False" and "magnitude_prune" in out.stdout
