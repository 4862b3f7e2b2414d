"""LoRA adapter fusion: formats, validation, fusion math, evaluation and reports.

This package knows nothing of DVC or the command line; ``pipeline.cli`` is the thin layer on top.

    from pipeline import FusionSpec, fuse
    fuse(["adapters/finance", "adapters/legal"], "fused/both",
         FusionSpec(method="ties", weights=[1.0, 1.0], density=0.5))
"""

from pipeline import _blas

_blas.pin_kernels()  # the same OpenBLAS kernels on every x86-64 machine, before numpy loads them
_blas.enable()  # before anything imports mlx

from pipeline.errors import FusionError  # noqa: E402
from pipeline.formats import convert, read_adapter  # noqa: E402
from pipeline.fuse import FusionSpec, fuse  # noqa: E402
from pipeline.validate import validate  # noqa: E402

__all__ = ["FusionError", "FusionSpec", "convert", "fuse", "read_adapter", "validate"]
__version__ = "0.1.0"
