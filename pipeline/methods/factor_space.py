"""Factor space (``space: factors``): a method applied tensor by tensor to the A's and, separately, to
the B's, the numbers simple merge scripts produce.

It is a different function from the delta-space one (``(sum w B)(sum w A)`` has cross terms no adapter
learned); it needs every source to have the module and equal ranks. The result is used as it is
(error 0.0) unless ``rank`` asks for less; then it is re-factored exactly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.errors import FusionError
from pipeline.methods.lowrank import FusedModule, refactor_exact
from pipeline.methods.registry import ModuleParams

Combine = Callable[[list, list, ModuleParams, str], tuple]


def in_factor_space(combine: Combine):
    """A module function from ``combine(As, Bs, p, name) -> (a, b)``, which combines the float32
    factors of every source (A's: (r, in), B's: (out, r), the scale folded into B)."""
    def fuse(sources, shape, p: ModuleParams, name: str) -> FusedModule:
        missing = [i + 1 for i, s in enumerate(sources) if s is None]
        if missing:
            raise FusionError(f"module {name}: space 'factors' needs every adapter to have it; "
                              f"adapter {', '.join(map(str, missing))} lacks it (use space 'delta')")
        ranks = [s[0].shape[0] for s in sources]
        if len(set(ranks)) > 1:
            raise FusionError(f"module {name}: space 'factors' averages A's and B's tensor by tensor, "
                              f"which needs equal ranks; the adapters have ranks {ranks} (use space 'delta')")
        As = [np.asarray(s[0], np.float32) for s in sources]
        Bs = [np.asarray(s[1], np.float32) for s in sources]
        a, b = combine(As, Bs, p, name)
        if p.rank is not None and p.rank < ranks[0]:
            return refactor_exact(b, a, p.rank)
        return FusedModule(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32),
                           ranks[0], 0.0)
    return fuse
