"""Cheap figures about the sources of one module, computed from their factors, no model needed.

A source is ``(A (r, in), B (out, r))`` with the scale folded into B (delta ``B @ A``), or None
(delta 0), as in :mod:`pipeline.methods`.

- norms and cosine similarities use the Frobenius inner product of low-rank products,
  ``<B_1 A_1, B_2 A_2> = sum((B_1^T B_2) * (A_1 A_2^T))`` (r x r matrices, float64, blocks of
  :class:`JointGrams`), never a dense delta; a cosine involving a zero delta is ``None`` (no direction);
- the sign-conflict rate of two sources is the fraction of entries where both deltas are nonzero
  and their signs differ, among the entries where both are nonzero (``None`` when there are
  none, e.g. a missing module). Over all sources (``sign_conflict_all``): among entries where at
  least two deltas are nonzero, the fraction where both signs occur. This needs dense rows:
  modules with more than ``max_rows`` output rows use a fixed sample of that many rows, drawn
  without replacement from a generator seeded by sha256 of the module name (deterministic, the
  same rows for every source). By default ``max_rows`` is what makes about ``SAMPLE_ENTRIES``
  entries (between ``MIN_ROWS`` and ``MAX_ROWS`` rows): 64 rows of a 2048-wide module, 16 of an
  8192-wide one, a standard error of the rate under 0.01 either way.

Everything returned is plain floats, lists and dicts (JSON-ready).
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np

MAX_ROWS = 256  # row sample for the sign-conflict rate: at most this many rows,
SAMPLE_ENTRIES = 1 << 17  # and about this many entries (at least MIN_ROWS rows) in all
MIN_ROWS = 16


def _f64(source):
    return None if source is None else tuple(np.asarray(x, np.float64) for x in source)


def lowrank_inner(s1, s2) -> float:
    """Frobenius inner product ``<B1 A1, B2 A2>`` from the factors (0.0 if either is None)."""
    if s1 is None or s2 is None:
        return 0.0
    a1, b1 = _f64(s1)
    a2, b2 = _f64(s2)
    return float(np.sum((b1.T @ b2) * (a1 @ a2.T)))


class JointGrams:
    """The Gram matrices of several low-rank deltas' stacked factors, in float64.

    With ``S_B = [B_1 | .. | B_n]`` (out, R) and ``S_A = [A_1; ..; A_n]`` (R, in) over the present
    pairs, ``gb = S_B^T S_B`` and ``ga = S_A S_A^T`` (R x R); their block (i, j) is ``B_i^T B_j``
    and ``A_i A_j^T``. Every inner product of two of the deltas, ``sum(gb_ij * ga_ij)``, each
    delta's thin SVD and the angles between their subspaces follow from these blocks in r x r
    arithmetic (:mod:`pipeline.signals`): two Gram products of the stacked factors are the only
    work that grows with the module's size. ``spans[i]`` is pair i's slice of rows and columns
    (None for a missing pair)."""

    def __init__(self, pairs: Sequence):
        self.spans: list[slice | None] = []
        self._inner: np.ndarray | None = None
        r0 = 0
        for p in pairs:
            if p is None:
                self.spans.append(None)
                continue
            r = p[0].shape[0]
            self.spans.append(slice(r0, r0 + r))
            r0 += r
        present = [(p, sl) for p, sl in zip(pairs, self.spans) if sl is not None]
        if not present:
            self.gb = self.ga = np.zeros((0, 0))
            return
        out, fin = present[0][0][1].shape[0], present[0][0][0].shape[1]
        # filled in place: float64 copies per pair and a concatenation cost four times as much
        sb, sa = np.empty((out, r0)), np.empty((r0, fin))
        for (a, b), sl in present:
            sb[:, sl] = b
            sa[sl] = a
        self.gb = sb.T @ sb
        self.ga = sa @ sa.T

    @classmethod
    def of(cls, sources: Sequence, fused, span=None) -> "JointGrams":
        """The Gram matrices of ``[*sources, fused]``; with the fusion's ``span``
        (:class:`pipeline.methods.lowrank.Span`: the method's Gram matrices of the present sources
        and the fused factors' coordinates in them) in R x R arithmetic, without another pass over
        the factors: ``gb = E^T span.gb E`` with ``E = [I | tb]``, likewise for A."""
        if span is None:
            return cls([*sources, fused])
        out = cls.__new__(cls)
        out._inner = None
        out.spans, r0 = [], 0
        for p in [*sources, fused]:
            r = None if p is None else p[0].shape[0]
            out.spans.append(None if r is None else slice(r0, r0 + r))
            r0 += r or 0
        eb = np.hstack([np.eye(span.gb.shape[0]), span.tb])
        ea = np.vstack([np.eye(span.ga.shape[0]), span.ta])
        out.gb = eb.T @ span.gb @ eb
        out.ga = ea @ span.ga @ ea.T
        return out

    def blocks(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """``(B_i^T B_j, A_i A_j^T)``."""
        si, sj = self.spans[i], self.spans[j]
        return self.gb[si, sj], self.ga[si, sj]

    def inner_matrix(self) -> np.ndarray:
        """(n, n) float64: ``<B_i A_i, B_j A_j>`` for every two pairs (0.0 where one is missing),
        the block sums of ``gb * ga``."""
        if self._inner is None:
            ind = np.zeros((self.gb.shape[0], len(self.spans)))
            for i, sl in enumerate(self.spans):
                if sl is not None:
                    ind[sl, i] = 1.0
            self._inner = ind.T @ (self.gb * self.ga) @ ind
        return self._inner

    def inner(self, i: int, j: int) -> float:
        """``<B_i A_i, B_j A_j>`` (0.0 if either pair is missing)."""
        return float(self.inner_matrix()[i, j])


def gram_matrix(sources: Sequence, grams: JointGrams | None = None) -> np.ndarray:
    """(n, n) float64 matrix of the deltas' Frobenius inner products (symmetric, PSD).
    ``grams``: the :class:`JointGrams` of a list that starts with ``sources``, if already made."""
    n = len(sources)
    g = (grams or JointGrams(sources)).inner_matrix()[:n, :n]
    return (g + g.T) / 2.0


def lowrank_norm(source) -> float:
    """``|B A|_F`` from the factors: ``sqrt(sum((B^T B) * (A A^T)))``."""
    return math.sqrt(max(lowrank_inner(source, source), 0.0))


def _cosines(g: np.ndarray) -> list[list[float | None]]:
    d = np.sqrt(np.clip(np.diag(g), 0.0, None))
    n = g.shape[0]
    return [[float(np.clip(g[i, j] / (d[i] * d[j]), -1.0, 1.0)) if d[i] > 0 and d[j] > 0 else None
             for j in range(n)] for i in range(n)]


def cosine_matrix(sources: Sequence) -> list[list[float | None]]:
    """Pairwise cosine similarity of the deltas (None where a delta is zero)."""
    return _cosines(gram_matrix(sources))


def default_rows(fin: int) -> int:
    """Rows sampled from a module ``fin`` wide: about SAMPLE_ENTRIES entries."""
    return max(MIN_ROWS, min(MAX_ROWS, SAMPLE_ENTRIES // max(1, fin)))


def sample_rows(out: int, name: str, max_rows: int = MAX_ROWS) -> np.ndarray:
    """All rows if ``out <= max_rows``, else ``max_rows`` sorted rows chosen by the module name."""
    if out <= max_rows:
        return np.arange(out)
    d = hashlib.sha256(name.encode("utf-8")).digest()
    rng = np.random.default_rng([int.from_bytes(d[i:i + 4], "little") for i in range(0, 32, 4)])
    return np.sort(rng.choice(out, size=max_rows, replace=False))


def sign_conflicts(sources: Sequence, shape: tuple[int, int], name: str,
                   max_rows: int | None = None) -> tuple[list[list[float | None]], float | None]:
    """(pairwise sign-conflict rates, rate over all sources) on the sampled rows.

    Signs are int8 (-1, 0, 1); for a pair, the product of their signs is nonzero where both are
    nonzero and negative where they conflict, so each pair costs one product and two counts."""
    rows = sample_rows(shape[0], name, default_rows(shape[1]) if max_rows is None else max_rows)
    n = len(sources)
    signs: list[np.ndarray | None] = []
    for s in sources:
        if s is None:
            signs.append(None)
            continue
        a, b = s
        d = np.asarray(b, np.float32)[rows] @ np.asarray(a, np.float32)
        signs.append((d > 0).view(np.int8) - (d < 0).view(np.int8))
    pair: list[list[float | None]] = [[None] * n for _ in range(n)]
    prod = None
    for i in range(n):
        if signs[i] is None:
            continue
        if np.any(signs[i]):
            pair[i][i] = 0.0
        for j in range(i + 1, n):
            if signs[j] is None:
                continue
            prod = np.multiply(signs[i], signs[j], out=prod)
            both = int(np.count_nonzero(prod))
            if both:
                pair[i][j] = pair[j][i] = int(np.count_nonzero(prod < 0)) / both
    present = [i for i, x in enumerate(signs) if x is not None]
    if len(present) < 2:
        return pair, None
    if len(present) == 2:  # both signs occur exactly where the pair conflicts
        return pair, pair[present[0]][present[1]]
    present = [signs[i] for i in present]
    nonzero = np.zeros(present[0].shape, np.int8)
    anypos = np.zeros(present[0].shape, bool)
    anyneg = np.zeros(present[0].shape, bool)
    for x in present:
        nonzero += x != 0
        anypos |= x > 0
        anyneg |= x < 0
    multi = int(np.count_nonzero(nonzero >= 2))
    overall = int(np.count_nonzero(anypos & anyneg)) / multi if multi else None
    return pair, overall


def module_geometry(sources: Sequence, shape: tuple[int, int], name: str,
                    max_rows: int | None = None, grams: JointGrams | None = None) -> dict:
    """``{"norms": [..], "cosine": [[..]], "sign_conflict": [[..]], "sign_conflict_all": x}``
    for one module (lists indexed by source; None where undefined). ``grams`` as for
    :func:`gram_matrix`."""
    pair, overall = sign_conflicts(sources, shape, name, max_rows)
    g = gram_matrix(sources, grams)
    return {
        "norms": [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(len(sources))],
        "cosine": _cosines(g),
        "sign_conflict": pair,
        "sign_conflict_all": overall,
    }


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "min": None, "max": None, "modules": 0}
    return {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values)),
            "modules": len(values)}


def summarize(per_module: dict[str, dict], names: Sequence[str]) -> dict:
    """Whole-fusion figures from :func:`module_geometry` results (extra keys are ignored).

    ``adapters``: per source, its total delta norm over all modules (sqrt of the sum of squares)
    and the number of modules it has; ``pairs``: per pair of sources, mean/min/max over the
    modules where defined of the cosine and of the sign-conflict rate; ``sign_conflict_all``:
    the same statistics of the all-source rate."""
    mods = list(per_module.values())
    n = len(names)
    adapters = []
    for i, nm in enumerate(names):
        norms = [m["norms"][i] for m in mods]
        adapters.append({"name": nm, "norm": math.sqrt(sum(x * x for x in norms)),
                         "modules": sum(1 for x in norms if x > 0)})
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            cos = [m["cosine"][i][j] for m in mods if m["cosine"][i][j] is not None]
            conf = [m["sign_conflict"][i][j] for m in mods if m["sign_conflict"][i][j] is not None]
            pairs.append({"adapters": [names[i], names[j]], "cosine": _stats(cos),
                          "sign_conflict": _stats(conf)})
    allc = [m["sign_conflict_all"] for m in mods if m["sign_conflict_all"] is not None]
    return {"adapters": adapters, "pairs": pairs, "sign_conflict_all": _stats(allc),
            "modules": len(mods)}
