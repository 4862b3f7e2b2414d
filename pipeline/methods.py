"""Fusion methods: the math of one module at a time, in numpy, with no file I/O.

A source module is ``(A, B)``: ``A`` (r_i, in), ``B`` (out, r_i), with the adapter's scale already
folded into ``B``, so its delta is ``dW_i = B_i @ A_i`` (out x in). A source lacking the module is
``None`` (delta 0). :func:`fuse_module` returns factors ``a`` (r, in), ``b`` (out, r) with the fused
delta ``b @ a`` (float32), the rank ``r`` and the relative Frobenius error of re-factoring.

Delta space (default; what the model computes)
-----------------------------------------------
- ``linear``: ``dW = sum_i w_i dW_i``, exact through the stacked factors
  ``[w_1 B_1 | ... | w_k B_k] @ [A_1; ...; A_k]``, then re-factored exactly (below).
- ``concat``: the same stacked factors as they are (rank = sum of the present sources' ranks);
  re-factored only when ``rank`` asks for fewer.
- ``slerp``: spherical interpolation of the deltas. Angles come from Frobenius inner products of
  low-rank products, ``<B_1 A_1, B_2 A_2> = sum((B_1^T B_2) * (A_1 A_2^T))``, never a dense matrix.
  Two sources: ``sin((1-t)th)/sin(th) dW_1 + sin(t th)/sin(th) dW_2`` with the parameter ``t``; it
  falls back to linear interpolation ``(1-t) dW_1 + t dW_2`` when ``|cos th| > 1 - 1e-6`` (nearly
  parallel or anti-parallel: the arc is undefined or numerically unstable) or when either delta
  is zero (a missing module has no direction). The weights are ignored with two sources (``t``
  decides), but must not be negative. Three or more sources: barycentric spherical interpolation
  with the weights as barycentric coordinates (normalised; negative weights are refused), computed
  as pairwise slerps in adapter order, ``acc = slerp(acc, dW_k, t_k = w_k / (w_1 + ... + w_k))``
  (with two sources this is slerp at ``t = w_2 / (w_1 + w_2)``); ``t`` is ignored. Every step is a
  linear combination of the sources' deltas, so the result is exact through stacked factors.
- Masking methods (element-wise masks destroy low rank, so each source's dense delta
  ``dW_i = B_i @ A_i`` is formed in float32), in mergekit's one task-vector core parametrised by
  how to sparsify and whether to elect signs:
  ``magnitude_prune`` (magnitude, no election), ``ties`` (magnitude, election),
  ``dare_linear`` (random, no election), ``dare_ties`` (random, election).
  * magnitude: keep the ``k = max(1, round(density * size))`` entries of largest ``|dW_i|``; every
    entry equal to the k-th largest magnitude is kept too (ties at the threshold are kept, so a
    tie can keep slightly more than ``k``; the result never depends on memory order).
  * random (DARE): keep each entry with probability ``density`` (``u < density`` with ``u``
    uniform float32 draws in [0, 1)), divide the survivors by ``density``. ``density = 1`` keeps
    everything, so ``dare_linear`` equals ``linear`` exactly. The stream of source ``i`` is
    ``default_rng(SeedSequence([seed, i, *c]))`` where ``c`` are the eight little-endian uint32
    chunks of ``sha256(module name)``: byte-reproducible, independent of module order.
  * weights enter BEFORE the sign election, as in PEFT: each sparsified delta is multiplied by its
    weight, the election runs on the weighted values (``total``: the sign of their sum;
    ``frequency``: the sign of the sum of their signs; a zero sum elects +), and the result is the
    sum of the weighted values that agree with the elected sign divided by the NUMBER of sources
    that agree there (zeros never agree; entries where none agrees are 0). Consequences: a
    negative weight makes that source vote with the opposite sign (subtracting a behaviour); the
    weights act as scale factors, so TIES' natural weights are 1 each: an adapter fused with
    itself at [1, 1] gives it back, at [0.5, 0.5] gives half of it. Without election the result
    is the weighted sum.
  * the dense merge is computed one block of rows at a time (``merge_dense``: the same float32
    operations in the same order as ``merge_task_vectors`` on whole matrices, so the same numbers;
    the magnitude threshold is selected exactly without sorting the module), and only the merged
    matrix is held whole.
  * the dense result is re-factored to the output rank (default: the largest input rank) with a
    randomized SVD (Halko et al.: a Gaussian test matrix with ``max(rank, R) + 10`` columns, where
    ``R`` is the sum of the present sources' ranks (the merge is that rank-R structure plus the
    masking's spread), and one power iteration with QR re-orthonormalisation; float32 products
    with the big matrix, float64 for the small ones; the test matrix is drawn from
    ``SeedSequence([seed, 2**32 - 1, *c])``, a stream no adapter index uses). On modules where
    the sketch is not smaller than ``min(out, in)`` a full SVD is used. The error
    ``|dW - b @ a| / |dW|``: from the singular values (``|dW|^2`` minus the kept ``s^2``) when it
    is at least 0.1, else measured on the dense matrices.

Exact re-factoring (``linear``, ``slerp``, ``concat`` with ``rank``): QR of ``B_c`` and of
``A_c^T``, SVD of the small core ``R_B R_A^T`` (the Q factors are applied as ``B_c R_B^-1``
unless a factor is nearly rank-deficient; see ``refactor_exact``). Singular values ``<= 1e-6 * s_max`` (``REL_TOL``)
are treated as exact zeros: they are round-off (the float32 inputs themselves carry ~6e-8
relative error), so they are dropped without counting as error. If ``rank`` is smaller than what
remains, the best rank-r approximation is kept (Eckart-Young) and
``error = sqrt(sum of dropped s^2) / sqrt(sum of s^2)``. The same tolerance drops negligible
singular values after the randomized SVD.

Outputs: the singular values go into ``b`` (``b = U S``, ``a = V^T`` with orthonormal rows, as
PEFT's SVD combination does), each component's sign fixed so the largest-magnitude entry of its
row of ``a`` is positive (a deterministic convention). ``rank`` always equals ``a.shape[0]``; a
module whose fused delta is exactly zero is returned as one zero pair (rank 1, error 0.0), since
the caller pads every module to one common rank with zeros anyway.

Factor space (``space="factors"``, the numbers simple merge scripts produce)
-----------------------------------------------------------------------------
Each method is applied tensor by tensor to the A's and, separately, to the B's: ``linear`` gives
``a = sum w_i A_i``, ``b = sum w_i B_i`` (cross terms included: a different function than the
delta average); ``ties``/``dare_*``/``magnitude_prune`` sparsify/elect element-wise on each
factor tensor (the DARE stream of source ``i`` draws A's mask, then B's); ``slerp`` interpolates
the flattened A's and the flattened B's separately, with the same rules as above. Because the
scale is folded into ``B``, averaging B's averages ``s_i B_i``. It needs every source to have the
module and equal ranks (a FusionError names the mismatch); ``concat`` has no factor-space form.
The result is used as is (error 0.0) unless ``rank`` asks for less, then it is re-factored exactly.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from pipeline.errors import FusionError
from pipeline.geometry import gram_matrix

REL_TOL = 1e-6          # singular values <= REL_TOL * s_max are zeros
SLERP_PARALLEL = 1e-6   # |cos| > 1 - SLERP_PARALLEL: linear interpolation
OVERSAMPLE = 10         # extra columns of the randomized SVD's test matrix
POWER_ITERS = 3         # power iterations of the randomized SVD
SIGNAL_ITERS = 1        # power iterations when the sketch spans the sources' whole rank
ERR_FORMULA = 0.1       # re-factoring errors above this come from the singular values
COND_MAX = 1e8          # exact re-factoring solves with R when cond(R) is at most this,
COND_GRAM = 100.0       # and takes R from the Gram matrix when cond is at most this
RSVD_STREAM = 2**32 - 1  # pseudo adapter index of the randomized SVD's random stream
BLOCK = 1 << 17         # entries per row block of the dense path (512 KiB of float32)
GEMM_BLOCK = 1 << 15    # entries per rank-r product call within a block
EXACT_SELECT = 1 << 18  # modules up to this many entries select the magnitude threshold by partition
SELECT_SAMPLE = 1 << 16  # sampled entries that bracket the magnitude threshold of larger modules
SELECT_SIGMAS = 6.0     # half-width of that bracket, in standard deviations of a sample quantile
SIGN_METHODS = ("total", "frequency")
SPACES = ("delta", "factors")


@dataclass(frozen=True)
class ModuleParams:
    weights: tuple[float, ...]      # one per source, negative allowed
    density: float = 1.0            # (0, 1]
    majority_sign_method: str = "total"   # "total" | "frequency"
    t: float = 0.5                  # slerp
    rank: int | None = None         # output rank; None = method default
    seed: int = 0
    space: str = "delta"            # "delta" | "factors"


@dataclass
class FusedModule:
    a: np.ndarray   # (r, in) float32
    b: np.ndarray   # (out, r) float32   -> fused delta = b @ a
    rank: int       # == a.shape[0]
    error: float    # |dW - b @ a| / |dW| versus the method's exact result (0.0 if exact or dW == 0)


@dataclass(frozen=True)
class Method:
    """A registry entry: what a method is called, what it reads, what it guarantees."""
    name: str
    summary: str
    params: tuple[str, ...]
    exact: bool                          # exact in delta space (no dense matrix, no sampling)
    min_adapters: int = 1
    max_adapters: int | None = None
    sparsify: str | None = None          # task-vector family: None | "magnitude" | "random"
    elect_signs: bool = False            # task-vector family: TIES sign election + disjoint mean
    spaces: tuple[str, ...] = SPACES


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", "weighted sum of the deltas (task arithmetic), exact",
           ("weights", "rank"), exact=True),
    Method("concat", "the stacked factors of the weighted deltas, exact, rank = sum of ranks",
           ("weights", "rank"), exact=True, spaces=("delta",)),
    Method("slerp", "spherical interpolation of the deltas (barycentric for 3+), exact",
           ("weights", "t", "rank"), exact=True, min_adapters=2),
    Method("ties", "trim by magnitude, elect a sign per entry, mean of the agreeing entries",
           ("weights", "density", "majority_sign_method", "rank"), exact=False,
           sparsify="magnitude", elect_signs=True),
    Method("dare_linear", "random drop with rescaling, then the weighted sum",
           ("weights", "density", "seed", "rank"), exact=False, sparsify="random"),
    Method("dare_ties", "random drop with rescaling, then the TIES election",
           ("weights", "density", "majority_sign_method", "seed", "rank"), exact=False,
           sparsify="random", elect_signs=True),
    Method("magnitude_prune", "trim by magnitude, then the weighted sum",
           ("weights", "density", "rank"), exact=False, sparsify="magnitude"),
)}


# --- parameter checks --------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_params(method: str, n_sources: int, p: ModuleParams) -> None:
    """Raise FusionError for any user mistake in ``method``/``p``; cheap, call it before the math."""
    if method not in METHODS:
        raise FusionError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    m = METHODS[method]
    if p.space not in SPACES:
        raise FusionError(f"space must be 'delta' or 'factors', got {p.space!r}")
    if p.space not in m.spaces:
        raise FusionError(f"method {method!r} works in delta space only, not space {p.space!r}")
    if n_sources < m.min_adapters:
        raise FusionError(f"method {method!r} needs at least {m.min_adapters} adapters, got {n_sources}")
    if m.max_adapters is not None and n_sources > m.max_adapters:
        raise FusionError(f"method {method!r} takes at most {m.max_adapters} adapters, got {n_sources}")
    w = p.weights
    if not isinstance(w, (tuple, list)) or len(w) != n_sources:
        got = len(w) if isinstance(w, (tuple, list)) else "no list of"
        raise FusionError(f"{got} weights for {n_sources} adapters: give one weight per adapter")
    if not all(_is_real(x) and math.isfinite(x) for x in w):
        raise FusionError(f"weights must be finite numbers, got {list(w)!r}")
    if not _is_real(p.density) or not (0.0 < p.density <= 1.0):
        raise FusionError(f"density must be in (0, 1], got {p.density!r}")
    if not _is_real(p.t) or not (0.0 <= p.t <= 1.0):
        raise FusionError(f"t must be in [0, 1], got {p.t!r}")
    if p.majority_sign_method not in SIGN_METHODS:
        raise FusionError(f"majority_sign_method must be 'total' or 'frequency', "
                          f"got {p.majority_sign_method!r}")
    if p.rank is not None and (not _is_int(p.rank) or p.rank < 1):
        raise FusionError(f"rank must be a positive integer, got {p.rank!r}")
    if not _is_int(p.seed) or p.seed < 0:
        raise FusionError(f"seed must be a non-negative integer, got {p.seed!r}")
    if method == "slerp":
        if any(x < 0 for x in w):
            raise FusionError(f"slerp weights are barycentric coordinates and cannot be negative, "
                              f"got {list(w)!r}")
        if n_sources > 2 and sum(w) <= 0:
            raise FusionError(f"slerp of {n_sources} adapters needs weights with a positive sum, "
                              f"got {list(w)!r}")


# --- seeding -----------------------------------------------------------------------------------

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


# --- small composable pieces (each works on a 3x3 array) ---------------------------------------

def prune_magnitude(x: np.ndarray, density: float) -> np.ndarray:
    """Keep the ``max(1, round(density * size))`` largest-magnitude entries (all ties at the
    threshold kept), zero the rest."""
    if density >= 1.0:
        return x
    mag = np.abs(x).ravel()
    k = max(1, int(math.floor(density * mag.size + 0.5)))
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


def disjoint_mean(stack: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Sum of the entries of ``stack`` (n, ...) whose sign is ``signs`` divided by their count
    (zeros never agree; 0 where no entry agrees)."""
    agree = np.where(signs > 0, stack > 0, stack < 0)
    total = np.where(agree, stack, np.zeros((), stack.dtype)).sum(axis=0)
    count = agree.sum(axis=0)
    return total / np.maximum(count, 1).astype(stack.dtype)


def merge_task_vectors(tensors: Iterable[np.ndarray], weights: Sequence[float], *,
                       sparsify: str | None = None, density: float = 1.0,
                       elect: str | None = None,
                       rngs: Sequence[np.random.Generator] | None = None) -> np.ndarray:
    """The task-vector family: sparsify each tensor, multiply by its weight, then either sum, or
    elect a sign per entry (``elect`` = "total" | "frequency") and take the disjoint mean.

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
        x = x * x.dtype.type(w)
        if elect:
            if stack is None:
                stack = np.empty((len(weights), *x.shape), x.dtype)
            stack[i] = x
        else:
            out = x if out is None else out + x
    if elect:
        return disjoint_mean(stack, elect_sign(stack, elect))
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


def stack_factors(sources: Sequence, coeffs: Sequence[float], shape: tuple[int, int],
                  dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """``B_c = [c_1 B_1 | ...]`` (out, R) and ``A_c = [A_1; ...]`` (R, in) over present sources,
    so ``B_c @ A_c = sum_i c_i B_i A_i``."""
    out, fin = shape
    present = [(s, float(c)) for s, c in zip(sources, coeffs) if s is not None]
    if not present:
        return np.zeros((out, 0), dtype), np.zeros((0, fin), dtype)
    ranks = [s[0].shape[0] for s, _ in present]
    bc = np.empty((out, sum(ranks)), dtype)
    ac = np.empty((sum(ranks), fin), dtype)
    r0 = 0
    for (s, c), r in zip(present, ranks):
        np.multiply(np.asarray(s[1], dtype=np.float64), c, out=bc[:, r0:r0 + r], casting="unsafe")
        ac[r0:r0 + r] = s[0]
        r0 += r
    return bc, ac


def _fix_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip component j of (u[:, j], vt[j]) so the largest-magnitude entry of vt[j] is positive."""
    if vt.shape[0] == 0:
        return u, vt
    idx = np.argmax(np.abs(vt), axis=1)
    sgn = np.where(vt[np.arange(vt.shape[0]), idx] < 0, -1.0, 1.0)
    return u * sgn, vt * sgn[:, None]


def _zero_module(shape: tuple[int, int]) -> FusedModule:
    out, fin = shape
    return FusedModule(np.zeros((1, fin), np.float32), np.zeros((out, 1), np.float32), 1, 0.0)


def _keep_count(s: np.ndarray, rank: int | None, tol: float) -> tuple[int, int]:
    """(significant, kept): singular values above tol * s_max, and those kept under ``rank``."""
    if s.size == 0 or s[0] <= 0:
        return 0, 0
    nz = int(np.count_nonzero(s > tol * s[0]))
    return nz, nz if rank is None else min(nz, rank)


def _from_svd(u, s, vt, k: int, shape, error: float) -> FusedModule:
    if k == 0:
        return _zero_module(shape)
    u, vt = _fix_signs(u[:, :k], vt[:k])
    b = (u * s[:k]).astype(np.float32)
    return FusedModule(np.ascontiguousarray(vt, dtype=np.float32), np.ascontiguousarray(b), k, error)


def _cond(r: np.ndarray) -> float:
    sv = np.linalg.svd(r, compute_uv=False)
    return float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf


def _triangular(x: np.ndarray) -> np.ndarray | None:
    """An upper-triangular ``R`` with ``x = Q R`` (``x``: n x R float64, Q with orthonormal
    columns, never formed) and ``cond(R) <= COND_MAX``, or None when ``x`` is too close to
    rank-deficient for that (or has fewer rows than columns).

    ``R`` is the Cholesky factor of ``x^T x`` when ``cond(x) <= COND_GRAM`` (its error, about
    ``cond^2 * 1e-16``, is then far below float32's rounding; a Gram product costs a fifth of a
    Householder QR), else the R of a Householder QR (error about ``cond * 1e-16``)."""
    n, k = x.shape
    if n < k:
        return None
    try:
        r = np.linalg.cholesky(x.T @ x).T
        if _cond(r) <= COND_GRAM:
            return r
    except np.linalg.LinAlgError:
        pass
    r = np.linalg.qr(x, mode="r")
    return r if _cond(r) <= COND_MAX else None


def refactor_exact(bc: np.ndarray, ac: np.ndarray, rank: int | None = None,
                   tol: float = REL_TOL) -> FusedModule:
    """Re-factor ``bc @ ac`` ((out, R) @ (R, in)) without forming it: QR of both factors, SVD of
    the small core; exact smaller rank (s <= tol * s_max dropped as zeros), or the best rank-r
    approximation when ``rank`` is smaller, with its relative error.

    Only the triangular factors are needed (``bc = Q_b R_b``, ``ac^T = Q_a R_a``, see
    ``_triangular``): with the core ``R_b R_a^T = U S V^T``, the outputs are
    ``Q_b U = bc R_b^-1 U`` and ``V^T Q_a^T = (ac^T R_a^-1 V)^T``, two small triangular solves and
    two skinny products (forming Q costs three times as much as R). A factor that is (nearly)
    rank-deficient (an adapter fused with itself, a zero weight) has no usable R^-1: then both Q
    are formed by Householder QR, as the dense reference does."""
    shape = (bc.shape[0], ac.shape[1])
    if bc.shape[1] == 0:
        return _zero_module(shape)
    bc = np.asarray(bc, dtype=np.float64)
    act = np.asarray(ac, dtype=np.float64).T
    rb = _triangular(bc)
    ra = _triangular(act) if rb is not None else None
    fast = ra is not None
    if not fast:
        qb, rb = np.linalg.qr(bc)
        qa, ra = np.linalg.qr(act)
    u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
    nz, k = _keep_count(s, rank, tol)
    err = 0.0
    if k < nz:
        err = float(math.sqrt(np.sum(s[k:nz] ** 2) / np.sum(s[:nz] ** 2)))
    if k == 0:
        return _zero_module(shape)
    if fast:
        left = bc @ np.linalg.solve(rb, u[:, :k])                # Q_b U_k
        right = (act @ np.linalg.solve(ra, vt[:k].T)).T          # V_k^T Q_a^T
    else:
        left, right = qb @ u[:, :k], vt[:k] @ qa.T
    return _from_svd(left, s, right, k, shape, err)


def _orth(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the columns of ``y`` (float64 QR), returned as float32."""
    return np.linalg.qr(y.astype(np.float64))[0].astype(np.float32)


def randomized_svd(m: np.ndarray, rank: int, rng: np.random.Generator, n_iter: int = POWER_ITERS,
                   oversample: int = OVERSAMPLE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` SVD ``(u (out, k), s (k,), vt (k, in))`` of ``m`` (float64 outputs), Halko et
    al.: Gaussian test matrix with ``oversample`` extra columns, ``n_iter`` power iterations
    with QR in between. Falls back to a full SVD when the sketch would not be smaller."""
    out, fin = m.shape
    k = min(rank, out, fin)
    ell = k + oversample
    if ell >= min(out, fin):
        u, s, vt = np.linalg.svd(np.asarray(m, dtype=np.float64), full_matrices=False)
        return u[:, :k], s[:k], vt[:k]
    m = np.asarray(m, dtype=np.float32)
    omega = rng.standard_normal((fin, ell), dtype=np.float32)
    q = _orth(m @ omega)                      # (out, ell)
    for _ in range(n_iter):
        q = _orth(m.T @ q)                    # (in, ell)
        q = _orth(m @ q)                      # (out, ell)
    small = (q.T @ m).astype(np.float64)      # (ell, in)
    u, s, vt = np.linalg.svd(small, full_matrices=False)
    return q.astype(np.float64) @ u[:, :k], s[:k], vt[:k]


def _row_step(fin: int) -> int:
    """Rows per block of the blocked dense path: about ``BLOCK`` entries, so a block stays in cache."""
    return max(1, BLOCK // max(1, fin))


def _sq(x: np.ndarray) -> float:
    """Sum of squares of a float32 block (a BLAS dot), as a Python float."""
    x = x.ravel()
    return float(np.dot(x, x))


def _frob2(x: np.ndarray) -> float:
    """Squared Frobenius norm, in row blocks."""
    step = _row_step(x.shape[1]) if x.ndim == 2 else max(1, x.shape[0])
    return sum(_sq(np.ascontiguousarray(x[i:i + step], np.float32)) for i in range(0, x.shape[0], step))


def _residual_error(m: np.ndarray, a: np.ndarray, b: np.ndarray, norm2: float | None = None) -> float:
    """|m - b @ a| / |m|, row block by row block (``b @ a`` is never formed whole)."""
    total = _frob2(m) if norm2 is None else norm2
    if total == 0.0:
        return 0.0
    out, fin = m.shape
    step = _row_step(fin)
    buf = np.empty((min(step, out), fin), np.float32)
    res = 0.0
    for r0 in range(0, out, step):
        d = buf[:min(out, r0 + step) - r0]
        np.matmul(b[r0:r0 + step], a, out=d)
        np.subtract(m[r0:r0 + step], d, out=d)
        res += _sq(d)
    return math.sqrt(res / total)


def refactor_dense(m: np.ndarray, rank: int, rng: np.random.Generator,
                   tol: float = REL_TOL, norm2: float | None = None,
                   signal_rank: int | None = None) -> FusedModule:
    """Rank-``rank`` factors of the dense ``m`` by randomized SVD, with the measured error.

    ``norm2`` is ``|m|^2`` when the caller already has it. ``signal_rank`` is the rank of the
    structure ``m`` was made from (the sum of the sources' ranks, before masking): the sketch then
    spans all of it, ``max(rank, signal_rank) + OVERSAMPLE`` columns, and one power iteration is
    enough (``SIGNAL_ITERS``). A sketch narrower than that structure has to separate directions of
    nearly equal weight by power iterations alone, which is where three iterations of a
    ``rank + 10`` sketch still left errors up to 1% above the optimum on masked merges of random
    adapters of Llama sizes, against under 0.1% for the wider sketch with one iteration, at less
    cost. Without ``signal_rank``: ``rank + OVERSAMPLE`` columns and ``POWER_ITERS`` iterations.

    The error: when it is large (at least ``ERR_FORMULA``, the usual case after masking), from the
    singular values, ``|m - Q Q^T m_k|^2 = |m|^2 - sum of the kept s^2`` (Q has orthonormal
    columns), which saves a pass over ``m``; when it is small, where that difference would lose
    its digits, from the residual itself, row block by row block."""
    m = np.asarray(m, np.float32)
    if norm2 is None:
        norm2 = _frob2(m)
    if norm2 == 0.0 and not np.any(m):
        return _zero_module(m.shape)
    if signal_rank is None:
        u, s, vt = randomized_svd(m, rank, rng)
    else:
        k = min(rank, *m.shape)
        u, s, vt = randomized_svd(m, rank, rng, n_iter=SIGNAL_ITERS,
                                  oversample=max(k, signal_rank) - k + OVERSAMPLE)
    _, k = _keep_count(s, None, tol)
    fm = _from_svd(u, s, vt, k, m.shape, 0.0)
    err2 = 1.0 - float(np.sum(s[:k] ** 2)) / norm2 if norm2 > 0.0 else 0.0
    if err2 >= ERR_FORMULA ** 2:
        fm.error = math.sqrt(err2)
    else:
        fm.error = _residual_error(m, fm.a, fm.b, norm2 if norm2 > 0.0 else None)
    return fm


# --- the dense path, row block by row block ------------------------------------------------------
#
# The masking methods need each source's dense delta. Forming every ``B_i @ A_i`` whole and running
# ``merge_task_vectors`` on the stack reads and writes each dense matrix many times over (one
# temporary per numpy operation), which at real sizes is hundreds of megabytes per operation.
# ``merge_dense`` computes the same numbers one block of rows at a time: the rank-r product of a
# block is cheaper to recompute than to store, every operation works in place on a block that stays
# in cache, and only the merged result (one dense module) is ever held whole. The magnitude
# threshold is selected exactly without sorting the module (``magnitude_threshold``). The tests hold
# ``merge_dense`` equal to ``merge_task_vectors`` on the dense deltas, entry for entry.

def _matmul_rows(b: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """``out = b @ a`` in chunks of about ``GEMM_BLOCK`` entries: a rank-r product that small
    runs at twice the speed of a larger one (measured with OpenBLAS), with the same result (each
    entry is the same k-ordered sum whatever the chunking)."""
    step = max(1, GEMM_BLOCK // max(1, a.shape[1]))
    for r0 in range(0, b.shape[0], step):
        np.matmul(b[r0:r0 + step], a, out=out[r0:r0 + step])


def _blocks(b: np.ndarray, a: np.ndarray, buf: np.ndarray):
    """Yield ``(r0, r1, block)`` with ``block = b[r0:r1] @ a`` written into ``buf`` (float32)."""
    out, step = b.shape[0], buf.shape[0]
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        d = buf[:r1 - r0]
        _matmul_rows(b[r0:r1], a, d)
        yield r0, r1, d


_local = threading.local()


def _workspace(shape: tuple[int, int]) -> np.ndarray:
    """A float32 array of ``shape`` reused by the calling thread from module to module: a fresh
    array of a dense module's size is fresh memory, and first touching it costs as much as the
    arithmetic that fills it."""
    size = shape[0] * shape[1]
    buf = getattr(_local, "dense", None)
    if buf is None or buf.size < size:
        _local.dense = None
        buf = _local.dense = np.empty(size, np.float32)
    return buf[:size].reshape(shape)


def _f32_source(source) -> tuple[np.ndarray, np.ndarray]:
    a, b = source
    return np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)


def magnitude_threshold(source, shape: tuple[int, int], density: float, *,
                        exact_below: int | None = None) -> np.float32 | None:
    """The magnitude from which ``prune_magnitude`` keeps entries of the source's dense delta
    (kept: ``|x| >= thr``), or None when it keeps everything; exact, without sorting the module.

    ``thr`` is the k-th largest ``|x|`` (``k = max(1, round(density * size))``). Modules of up to
    ``exact_below`` entries partition all magnitudes. Larger ones sort a random sample of entries
    to bracket the k-th largest between two sampled values ``lo <= hi``, count the entries above
    ``hi`` and collect those in ``[lo, hi]`` in one blocked pass, and partition only those; if the
    bracket missed (a 6-sigma event), the full partition decides. The sample only sets the speed:
    the result is the k-th largest in every case."""
    if density >= 1.0:
        return None
    a, b = _f32_source(source)
    out, fin = shape
    size = out * fin
    k = max(1, int(math.floor(density * size + 0.5)))
    if k >= size:
        return None
    buf = np.empty((min(_row_step(fin), out), fin), np.float32)
    exact_below = EXACT_SELECT if exact_below is None else exact_below
    if size > exact_below:
        rng = np.random.default_rng([k, size])
        flat = rng.integers(0, size, SELECT_SAMPLE)
        rows, cols = np.divmod(flat, fin)
        sample = np.abs(np.einsum("ij,ji->i", b[rows], a[:, cols]))
        sample.sort()
        n = sample.size
        q = (size - k) / size          # the k-th largest is the (size - k)-th smallest
        margin = SELECT_SIGMAS * math.sqrt(n * q * (1.0 - q)) + 2.0
        lo_i, hi_i = int(math.floor(q * n - margin)), int(math.ceil(q * n + margin))
        lo = np.float32(sample[lo_i] * (1 - 1e-5)) if lo_i >= 0 else np.float32(0.0)
        hi = np.float32(sample[hi_i] * (1 + 1e-5)) if hi_i < n else np.float32(np.inf)
        above, found = 0, []
        gt = np.empty(buf.shape, bool)
        ge = np.empty(buf.shape, bool)
        for r0, r1, d in _blocks(b, a, buf):
            h = r1 - r0
            np.abs(d, out=d)
            np.greater(d, hi, out=gt[:h])
            above += int(np.count_nonzero(gt[:h]))
            np.greater_equal(d, lo, out=ge[:h])
            np.logical_xor(ge[:h], gt[:h], out=ge[:h])   # lo <= |x| <= hi
            found.append(d[ge[:h]])
        cand = np.concatenate(found)
        need = k - above                                 # the need-th largest candidate
        if 1 <= need <= cand.size:
            return np.float32(np.partition(cand, cand.size - need)[cand.size - need])
    mag = np.empty(size, np.float32)
    for r0, r1, d in _blocks(b, a, buf):
        np.abs(d, out=mag[r0 * fin:r1 * fin].reshape(d.shape))
    return np.float32(np.partition(mag, size - k)[size - k])


def merge_dense(sources: Sequence, weights: Sequence[float], shape: tuple[int, int], *,
                sparsify: str | None = None, density: float = 1.0, elect: str | None = None,
                rngs: Sequence[np.random.Generator] | None = None,
                out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """``merge_task_vectors`` of the sources' dense deltas ``B_i @ A_i`` (every source present),
    computed row block by row block: ``(merged (out, in) float32, |merged|^2)``.

    The same float32 operations in the same order as the reference (sparsify, weight, then the
    sum, or the election and the disjoint mean), so the same numbers (up to the sign of zeros);
    DARE draws each source's stream in row order, which is the stream a whole-matrix draw gives.
    ``out``: a float32 array of ``shape`` to write into (for example a reused workspace)."""
    if sparsify not in (None, "magnitude", "random"):
        raise ValueError(f"unknown sparsify {sparsify!r}")
    if elect not in (None, "total", "frequency"):
        raise FusionError(f"majority_sign_method must be 'total' or 'frequency', got {elect!r}")
    rows, fin = shape
    srcs = [_f32_source(s) for s in sources]
    n = len(srcs)
    f32 = np.float32
    ws = [f32(w) for w in weights]
    d32 = f32(density)
    thr = ([magnitude_threshold(s, shape, density) for s in srcs] if sparsify == "magnitude"
           else [None] * n)
    random = sparsify == "random" and density < 1.0
    merged = np.empty(shape, f32) if out is None else out
    step = min(_row_step(fin), rows)
    xs = np.empty((n, step, fin), f32)
    tmp = np.empty((step, fin), f32)
    keep = np.empty((step, fin), bool)
    if elect:
        count = np.empty((step, fin), np.uint8)
    norm2 = 0.0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        h = r1 - r0
        acc = merged[r0:r1]
        for i, (a, b) in enumerate(srcs):
            x = acc if (i == 0 and not elect) else xs[i, :h]
            _matmul_rows(b[r0:r1], a, x)
            if thr[i] is not None:                       # keep |x| >= thr
                np.abs(x, out=tmp[:h])
                np.greater_equal(tmp[:h], thr[i], out=keep[:h])
                np.multiply(x, keep[:h], out=x)
            elif random:                                 # keep u < density, survivors / density
                rngs[i].random(dtype=f32, out=tmp[:h])
                np.less(tmp[:h], d32, out=keep[:h])
                np.divide(x, d32, out=x)
                np.multiply(x, keep[:h], out=x)
            np.multiply(x, ws[i], out=x)
            if not elect and i > 0:
                np.add(acc, x, out=acc)
        if elect:
            _elect_block(xs[:, :h], elect, acc, tmp[:h], keep[:h], count[:h])
        norm2 += _sq(acc)
    return merged, norm2


def _elect_block(xs: np.ndarray, method: str, total: np.ndarray, votes: np.ndarray,
                 agree: np.ndarray, count: np.ndarray) -> None:
    """``disjoint_mean(xs, elect_sign(xs, method))`` written into ``total``; ``xs`` is used as
    scratch, as are ``votes`` (float32), ``agree`` (bool) and ``count`` (uint8).

    With ``s`` the elected sign, ``x`` agrees exactly when ``s x > 0``, so the sum of the agreeing
    entries is ``s * sum_i max(s x_i, 0)``: the same float32 sum as the reference's, since a sign
    flip is exact and rounding is symmetric. ``s x`` is ``x`` with its sign bit flipped where the
    votes are negative. A vote of -0.0 (which elects +) only comes from entries that are all zero,
    which agree with neither sign, so reading it as - changes nothing."""
    n = xs.shape[0]
    if method == "total":                                # votes: the sum of the values, in order
        np.copyto(votes, xs[0])
        for i in range(1, n):
            np.add(votes, xs[i], out=votes)
    else:                                                # votes: the sum of their signs
        np.sign(xs[0], out=votes)
        scratch = total                                  # written last, free until then
        for i in range(1, n):
            np.sign(xs[i], out=scratch)
            np.add(votes, scratch, out=votes)
    flip = votes.view(np.uint32)
    np.bitwise_and(flip, np.uint32(0x80000000), out=flip)   # the sign bit of the votes
    count.fill(0)
    acc = xs[0]
    for i in range(n):
        x = xs[i]
        bits = x.view(np.uint32)
        np.bitwise_xor(bits, flip, out=bits)             # s * x
        np.greater(x, 0, out=agree)
        np.add(count, agree.view(np.uint8), out=count)
        np.maximum(x, np.float32(0), out=x)
        if i > 0:
            np.add(acc, x, out=acc)
    bits = acc.view(np.uint32)
    np.bitwise_xor(bits, flip, out=bits)                 # back to the elected sign
    np.maximum(count, np.uint8(1), out=count)
    np.divide(acc, count, out=total)


# --- the methods -------------------------------------------------------------------------------

def dense_delta(source, shape: tuple[int, int]) -> np.ndarray:
    """``B @ A`` in float32 (zeros for a missing source)."""
    if source is None:
        return np.zeros(shape, np.float32)
    a, b = source
    return np.asarray(b, np.float32) @ np.asarray(a, np.float32)


def _check_sources(sources: Sequence, shape: tuple[int, int], name: str) -> None:
    out, fin = shape
    for i, s in enumerate(sources):
        if s is None:
            continue
        a, b = s
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fin or b.shape[0] != out or a.shape[0] != b.shape[1]:
            raise FusionError(f"module {name}: adapter {i + 1} has factors A {tuple(a.shape)}, "
                              f"B {tuple(b.shape)}; expected A (r, {fin}) and B ({out}, r)")


def _fuse_delta(sources, shape, m: Method, p: ModuleParams, name: str) -> FusedModule:
    present = [s for s in sources if s is not None]
    if not present:
        return _zero_module(shape)
    if m.name in ("linear", "concat"):
        bc, ac = stack_factors(sources, p.weights, shape)
        if m.name == "concat" and (p.rank is None or p.rank >= ac.shape[0]):
            return FusedModule(ac.astype(np.float32), bc.astype(np.float32), ac.shape[0], 0.0)
        return refactor_exact(bc, ac, p.rank)
    if m.name == "slerp":
        coeffs = slerp_coefficients(gram_matrix(sources), p.weights, p.t)
        bc, ac = stack_factors(sources, coeffs, shape)
        return refactor_exact(bc, ac, p.rank)
    # task-vector family on the dense deltas of the present sources, row block by row block
    idx = [i for i, s in enumerate(sources) if s is not None]
    rngs = [source_rng(p.seed, name, i) for i in idx] if m.sparsify == "random" else None
    merged, norm2 = merge_dense([sources[i] for i in idx], [p.weights[i] for i in idx], shape,
                                sparsify=m.sparsify, density=p.density,
                                elect=p.majority_sign_method if m.elect_signs else None, rngs=rngs,
                                out=_workspace(shape))
    rank = p.rank if p.rank is not None else max(s[0].shape[0] for s in present)
    return refactor_dense(merged, rank, svd_rng(p.seed, name), norm2=norm2,
                          signal_rank=sum(s[0].shape[0] for s in present))


def _fuse_factors(sources, shape, m: Method, p: ModuleParams, name: str) -> FusedModule:
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
    if m.name == "slerp":
        def interp(ts):
            flat = np.stack([x.ravel().astype(np.float64) for x in ts])
            c = slerp_coefficients(flat @ flat.T, p.weights, p.t)
            return np.tensordot(c, np.stack(ts).astype(np.float64), axes=1).astype(np.float32)
        a, b = interp(As), interp(Bs)
    else:
        rngs = [source_rng(p.seed, name, i) for i in range(len(sources))] if m.sparsify == "random" else None
        kw = dict(sparsify=m.sparsify, density=p.density,
                  elect=p.majority_sign_method if m.elect_signs else None, rngs=rngs)
        a = merge_task_vectors(As, p.weights, **kw)
        b = merge_task_vectors(Bs, p.weights, **kw)
    if p.rank is not None and p.rank < ranks[0]:
        return refactor_exact(b, a, p.rank)
    return FusedModule(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32),
                       ranks[0], 0.0)


def fuse_module(sources: Sequence, shape: tuple[int, int], method: str, p: ModuleParams,
                name: str) -> FusedModule:
    """Fuse one module: ``sources[i]`` is ``(A (r_i, in), B (out, r_i))`` with the scale folded
    into B, or None; ``shape`` is (out, in); ``name`` seeds the random streams."""
    check_params(method, len(sources), p)
    _check_sources(sources, shape, name)
    m = METHODS[method]
    if p.space == "factors":
        return _fuse_factors(sources, shape, m, p, name)
    return _fuse_delta(sources, shape, m, p, name)
