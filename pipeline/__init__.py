"""LoRA adapter fusion: formats, validation, fusion math, evaluation and reports.

This package knows nothing of DVC or the command line; ``pipeline.cli`` is the thin layer on top.

    from pipeline import FusionSpec, fuse
    fuse(["adapters/finance", "adapters/legal"], "fused/both",
         FusionSpec(method="ties", weights=[1.0, 1.0], density=0.5))

Importing the package is cheap: the names below load their modules on first use. The OpenBLAS
kernels are pinned at once (before numpy loads them); the fast-BLAS shim (``pipeline._blas``) is
enabled just before the first import of ``mlx``, whoever imports it (or earlier by ``_blas.enable()``).
"""

import importlib
import sys
import types

from pipeline import _blas

_blas.pin_kernels()  # the same OpenBLAS kernels on every x86-64 machine, before numpy loads them

__all__ = ["FusionError", "FusionSpec", "convert", "fuse", "read_adapter", "validate"]
__version__ = "0.1.0"

_HOME = {"FusionError": "pipeline.errors", "FusionSpec": "pipeline.spec", "fuse": "pipeline.fuse",
         "convert": "pipeline.writers", "read_adapter": "pipeline.formats", "validate": "pipeline.validate"}


class _Package(types.ModuleType):
    def __getattr__(self, name: str):
        if name not in _HOME:
            raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
        value = getattr(importlib.import_module(_HOME[name]), name)
        self.__dict__[name] = value
        return value

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_HOME))

    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule pipeline.fuse (or .validate) sets the package attribute of that
        # name to the module; the package's `fuse` and `validate` stay the functions.
        if name in _HOME and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


class _BlasBeforeMlx:
    """A meta-path finder that enables the fast-BLAS shim when ``mlx`` is first imported (then leaves)."""

    def find_spec(self, name: str, path=None, target=None):
        if name == "mlx" or name.startswith("mlx."):
            try:
                sys.meta_path.remove(self)
            except ValueError:
                return None  # already done
            _blas.enable()
        return None


sys.modules[__name__].__class__ = _Package
if "mlx.core" not in sys.modules:  # once MLX is loaded, the shim can no longer help it
    sys.meta_path.insert(0, _BlasBeforeMlx())
