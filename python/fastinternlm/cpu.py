"""Settings of the CPU paths: how many threads the CPU ops use, and which instruction-set
tier their kernels run. Neither changes results: every output element is computed by one
thread in a fixed order, and both tiers round identically."""

from __future__ import annotations

import operator

from . import _C


def set_num_threads(n: int) -> None:
    """Threads the CPU ops use, the calling thread included; 0 restores the default
    (FASTINTERNLM_NUM_THREADS if set, else the CPUs this process may run on). Applies to
    ops started afterwards. Independent of torch.set_num_threads."""
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an int, got {type(n).__name__}") from None
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the CPU ops use."""
    return _C.get_num_threads()


def cpu_isa() -> str:
    """ "x86-64-v4" (AVX-512 attention prefill, AVX2 + FMA elsewhere), "x86-64-v3" (AVX2 +
    FMA kernels) or "generic", picked at run time; set FASTINTERNLM_CPU_ISA=generic (or
    x86-64-v3) before the first CPU op to force the generic tier (or cap at v3)."""
    return _C.cpu_isa()


__all__ = ["cpu_isa", "get_num_threads", "set_num_threads"]
