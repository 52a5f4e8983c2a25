"""Checks at the Python boundary: what the C++ core cannot see (torch dtypes, devices,
shapes, contiguity) is validated here, once, with messages that name the argument, what
was expected and what was given. Sizes and pointers are then checked again by the C++
entry points, which is what keeps a C++ caller safe too."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch

from .. import _C

DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
}
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
POSITION_DTYPES = (torch.int32, torch.int64)
DEVICE_CODES = {"cpu": 0, "cuda": 1}


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
) -> torch.Tensor:
    """Type, dtype, rank, shape (None: any size) and contiguity of one argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}, got {_names([t.dtype])}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        for want, got in zip(shape, t.shape):
            if want is not None and want != got:
                expected = ", ".join("*" if s is None else str(s) for s in shape)
                expected = f"({expected},)" if len(shape) == 1 else f"({expected})"
                raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}")
    return t


def same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one CPU or CUDA device; returns it."""
    items = list(tensors.items())
    first_name, first = items[0]
    device = first.device
    if device.type not in DEVICE_CODES:
        raise ValueError(f"{first_name} must be on the CPU or a CUDA device, got {device}")
    for name, t in items[1:]:
        if t.device != device:
            raise ValueError(f"{name} must be on {device} like {first_name}, got {t.device}")
    return device


def check_activation(name: str, t: torch.Tensor) -> None:
    """float16/bfloat16 anywhere, float32 on the CPU only (the CUDA kernels are half-precision)."""
    if t.dtype not in ACTIVATION_DTYPES or (t.dtype == torch.float32 and t.device.type != "cpu"):
        allowed = ACTIVATION_DTYPES if t.device.type == "cpu" else ACTIVATION_DTYPES[:2]
        raise TypeError(f"{name} must have dtype {_names(allowed)} on {t.device.type}, got {_names([t.dtype])}")


def context(device: torch.device) -> Tuple[int, int, int]:
    """(device code, device index, stream) for the C++ core: CUDA work goes on torch's
    current stream, so it orders with torch's own work and can be captured in a graph."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DEVICE_CODES["cuda"], index, torch.cuda.current_stream(index).cuda_stream
    return DEVICE_CODES["cpu"], 0, 0


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def check_index_range(name: str, t: torch.Tensor, lo: int, hi: int, enabled: bool = True) -> None:
    """lo <= t < hi for every element. On CUDA this reads the values back (a host sync),
    so it is skipped while a CUDA graph is being captured, and callers that have already
    validated (the generate loop) pass enabled=False; the kernels then still never write
    out of bounds."""
    if not enabled or t.numel() == 0:
        return
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo_seen, hi_seen = int(t.min()), int(t.max())
    if lo_seen < lo or hi_seen >= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}), got values in [{lo_seen}, {hi_seen}]")


__all__ = [
    "ACTIVATION_DTYPES",
    "POSITION_DTYPES",
    "_C",
    "check_activation",
    "check_index_range",
    "check_tensor",
    "context",
    "dtype_code",
    "same_device",
]
