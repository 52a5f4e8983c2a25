"""fastinternlm: InternLM2/2.5 inference on hand-written CUDA kernels with CPU references."""

from __future__ import annotations

from . import _C, cpu, ops
from .cpu import get_num_threads, set_num_threads
from .engine import Engine, EngineOverloaded, EngineUnhealthy
from .llm import LLM, HFChat
from .sequence import Generation
from .weights import load

__version__ = _C.version()


def build_info() -> dict:
    """What this build of the extension contains. Asks no GPU and no driver anything."""
    archs = _C.cuda_architectures()
    return {
        "version": __version__,
        "cuda": bool(_C.cuda_compiled()),
        "cuda_architectures": [a for a in archs.split(",") if a],
        "cuda_runtime": "static" if _C.cuda_compiled() else None,
        "links_libtorch": False,
        "int4_format_version": ops.INT4_FORMAT_VERSION,
        "cpu_isa": cpu.cpu_isa(),
        "cpu_threads": cpu.get_num_threads(),
        "programmatic_launch": bool(_C.programmatic_launch()),
    }


__all__ = [
    "LLM",
    "Engine",
    "EngineOverloaded",
    "EngineUnhealthy",
    "Generation",
    "HFChat",
    "__version__",
    "build_info",
    "get_num_threads",
    "load",
    "ops",
    "set_num_threads",
]
