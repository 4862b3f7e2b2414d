"""LoRA adapter fusion: formats, validation, fusion math, evaluation and reports.

This package knows nothing of DVC or the command line; ``pipeline.cli`` is the thin layer on top.
"""

from pipeline import _blas

_blas.enable()  # before anything imports mlx

from pipeline.errors import FusionError  # noqa: E402

__all__ = ["FusionError"]
__version__ = "0.1.0"
