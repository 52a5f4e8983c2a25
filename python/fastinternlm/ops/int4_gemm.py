"""Group-wise int4 weights and the int4 weight-only GEMM (see
csrc/include/fastinternlm/int4_gemm.h for the packed format and the numerics).

A weight W [n, k] is held as w = q * s + m, q in 0..15, float16 s and m per group of
`group_size` (32, 64 or 128) input channels of one output row:
  qweight  int32   [n, k / 8]   nibble i of word j of row r is W[r, 8j + i]
  scales   float16 [n, k / group_size]
  offsets  float16 [n, k / group_size]
AWQ, GPTQ and GGUF 4-bit weights fit this form without loss; importers build the three
tensors and call Int4Weight.from_tensors."""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from ._checks import _C, check_activation, check_tensor, context, dtype_code, host_int, same_device

INT4_FORMAT_VERSION = 1
GROUP_SIZES = (32, 64, 128)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Keys of Int4Weight.state_dict(); "int4_format" holds [format_version, n, k, group_size].
_STATE_KEYS = ("qweight", "scales", "offsets", "int4_format")


def _check_group_size(group_size) -> int:
    group_size = host_int("group_size", group_size)
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    return group_size


class Int4Weight:
    """A packed int4 weight (format v1): the three tensors on one device and their sizes.

    Read-only after construction: build a new one to change anything. The sizes, device
    and layout are recorded here, and every op re-checks the tensors against that record
    (`validate`, a few attribute reads), so a tensor resized or re-pointed in place
    afterwards raises instead of making a kernel read past its memory."""

    __slots__ = ("_qweight", "_scales", "_offsets", "_group_size", "_n", "_k", "_device")

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor,
        group_size: int,
        format_version: int = INT4_FORMAT_VERSION,
    ):
        if format_version != INT4_FORMAT_VERSION:
            raise ValueError(
                f"format_version must be {INT4_FORMAT_VERSION} (the packed layout this "
                f"build reads), got {format_version}"
            )
        group_size = _check_group_size(group_size)
        check_tensor("qweight", qweight, dtypes=(torch.int32,), ndim=2)
        n, words = qweight.shape
        if n < 1 or words < 1:
            raise ValueError(f"qweight must have shape (n >= 1, k / 8 >= 1), got {tuple(qweight.shape)}")
        k = 8 * words
        if k % group_size:
            raise ValueError(f"k = 8 * qweight.shape[1] = {k} must be a multiple of group_size ({group_size})")
        check_tensor("scales", scales, dtypes=(torch.float16,), shape=(n, k // group_size))
        check_tensor("offsets", offsets, dtypes=(torch.float16,), shape=(n, k // group_size))
        self._device = same_device(qweight=qweight, scales=scales, offsets=offsets)
        self._qweight, self._scales, self._offsets = qweight, scales, offsets
        self._group_size = group_size
        self._n, self._k = n, k

    def validate(self) -> "Int4Weight":
        """The tensors still match what was recorded at construction (dtype, shape, device,
        contiguity): what every op taking an Int4Weight checks before passing pointers on."""
        groups = self._k // self._group_size
        for name, t, dtype, shape in (
            ("qweight", self._qweight, torch.int32, (self._n, self._k // 8)),
            ("scales", self._scales, torch.float16, (self._n, groups)),
            ("offsets", self._offsets, torch.float16, (self._n, groups)),
        ):
            if t.dtype != dtype or tuple(t.shape) != shape or t.device != self._device or not t.is_contiguous():
                raise ValueError(
                    f"Int4Weight.{name} was changed after construction: recorded {str(dtype)[6:]} {shape} on "
                    f"{self._device}, contiguous; now {str(t.dtype)[6:]} {tuple(t.shape)} on {t.device}"
                    f"{'' if t.is_contiguous() else ', not contiguous'}"
                )
        return self

    @classmethod
    def from_tensors(
        cls,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor,
        group_size: int,
        format_version: int = INT4_FORMAT_VERSION,
    ) -> "Int4Weight":
        """Wrap packed tensors (validated: dtypes, shapes, contiguity, one device)."""
        return cls(qweight, scales, offsets, group_size, format_version)

    @property
    def qweight(self) -> torch.Tensor:
        return self._qweight

    @property
    def scales(self) -> torch.Tensor:
        return self._scales

    @property
    def offsets(self) -> torch.Tensor:
        return self._offsets

    @property
    def n(self) -> int:
        """Output channels (rows of W)."""
        return self._n

    @property
    def k(self) -> int:
        """Input channels (columns of W)."""
        return self._k

    @property
    def group_size(self) -> int:
        return self._group_size

    @property
    def format_version(self) -> int:
        return INT4_FORMAT_VERSION

    @property
    def shape(self) -> torch.Size:
        """Shape of the weight it stands for, [n, k]."""
        return torch.Size((self.n, self.k))

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensors: nibbles plus scales and offsets."""
        return sum(t.numel() * t.element_size() for t in (self._qweight, self._scales, self._offsets))

    def to(self, device: Union[torch.device, str]) -> "Int4Weight":
        device = torch.device(device)
        self.validate()
        if device == self.device:
            return self
        return Int4Weight(self._qweight.to(device), self._scales.to(device), self._offsets.to(device), self._group_size)

    def state_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly): the packed tensors plus an int64 tensor
        [format_version, n, k, group_size] under `prefix + "int4_format"`."""
        self.validate()
        meta = torch.tensor([INT4_FORMAT_VERSION, self.n, self.k, self._group_size], dtype=torch.int64)
        return {
            prefix + "qweight": self._qweight,
            prefix + "scales": self._scales,
            prefix + "offsets": self._offsets,
            prefix + "int4_format": meta,
        }

    @classmethod
    def from_state_dict(
        cls, state: Dict[str, torch.Tensor], prefix: str = "", device: Optional[Union[torch.device, str]] = None
    ) -> "Int4Weight":
        """Inverse of state_dict; checks the recorded version and sizes against the tensors."""
        missing = [prefix + key for key in _STATE_KEYS if prefix + key not in state]
        if missing:
            raise ValueError(f"state is missing {', '.join(missing)}")
        meta = state[prefix + "int4_format"]
        check_tensor(prefix + "int4_format", meta, dtypes=(torch.int64,), shape=(4,))
        version, n, k, group_size = (int(v) for v in meta.tolist())
        weight = cls(*(state[prefix + key] for key in _STATE_KEYS[:3]), group_size, version)
        if (weight.n, weight.k) != (n, k):
            raise ValueError(f"{prefix}int4_format records n, k = {n}, {k} but the tensors hold {weight.n}, {weight.k}")
        return weight.to(device) if device is not None else weight

    def __repr__(self) -> str:
        return (
            f"Int4Weight(n={self.n}, k={self.k}, group_size={self._group_size}, "
            f"format_version={INT4_FORMAT_VERSION}, device={self.device})"
        )


def _check_weight(qw) -> Int4Weight:
    if not isinstance(qw, Int4Weight):
        raise TypeError(f"qw must be an Int4Weight, got {type(qw).__name__}")
    return qw.validate()


_DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in WEIGHT_DTYPES}


def _out_dtype(dtype) -> torch.dtype:
    """A torch.dtype, or its name ("float16", "torch.float16")."""
    if isinstance(dtype, str):
        name = dtype[len("torch.") :] if dtype.startswith("torch.") else dtype
        if name not in _DTYPE_NAMES:
            raise ValueError(
                f"dtype must be one of {', '.join(_DTYPE_NAMES)} (a torch.dtype or its name), got {dtype!r}"
            )
        return _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a torch.dtype (float16, bfloat16 or float32) or its name, "
            f"got {type(dtype).__name__} {dtype!r}"
        )
    if dtype not in WEIGHT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {str(dtype)[6:]}")
    return dtype


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """Round-to-nearest asymmetric int4 quantization of w [n, k] (float16, bfloat16 or
    float32): per group m = min (rounded down to float16), s = (max - m) / 15 (rounded up),
    so every value is within s/2 of q * s + m. Values must be finite with |w| <= 65504."""
    group_size = _check_group_size(group_size)
    check_tensor("w", w, dtypes=WEIGHT_DTYPES, ndim=2)
    device = same_device(w=w)
    n, k = w.shape
    if n < 1 or k < 1:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    if k % group_size:
        raise ValueError(f"w.shape[1] (k = {k}) must be a multiple of group_size ({group_size})")
    qweight = torch.empty(n, k // 8, dtype=torch.int32, device=device)
    scales = torch.empty(n, k // group_size, dtype=torch.float16, device=device)
    offsets = torch.empty_like(scales)
    _C.quantize_int4(
        *context(device),
        dtype_code(w.dtype),
        w.data_ptr(),
        n,
        k,
        group_size,
        qweight.data_ptr(),
        scales.data_ptr(),
        offsets.data_ptr(),
    )
    return Int4Weight(qweight, scales, offsets, group_size)


def dequantize_int4(qw: Int4Weight, dtype: Union[torch.dtype, str] = torch.float16) -> torch.Tensor:
    """W [n, k] in `dtype` (float16, bfloat16 or float32, or the name of one): q * s + m in
    float32, rounded once."""
    qw = _check_weight(qw)
    dtype = _out_dtype(dtype)
    out = torch.empty(qw.n, qw.k, dtype=dtype, device=qw.device)
    _C.dequantize_int4(
        *context(qw.device),
        dtype_code(dtype),
        out.data_ptr(),
        qw.qweight.data_ptr(),
        qw.scales.data_ptr(),
        qw.offsets.data_ptr(),
        qw.n,
        qw.k,
        qw.group_size,
    )
    return out


def int4_gemm(x: torch.Tensor, qw: Int4Weight) -> torch.Tensor:
    """x [..., k] @ W.T -> [..., n] in x's dtype (float16/bfloat16; float32 too on the CPU),
    float32 accumulation. On CUDA, x must be 16-byte aligned (fresh tensors are)."""
    qw = _check_weight(qw)
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] != qw.k:
        raise ValueError(f"x must have shape (..., {qw.k}) to match the weight's k, got {tuple(x.shape)}")
    device = same_device(qweight=qw.qweight, x=x)
    check_activation("x", x)
    out = torch.empty(*x.shape[:-1], qw.n, dtype=x.dtype, device=device)
    rows = x.numel() // qw.k
    if rows:
        _C.int4_gemm(
            *context(device),
            dtype_code(x.dtype),
            out.data_ptr(),
            x.data_ptr(),
            rows,
            qw.qweight.data_ptr(),
            qw.scales.data_ptr(),
            qw.offsets.data_ptr(),
            qw.n,
            qw.k,
            qw.group_size,
        )
    return out


__all__ = ["GROUP_SIZES", "INT4_FORMAT_VERSION", "Int4Weight", "dequantize_int4", "int4_gemm", "quantize_int4"]
