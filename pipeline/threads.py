"""Thread counts: the fuse's worker pool, and OpenBLAS's own threads held down while work runs.

``blas_threads(n)`` sets every OpenBLAS loaded in this process (numpy's, and the one MLX uses
through ``pipeline._blas``) to ``n`` threads inside a block and restores the counts after.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

from pipeline.errors import FusionError


# Modules are fused on a pool of worker threads (numpy releases the GIL in BLAS and in the element-
# wise loops), one module per thread, with OpenBLAS itself held to one thread for the duration.
# The work per module is many small products (rank-r factors, skinny QRs, row blocks) for which
# OpenBLAS's own threads cost more than they bring, and on a busy machine they spin-wait: measured
# on 2 cores shared with other jobs, with the code before this threading, the exact methods on
# 1B-sized adapters took 15.6 s with two OpenBLAS threads and 3.0 s with one; with the current
# code, TIES on the 1B pair took 204 s against 20 s (bench/README.md: the thread comparison; how
# bad two threads get depends on the other jobs). Each module's numbers do not depend on the
# thread count. Masking methods hold one dense module per worker, so the pool is no larger than
# half the available memory allows.

def blas_thread_count() -> int:
    """OpenBLAS threads inside a fuse: 1, or ``FUSION_BLAS_THREADS`` (for measuring the difference)."""
    env = os.environ.get("FUSION_BLAS_THREADS", "").strip()
    try:
        return max(1, int(env)) if env else 1
    except ValueError:
        raise FusionError(f"FUSION_BLAS_THREADS must be a positive integer, got {env!r}") from None


def worker_count(dense_bytes: int = 0) -> int:
    """Worker threads: ``FUSION_THREADS`` if set, else the cores this process may run on, but no
    more than half the available memory can hold when each worker needs ``dense_bytes`` (about
    two dense modules: the merge and its scratch)."""
    env = os.environ.get("FUSION_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise FusionError(f"FUSION_THREADS must be a positive integer, got {env!r}") from None
    try:
        n = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        n = max(1, os.cpu_count() or 1)
    if dense_bytes:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            n = min(n, max(1, int(avail // 2 // dense_bytes)))
        except (AttributeError, ValueError, OSError):
            pass
    return n


_SETTERS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))


def _openblas_libs() -> list[tuple]:
    """(set, get) thread-count functions of every OpenBLAS loaded in this process (numpy's,
    and the one MLX may use); empty where there is none or no /proc (macOS: Accelerate)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f
                            if "openblas" in line.lower() and ".so" in line.split()[-1]})
    except OSError:
        return []
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _SETTERS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                found.append((setter, getter))
                break
    return found


@contextmanager
def blas_threads(n: int, mlx: bool = True):
    """Run the block with OpenBLAS limited to ``n`` threads, then restore the previous counts.
    With ``mlx`` (a block that may run MLX), the fast-BLAS shim is loaded first
    (``pipeline._blas``), so MLX's OpenBLAS is held down too; loading it costs about 0.05 s."""
    if mlx:
        from pipeline import _blas

        _blas.enable()
    libs = _openblas_libs()
    before = [get() for _, get in libs]
    for set_, _ in libs:
        set_(n)
    try:
        yield
    finally:
        for (set_, _), prev in zip(libs, before):
            set_(prev)

