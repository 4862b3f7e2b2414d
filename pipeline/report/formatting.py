"""How numbers read in the report's text and figures: ``–`` for a missing value, fixed digits."""

from __future__ import annotations

import math

MISSING = "–"


def fmt(x, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; NaN and infinities as Python writes them."""
    if x is None:
        return MISSING
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def pct(x) -> str:
    """A fraction as a percentage with one decimal."""
    return MISSING if x is None else f"{100 * x:.1f}%"


def gain_pts(x) -> str:
    """A difference of two fractions, in signed percentage points."""
    return MISSING if x is None else f"{100 * x:+.1f} pts"


def signed(x) -> str:
    """A signed number with three decimals."""
    return MISSING if x is None else f"{x:+.3f}"
