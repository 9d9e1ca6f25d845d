"""The fused C++ kernels of the continuous backends (tasks/sampling/cpu_kernels.cpp), compiled for this
CPU on first use and cached by torch (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR).

Building needs a C++ compiler (g++ or clang++) and ninja (a dependency). Where the build fails,
`load()` returns None with a warning that says why, and the backends run their eager-PyTorch
path: the same arithmetic, about half the speed (docs/sampling.md).
SELFDISTILL_CPU_KERNELS=0 selects that path on purpose.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
# -march=native: the 16-lane vector types compile to whatever this CPU has (AVX-512, AVX2, NEON).
# -fopenmp: at::parallel_for is an OpenMP pragma in a header; without it the kernels run on one
# thread. Not linked: the GOMP symbols resolve to the OpenMP runtime torch itself loaded, so
# the kernels share torch's thread pool instead of starting a second one.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]


def _build_id() -> str:
    """What a build is for: -march=native compiles for this CPU (a cache shared by different
    machines, an NFS home, must not hand one CPU's build to another), and against one torch
    install (two venvs alternating on one build dir would rebuild it each time)."""
    import torch

    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    key = f"{platform.machine()} {flags} {torch.__version__} {Path(torch.__file__).parent}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _built(name: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: may move

        return any(Path(_get_build_directory(name, False)).glob("*.so"))
    except Exception:
        return True  # cannot tell: say nothing


@cache
def load():
    """The compiled module, or None (the eager path) with the reason logged."""
    if os.environ.get("SELFDISTILL_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        name = f"selfdistill_cpu_kernels_{_build_id()}"
        if not _built(name):
            # Once per machine and torch install; without a word, the first run looks hung.
            print("continuous backends: compiling the fused CPU kernels for this CPU (once; about 40 s)...",
                  file=sys.stderr, flush=True)
        # Inline, so that torch copies the source into its build dir: a build is then keyed by
        # the source's content, and another checkout of the same code (a DVC or CI workspace)
        # reuses it instead of rebuilding because the path differs.
        return load_inline(name=name, cpp_sources=[SOURCE.read_text()], extra_cflags=CFLAGS, verbose=False)
    except Exception as error:  # no compiler, no ninja, a toolchain that rejects the flags
        log.warning("continuous backends: the fused CPU kernels did not build (%s); using the eager "
                    "PyTorch path, about half as fast", str(error).strip().splitlines()[-1] if str(error) else error)
        return None


@cache
def packed_gemm(kernels) -> bool:
    """Whether `kernels.PackedWeight` (oneDNN's matmul on a weight packed once, through PyTorch's
    x86 quantization ops) computes exactly torch._int_mm's products here: checked once per process
    on random int8 rows and weights of the shapes that matter (a long K, rows not a multiple of
    16). Where it does not, or the ops are missing from this torch, the linears keep _int_mm."""
    import torch

    try:
        generator = torch.Generator().manual_seed(0)
        for rows, k, m in ((1, 64, 48), (37, 576, 960), (101, 1536, 576), (300, 128, 256)):
            weight = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
            q = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=generator)
            if not torch.equal(kernels.PackedWeight(weight).gemm(q), torch._int_mm(q, weight.t()).float()):
                raise ValueError(f"products differ from torch._int_mm at {rows}x{k}x{m}")
        return True
    except Exception as error:
        log.warning("continuous backends: oneDNN's packed int8 matmul is not usable here (%s); the linears "
                    "use torch._int_mm", str(error).strip().splitlines()[-1] if str(error) else error)
        return False


@cache
def amx_tiles(kernels) -> bool:
    """Whether this build and CPU run the kernels' own AMX int8 GEMMs (Intel AMX, and Linux granted
    the process its tile state), and they compute exactly torch._int_mm's products: checked once
    per process on random int8 rows and weights (rows 32 at a time, as the kernels pad them)."""
    import torch

    try:
        if not kernels.amx_usable():
            return False
        generator = torch.Generator().manual_seed(0)
        for rows, k, m in ((32, 64, 32), (96, 576, 960), (64, 1536, 576)):
            weight = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
            q = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=generator)
            if not torch.equal(kernels.amx_gemm(q, kernels.amx_pack(weight)), torch._int_mm(q, weight.t())):
                raise ValueError(f"products differ from torch._int_mm at {rows}x{k}x{m}")
        return True
    except Exception as error:
        log.warning("continuous backends: the AMX int8 kernels are not usable here (%s); the linears use "
                    "oneDNN", str(error).strip().splitlines()[-1] if str(error) else error)
        return False
