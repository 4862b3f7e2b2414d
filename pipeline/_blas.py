"""Route MLX's CPU matrix products to OpenBLAS on Linux.

The Linux ``mlx-cpu`` wheel links a reference BLAS whose sgemm runs at a few GFLOP/s. The
``scipy-openblas32`` wheel ships OpenBLAS with ``scipy_``-prefixed symbols, so a three-function
shim exporting the plain ``cblas_?gemm`` names is compiled once (needs a C compiler) and loaded
with RTLD_GLOBAL *before* ``mlx`` is imported; the dynamic linker then binds MLX's matmuls to it.
Measured on 2 cores: 1024x1024 sgemm 5.5 -> 170 GFLOP/s. Without a compiler, or on macOS
(Accelerate), nothing happens. Set ``FUSION_NO_FAST_BLAS=1`` to turn it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_SHIM = r"""
typedef int I;
extern void scipy_cblas_sgemm(I,I,I,I,I,I,float,const float*,I,const float*,I,float,float*,I);
extern void scipy_cblas_dgemm(I,I,I,I,I,I,double,const double*,I,const double*,I,double,double*,I);
extern void scipy_cblas_cgemm(I,I,I,I,I,I,const void*,const void*,I,const void*,I,const void*,void*,I);
void cblas_sgemm(I o,I ta,I tb,I m,I n,I k,float al,const float*a,I lda,const float*b,I ldb,float be,float*c,I ldc)
{scipy_cblas_sgemm(o,ta,tb,m,n,k,al,a,lda,b,ldb,be,c,ldc);}
void cblas_dgemm(I o,I ta,I tb,I m,I n,I k,double al,const double*a,I lda,const double*b,I ldb,double be,double*c,I ldc)
{scipy_cblas_dgemm(o,ta,tb,m,n,k,al,a,lda,b,ldb,be,c,ldc);}
void cblas_cgemm(I o,I ta,I tb,I m,I n,I k,const void*al,const void*a,I lda,const void*b,I ldb,const void*be,void*c,I ldc)
{scipy_cblas_cgemm(o,ta,tb,m,n,k,al,a,lda,b,ldb,be,c,ldc);}
"""

active = False
CORETYPE = "Haswell"


def pin_kernels() -> None:
    """Make OpenBLAS use the same kernels on every x86-64 machine with AVX2 (``OPENBLAS_CORETYPE``).

    OpenBLAS picks its kernels by CPU, and different kernels round differently: measured, the demo's
    first pretraining loss was 6.04224967956543 with the kernels chosen on an AVX-512 machine and
    6.0422492027282715 with the Haswell ones, and the difference grew into other adapters and other
    scores. Pinning one kernel set makes a pipeline run reproduce the committed results on any such
    machine. Must run before numpy or MLX load OpenBLAS; a value the user set is kept."""
    if "OPENBLAS_CORETYPE" in os.environ or not sys.platform.startswith("linux"):
        return
    if os.uname().machine not in ("x86_64", "AMD64") or "numpy" in sys.modules:
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return
    if "avx2" in flags and "fma" in flags:
        os.environ["OPENBLAS_CORETYPE"] = CORETYPE


def _build(libdir: Path) -> Path | None:
    import hashlib  # here, not at the top: importing the package (pin_kernels) stays cheap
    import shutil
    import subprocess
    import tempfile

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tag = hashlib.sha256((_SHIM + str(libdir)).encode()).hexdigest()[:12]
    out = Path(sys.prefix) / "lib" / f"fusion-blas-{tag}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "shim.c"
            src.write_text(_SHIM)
            tmp_out = Path(tmp) / out.name
            subprocess.run(
                [cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(tmp_out),
                 f"-L{libdir}", "-lscipy_openblas", f"-Wl,-rpath,{libdir}"],
                check=True, capture_output=True, timeout=60,
            )
            os.replace(tmp_out, out)
    except (OSError, subprocess.SubprocessError):
        return None
    return out


def enable() -> bool:
    """Load the shim if possible; return whether MLX will use OpenBLAS."""
    global active
    if active or not sys.platform.startswith("linux") or os.environ.get("FUSION_NO_FAST_BLAS"):
        return active
    if "mlx.core" in sys.modules:
        return active
    try:
        import scipy_openblas32
    except ImportError:
        return active
    libdir = Path(scipy_openblas32.__file__).parent / "lib"
    shim = _build(libdir)
    if shim is None:
        return active
    import ctypes

    try:
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return active
    active = True
    return active
