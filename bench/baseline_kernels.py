"""Builds bench/baseline_cpu_kernels.cpp (the frozen kernels of bench/baseline_continuous.py) under
an extension name of its own, so that it never shares a build with tasks/sampling/cpu_kernels.cpp."""
from __future__ import annotations

from functools import cache
from pathlib import Path

from tasks.sampling.cpu_kernels import CFLAGS, _build_id

SOURCE = Path(__file__).with_name("baseline_cpu_kernels.cpp")


@cache
def load():
    from torch.utils.cpp_extension import load_inline

    return load_inline(name=f"selfdistill_baseline_kernels_{_build_id()}", cpp_sources=[SOURCE.read_text()],
                       extra_cflags=CFLAGS, verbose=False)
