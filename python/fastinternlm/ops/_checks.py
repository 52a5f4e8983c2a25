"""Checks at the Python boundary: what the C++ core cannot see (torch dtypes, devices,
shapes, contiguity) is validated here, once, with messages that name the argument, what
was expected and what was given. Sizes and pointers are then checked again by the C++
entry points, which is what keeps a C++ caller safe too."""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Mapping, Optional, Sequence, Tuple

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
# Largest finite float32: scalars the C++ core takes as float must not round to inf there
# (its message would then show inf, not the number given).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_device_type(name: str, t: torch.Tensor) -> None:
    if t.device.type not in DEVICE_CODES:
        raise ValueError(f"{name} must be on the CPU or a CUDA device, got {t.device}")


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
        # On an unsupported device (meta, ...) the dtype is not the problem to report.
        _check_device_type(name, t)
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
    _check_device_type(name, t)
    if t.dtype not in ACTIVATION_DTYPES or (t.dtype == torch.float32 and t.device.type != "cpu"):
        allowed = ACTIVATION_DTYPES if t.device.type == "cpu" else ACTIVATION_DTYPES[:2]
        raise TypeError(f"{name} must have dtype {_names(allowed)} on {t.device.type}, got {_names([t.dtype])}")


def check_nonempty(name: str, t: torch.Tensor, *, except_dim: Optional[int] = None) -> None:
    """No dimension of t is 0 (except `except_dim`, a batch or token count that may be 0):
    an empty tensor has no memory behind it, and the C++ core would only see a null pointer."""
    for dim, size in enumerate(t.shape):
        if size == 0 and dim != except_dim:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)} (dimension {dim} is 0)")


def host_int(name: str, value) -> int:
    """A Python-side integer argument (int or numpy integer; not bool, not a float, which
    would be truncated, not a tensor, which may live on a device) that fits the C++
    core's int64."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def host_float(name: str, value, *, float32: bool = False) -> float:
    """A Python-side real argument (int, float, numpy; not bool) as a Python float. With
    float32=True (the core takes it as a C float) a finite value beyond the float32 range
    is refused here, naming it, instead of reaching the core as inf. NaN and inf pass:
    the core's own range check names them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite float, got {value}") from None
    if float32 and math.isfinite(result) and abs(result) > FLOAT32_MAX:
        raise ValueError(f"{name} must be within the float32 range (|{name}| <= {FLOAT32_MAX:.7g}), got {value}")
    return result


def byte_span(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """[first, last + 1) byte addresses of the elements of t, whatever its strides (for a
    non-contiguous view this covers the gaps between its elements too); None when t is
    empty and so has no bytes."""
    count = t.numel()
    if count == 0:
        return None
    lo = hi = t.data_ptr()
    item = t.element_size()
    if t.is_contiguous():
        return lo, lo + count * item
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride * item
        if reach < 0:
            lo += reach
        else:
            hi += reach
    return lo, hi + item


def check_no_overlap(written: Mapping[str, torch.Tensor], read: Mapping[str, torch.Tensor]) -> None:
    """No tensor an op writes shares a byte with any other argument (written or read).

    Views of one buffer are compared by address range, not identity: two views that
    overlap in part make a kernel read values it has already overwritten (or race with
    itself on CUDA). For views with gaps the range is conservative; the ops take
    contiguous tensors, whose range is exactly their elements."""
    # Called once per layer per decode step: plain tuples, and devices compared only for
    # the rare pair whose address ranges meet.
    spans = []
    for is_written, tensors in ((True, written), (False, read)):
        for name, t in tensors.items():
            span = byte_span(t)
            if span is not None:
                spans.append((name, is_written, t, span[0], span[1]))
    for i, (a, a_written, ta, lo_a, hi_a) in enumerate(spans):
        for b, b_written, tb, lo_b, hi_b in spans[i + 1 :]:
            if (a_written or b_written) and lo_a < hi_b and lo_b < hi_a and ta.device == tb.device:
                raise ValueError(
                    f"{a} and {b} must not overlap in memory, got {a} at bytes [{lo_a:#x}, {hi_a:#x}) "
                    f"and {b} at [{lo_b:#x}, {hi_b:#x})"
                )


def check_window(start_name: str, start: int, count_name: str, count: int, limit_name: str, limit: int) -> None:
    """start >= 0 and start + count <= limit, in Python integers (no wrapped sums)."""
    if start < 0:
        raise ValueError(f"{start_name} must be >= 0, got {start}")
    if start + count > limit:
        raise ValueError(
            f"{start_name} + {count_name} must be <= {limit_name} ({limit}), got {start} + {count} = {start + count}"
        )


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
    "byte_span",
    "check_activation",
    "check_index_range",
    "check_no_overlap",
    "check_nonempty",
    "check_tensor",
    "check_window",
    "context",
    "dtype_code",
    "host_float",
    "host_int",
    "same_device",
]
