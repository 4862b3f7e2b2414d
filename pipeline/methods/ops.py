"""The plain operations the methods are built from, each a small pure function that works on a 3x3
array (as PEFT's merge utilities): prune by magnitude, drop at random, elect a sign, disjoint mean,
the task-vector merge (in PEFT's convention or mergekit's), slerp coefficients, and the seeded
random streams.

These are the references: the fast blocked kernels (:mod:`pipeline.methods.dense`) are tested equal
to them entry for entry. Random streams are keyed by (seed, module name, adapter index), so a
fusion is reproducible byte for byte and independent of module order.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

import numpy as np

from pipeline.errors import FusionError

SLERP_PARALLEL = 1e-6   # |cos| > 1 - SLERP_PARALLEL: linear interpolation
RSVD_STREAM = 2**32 - 1  # pseudo adapter index of the randomized SVD's random stream


def name_chunks(name: str) -> list[int]:
    """The eight little-endian uint32 chunks of sha256(name)."""
    d = hashlib.sha256(name.encode("utf-8")).digest()
    return [int.from_bytes(d[i:i + 4], "little") for i in range(0, 32, 4)]


def source_rng(seed: int, name: str, index: int) -> np.random.Generator:
    """The random stream of source ``index`` on module ``name`` (DARE masks)."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, *name_chunks(name)]))


def svd_rng(seed: int, name: str) -> np.random.Generator:
    """The randomized SVD's stream on module ``name``."""
    return source_rng(seed, name, RSVD_STREAM)


def keep_count(density: float, size: int) -> int:
    """How many entries magnitude pruning keeps: ``int(density * size)``, as PEFT's
    ``magnitude_based_pruning`` (0 when ``density * size < 1``: nothing is kept)."""
    return int(density * size)


def prune_magnitude(x: np.ndarray, density: float) -> np.ndarray:
    """Keep the ``keep_count(density, size)`` largest-magnitude entries (all ties at the
    threshold kept), zero the rest; ``k = 0`` keeps nothing."""
    if density >= 1.0:
        return x
    mag = np.abs(x).ravel()
    k = keep_count(density, mag.size)
    if k == 0:
        return np.zeros_like(x)
    thr = np.partition(mag, mag.size - k)[mag.size - k]
    return np.where(np.abs(x) >= thr, x, np.zeros((), x.dtype))


def dare_mask(x: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: keep each entry with probability ``density`` and divide the survivors by it."""
    if density >= 1.0:
        return x
    keep = rng.random(x.shape, dtype=np.float32) < np.float32(density)
    return np.where(keep, x / x.dtype.type(density), np.zeros((), x.dtype))


def elect_sign(stack: np.ndarray, method: str = "total") -> np.ndarray:
    """The majority sign per entry of ``stack`` (n, ...): +1/-1, a zero sum electing +1.

    ``total``: sign of the sum of the values; ``frequency``: sign of the sum of their signs."""
    if method == "total":
        votes = stack.sum(axis=0)
    elif method == "frequency":
        votes = np.sign(stack).sum(axis=0)
    else:
        raise FusionError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    return np.where(votes >= 0, 1, -1).astype(stack.dtype)


def agreement(stack: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Where each entry of ``stack`` (n, ...) has the sign ``signs`` (zeros never agree)."""
    return np.where(signs > 0, stack > 0, stack < 0)


def disjoint_mean(values: np.ndarray, agree: np.ndarray, divisor: np.ndarray | None = None) -> np.ndarray:
    """Sum of the entries of ``values`` (n, ...) where ``agree``, divided by ``divisor`` (default:
    the number of agreeing entries); a divisor of 0 divides by 1 (no agreeing entry: 0)."""
    total = np.where(agree, values, np.zeros((), values.dtype)).sum(axis=0)
    if divisor is None:
        divisor = agree.sum(axis=0).astype(values.dtype)
    return total / np.where(divisor == 0, np.ones((), values.dtype), divisor)


def ties_merge(stack: np.ndarray, weights: Sequence[float], method: str = "total",
               consensus: str = "peft") -> np.ndarray:
    """The TIES election and disjoint merge of the sparsified, UNWEIGHTED tensors ``stack`` (n, ...).

    ``peft`` (PEFT's ``ties``): the sign is elected on ``stack`` itself; the weighted values that
    agree with it are summed and divided by the number of agreeing sources. ``mergekit`` (mergekit's
    ``ties``): the sign is elected on the weighted values; the agreeing weighted values are summed
    and divided by the sum of the agreeing sources' weights."""
    w = [stack.dtype.type(x) for x in weights]
    values = np.empty_like(stack)
    for i, wi in enumerate(w):
        np.multiply(stack[i], wi, out=values[i])
    if consensus == "peft":
        return disjoint_mean(values, agreement(stack, elect_sign(stack, method)))
    if consensus == "mergekit":
        agree = agreement(values, elect_sign(values, method))
        divisor = np.zeros(stack.shape[1:], stack.dtype)
        for i, wi in enumerate(w):
            divisor = divisor + np.where(agree[i], wi, np.zeros((), stack.dtype))
        return disjoint_mean(values, agree, divisor)
    raise FusionError(f"consensus must be 'peft' or 'mergekit', got {consensus!r}")


def merge_task_vectors(tensors: Iterable[np.ndarray], weights: Sequence[float], *,
                       sparsify: str | None = None, density: float = 1.0,
                       elect: str | None = None, consensus: str = "peft",
                       rngs: Sequence[np.random.Generator] | None = None) -> np.ndarray:
    """The task-vector family: sparsify each tensor, then either the weighted sum, or (``elect`` =
    "total" | "frequency") the TIES election and disjoint merge of :func:`ties_merge`.

    ``tensors`` may be a generator (one per weight): only the running sum, or the stack of
    sparsified tensors the election needs, is held at once."""
    out = stack = None
    for i, (x, w) in enumerate(zip(tensors, weights)):
        if sparsify == "magnitude":
            x = prune_magnitude(x, density)
        elif sparsify == "random":
            x = dare_mask(x, density, rngs[i])
        elif sparsify is not None:
            raise ValueError(f"unknown sparsify {sparsify!r}")
        if elect:
            if stack is None:
                stack = np.empty((len(weights), *x.shape), x.dtype)
            stack[i] = x
        else:
            x = x * x.dtype.type(w)
            out = x if out is None else out + x
    if elect:
        return ties_merge(stack, weights, elect, consensus)
    return out


def slerp_pair(g11: float, g12: float, g22: float, t: float) -> tuple[float, float]:
    """Coefficients (c1, c2) of slerp(x1, x2, t) = c1 x1 + c2 x2 from the inner products
    <x1,x1>, <x1,x2>, <x2,x2>; linear (1-t, t) when either is zero or |cos| > 1 - 1e-6."""
    if g11 <= 0.0 or g22 <= 0.0:
        return 1.0 - t, t
    cos = g12 / math.sqrt(g11 * g22)
    if abs(cos) > 1.0 - SLERP_PARALLEL:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def slerp_coefficients(gram: np.ndarray, weights: Sequence[float], t: float) -> np.ndarray:
    """Coefficients c with slerp result ``sum_i c_i x_i``, from the Gram matrix of the x_i.

    Two inputs: slerp at ``t`` (weights ignored). More: barycentric, pairwise in order,
    ``acc = slerp(acc, x_k, w_k / (w_1 + ... + w_k))`` with non-negative weights."""
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    c = np.zeros(n)
    if n == 0:
        return c
    c[0] = 1.0
    if n == 2:
        c[0], c[1] = slerp_pair(g[0, 0], g[0, 1], g[1, 1], t)
        return c
    total = float(weights[0])
    for k in range(1, n):
        total += float(weights[k])
        tk = float(weights[k]) / total if total > 0 else 0.0
        gc = g @ c
        c1, c2 = slerp_pair(float(c @ gc), float(gc[k]), float(g[k, k]), tk)
        c *= c1
        c[k] += c2
    return c


def dense_delta(source, shape: tuple[int, int]) -> np.ndarray:
    """``B @ A`` in float32 (zeros for a missing source), by the same row blocks and chunked products
    as the blocked kernels (``dense.matmul_rows``), so the two agree entry for entry."""
    from pipeline.methods.dense import matmul_rows
    from pipeline.methods.lowrank import row_step

    out = np.zeros(shape, np.float32)
    if source is not None:
        a, b = (np.ascontiguousarray(x, np.float32) for x in source)
        step = row_step(shape[1])
        for r0 in range(0, shape[0], step):
            matmul_rows(b[r0:r0 + step], a, out[r0:r0 + step])
    return out
