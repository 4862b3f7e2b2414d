"""Start-up: the package and the command line import what a command needs, and MLX still gets
the fast BLAS. Each check runs in a fresh interpreter (this one has imported everything already)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import make_mlx_adapter

HEAVY = ("numpy", "yaml", "mlx", "mlx_lm", "scipy_openblas32", "ctypes", "pipeline.fuse", "rich.progress",
         "matplotlib")


def fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON value as its last line."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def loaded_after(argv: list[str]) -> list[str]:
    """Which of HEAVY are imported once ``fusion ARGV`` has run."""
    return fresh(f"""
import json, sys
sys.argv = ["fusion", *{argv!r}]
from pipeline.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
""")


def test_help_imports_none_of_the_library():
    assert loaded_after(["--help"]) == []


def test_validate_loads_neither_mlx_nor_the_blas_shim(tmp_path):
    a, _ = make_mlx_adapter(tmp_path / "a", seed=1)
    b, _ = make_mlx_adapter(tmp_path / "b", seed=2)
    loaded = loaded_after(["validate", str(a), str(b)])
    assert "numpy" in loaded  # it reads the adapters
    assert not {"mlx", "mlx_lm", "scipy_openblas32", "matplotlib"} & set(loaded)


def test_the_package_names_load_on_first_use():
    got = fresh("""
import json, sys
import pipeline
before = "pipeline.fuse" in sys.modules or "numpy" in sys.modules
from pipeline.fuse import FusionSpec as spec_class
from pipeline import FusionSpec, fuse, validate
import pipeline.fuse as also_fuse
print(json.dumps([before, FusionSpec is spec_class, fuse.__module__, callable(fuse), also_fuse is fuse,
                  validate.__module__, sorted(pipeline.__all__) == sorted(set(dir(pipeline)) & set(pipeline.__all__))]))
""")
    assert got == [False, True, "pipeline.fuse", True, True, "pipeline.validate", True]


def test_mlx_gets_the_blas_shim_as_when_it_was_enabled_first():
    """Enabled on the first import of mlx, or before it by ``threads.blas_threads`` (the demo holds
    MLX's OpenBLAS to one thread that way before it imports mlx)."""
    enabled_first = fresh("""
import json
from pipeline import _blas
print(json.dumps(_blas.enable()))
""")
    via_import = fresh("""
import json, sys
import pipeline
import mlx.core
print(json.dumps(pipeline._blas.active))
""")
    held_down = fresh("""
import json, sys
import pipeline
from pipeline.threads import blas_threads
with blas_threads(1):
    print(json.dumps([pipeline._blas.active, "mlx" in sys.modules]))
""")
    assert via_import == enabled_first and held_down == [enabled_first, False]


def test_fuse_in_a_pipe_loads_neither_yaml_nor_rich(tmp_path):
    """Where stdout and stderr are pipes (a pipeline stage, a benchmark) there is no bar to draw:
    ``fusion fuse`` prints its two plain lines without importing rich, and reads no YAML when no
    option needs it; the progress bar is there once stderr counts as a terminal."""
    a, _ = make_mlx_adapter(tmp_path / "a", seed=1)
    b, _ = make_mlx_adapter(tmp_path / "b", seed=2)
    code = f"""
import json, sys
sys.argv = ["fusion", "fuse", {str(a)!r}, {str(b)!r}, "--out", sys.argv[1], "--rank", "4"]
from pipeline.cli import main
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("rich", "yaml"))))
"""
    for out, env in (("plain", {}), ("forced", {"FORCE_COLOR": "1"})):
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / out)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, **env})
        assert r.returncode == 0, r.stderr
        assert (tmp_path / out / "adapters.safetensors").is_file()
        loaded = json.loads(r.stdout.splitlines()[-1])
        if env:  # rich's switch: stderr counts as a terminal, and the bar is drawn there
            assert "rich.progress" in loaded and "fusing 2 adapters" in r.stderr
        else:
            assert loaded == [] and r.stderr == ""
            assert r.stdout.splitlines()[0].startswith(f"wrote {tmp_path / out}: ")
