"""The dense path of the masking methods, one block of rows at a time.

The masking methods need each source's dense delta. ``merge_dense`` computes the numbers of
:func:`pipeline.methods.ops.merge_task_vectors` on the dense deltas ``B_i @ A_i`` without holding
them: the rank-r product of a row block is cheaper to recompute than to store, every operation works
in place on a block that stays in cache, and only the merged result (one dense module) is ever held
whole. The magnitude threshold is selected exactly without sorting the module. The tests hold these
kernels equal to the references entry for entry.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np

from pipeline.errors import FusionError
from pipeline.methods.lowrank import row_step, sum_squares
from pipeline.methods.ops import keep_count

GEMM_BLOCK = 1 << 15    # entries per rank-r product call within a block
EXACT_SELECT = 1 << 18  # modules up to this many entries select the magnitude threshold by partition
SELECT_SAMPLE = 1 << 16  # sampled entries that bracket the magnitude threshold of larger modules
SELECT_SIGMAS = 6.0     # half-width of that bracket, in standard deviations of a sample quantile


def matmul_rows(b: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """``out = b @ a`` in chunks of about ``GEMM_BLOCK`` entries: a rank-r product that small
    runs at twice the speed of a larger one (measured with OpenBLAS). The chunking sets the
    numbers: OpenBLAS picks its kernel by shape, and for ranks above 8 a chunk's entries can differ
    from a whole-matrix product's in the last bit (measured), so every dense delta, the reference's
    included (``ops.dense_delta``), is computed by this one function."""
    step = max(1, GEMM_BLOCK // max(1, a.shape[1]))
    for r0 in range(0, b.shape[0], step):
        np.matmul(b[r0:r0 + step], a, out=out[r0:r0 + step])


def _blocks(b: np.ndarray, a: np.ndarray, buf: np.ndarray):
    """Yield ``(r0, r1, block)`` with ``block = b[r0:r1] @ a`` written into ``buf`` (float32)."""
    out, step = b.shape[0], buf.shape[0]
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        d = buf[:r1 - r0]
        matmul_rows(b[r0:r1], a, d)
        yield r0, r1, d


_local = threading.local()


def workspace(shape: tuple[int, int]) -> np.ndarray:
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

    ``thr`` is the k-th largest ``|x|`` (``k = keep_count(density, size)``; ``inf`` when ``k = 0``,
    which keeps nothing of a finite delta). Modules of up to ``exact_below`` entries partition all
    magnitudes. Larger ones sort a random sample of entries to bracket the k-th largest between
    two sampled values ``lo <= hi``, count the entries above ``hi`` and collect those in
    ``[lo, hi]`` in one blocked pass, and partition only those; if the bracket missed (a 6-sigma event), the full partition decides. The sample only sets the speed:
    the result is the k-th largest in every case."""
    if density >= 1.0:
        return None
    a, b = _f32_source(source)
    out, fin = shape
    size = out * fin
    k = keep_count(density, size)
    if k >= size:
        return None
    if k == 0:
        return np.float32(np.inf)
    buf = np.empty((min(row_step(fin), out), fin), np.float32)
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
                consensus: str = "peft", rngs: Sequence[np.random.Generator] | None = None,
                out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """``merge_task_vectors`` of the sources' dense deltas ``B_i @ A_i`` (every source present),
    computed row block by row block: ``(merged (out, in) float32, |merged|^2)``.

    The same float32 operations in the same order as the reference (sparsify, weight, then the
    sum; or sparsify, the election in ``consensus``'s convention and the disjoint merge), so the
    same numbers (up to the sign of zeros); DARE draws each source's stream in row order, which is
    the stream a whole-matrix draw gives.
    ``out``: a float32 array of ``shape`` to write into (for example a reused workspace)."""
    if sparsify not in (None, "magnitude", "random"):
        raise ValueError(f"unknown sparsify {sparsify!r}")
    if elect not in (None, "total", "frequency"):
        raise FusionError(f"majority_sign_method must be 'total' or 'frequency', got {elect!r}")
    if consensus not in ("peft", "mergekit"):
        raise FusionError(f"consensus must be 'peft' or 'mergekit', got {consensus!r}")
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
    step = min(row_step(fin), rows)
    xs = np.empty((n, step, fin), f32)
    tmp = np.empty((step, fin), f32)
    keep = np.empty((step, fin), bool)
    if elect:
        divisor = np.empty((step, fin), f32)
    weight_first = not elect or consensus == "mergekit"   # peft elects on the unweighted values
    norm2 = 0.0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        h = r1 - r0
        acc = merged[r0:r1]
        for i, (a, b) in enumerate(srcs):
            x = acc if (i == 0 and not elect) else xs[i, :h]
            matmul_rows(b[r0:r1], a, x)
            if thr[i] is not None:                       # keep |x| >= thr
                np.abs(x, out=tmp[:h])
                np.greater_equal(tmp[:h], thr[i], out=keep[:h])
                np.multiply(x, keep[:h], out=x)
            elif random:                                 # keep u < density, survivors / density
                rngs[i].random(dtype=f32, out=tmp[:h])
                np.less(tmp[:h], d32, out=keep[:h])
                np.divide(x, d32, out=x)
                np.multiply(x, keep[:h], out=x)
            if weight_first:
                np.multiply(x, ws[i], out=x)
            if not elect and i > 0:
                np.add(acc, x, out=acc)
        if elect:
            _elect_block(xs[:, :h], ws, elect, consensus, acc, tmp[:h], keep[:h], divisor[:h])
        norm2 += sum_squares(acc)
    return merged, norm2


def _elect_block(xs: np.ndarray, ws: Sequence[np.float32], method: str, consensus: str,
                 total: np.ndarray, votes: np.ndarray, agree: np.ndarray, divisor: np.ndarray) -> None:
    """``ties_merge`` of the sources' values ``xs`` (n, h, in) written into ``total``: ``xs`` holds
    the unweighted values for ``peft``, the weighted ones for ``mergekit`` (the values it elects on).
    ``xs`` is used as scratch, as are ``votes``, ``divisor`` (float32) and ``agree`` (bool).

    With ``s`` the elected sign, ``x`` agrees exactly when ``s x > 0``, so the sum of the agreeing
    values is ``s * sum_i max(s x_i, 0)`` (``peft``: ``s * sum_i w_i max(s x_i, 0)``): the same
    float32 sum as the reference's, since a sign flip is exact and rounding is symmetric. ``s x``
    is ``x`` with its sign bit flipped where the votes are negative. A vote of -0.0 (which elects
    +) only comes from entries that are all zero, which agree with neither sign, so reading it as
    - changes nothing. The divisor (the count of agreeing sources, or the sum of their weights) is
    a float32 sum: exact for counts up to 2**24."""
    n = xs.shape[0]
    peft = consensus == "peft"
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
    divisor.fill(0)
    acc = xs[0]
    for i in range(n):
        x = xs[i]
        bits = x.view(np.uint32)
        np.bitwise_xor(bits, flip, out=bits)             # s * x
        np.greater(x, 0, out=agree)
        if peft:                                         # count the agreeing sources
            np.add(divisor, agree, out=divisor)
        else:                                            # sum their weights (total: free scratch)
            np.multiply(agree, ws[i], out=total)
            np.add(divisor, total, out=divisor)
        np.maximum(x, np.float32(0), out=x)
        if peft:
            np.multiply(x, ws[i], out=x)
        if i > 0:
            np.add(acc, x, out=acc)
    bits = acc.view(np.uint32)
    np.bitwise_xor(bits, flip, out=bits)                 # back to the elected sign
    np.equal(divisor, 0, out=agree)
    np.add(divisor, agree, out=divisor)                  # a divisor of 0 divides by 1
    np.divide(acc, divisor, out=total)
