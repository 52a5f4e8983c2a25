"""Causal grouped-query attention over a per-layer KV cache (see
csrc/include/fastinternlm/attention.h).

A layer's cache is two tensors k_cache, v_cache of shape [slots, kv_heads, max_seq, head_dim]
in the activation dtype, or two QuantizedKV (int8 or int4 codes with a (scale, zero) pair per
group of channels of each token and KV head, format v3 of attention.h: the pairs float16 for
float16 activations, float32 otherwise); a sequence owns one slot. head_dim is 64 or 128, q_heads a multiple of kv_heads with a group size of 1 to 8. Scores, softmax and the
weighted sum are float32."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Tuple, Union

import torch

from ._checks import _C, check_activation, check_index_range, check_tensor, context, dtype_code, same_device
from ._checks import check_no_overlap, check_nonempty, check_window, host_float
from ._checks import host_int as _host_int


def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return host_float("scale", scale, float32=True)  # finiteness and sign are checked by the C++ entry point


# KVCacheFormat (attention.h) by name: its code and bits per value.
KV_QUANT_FORMATS = {"int8": (1, 8), "int4": (2, 4)}


def kv_quant_group(bits: int, head_dim: int) -> int:
    """Channels per (scale, zero) pair of a quantized cache row (attention.h kv_cache_group):
    the whole row for int8, 16 for int4."""
    return head_dim if bits == 8 else 16


def kv_params_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a quantized cache's (scale, zero) pairs for activations of `dtype`
    (attention.h kv_cache_params_dtype): float16 for float16 (half the bytes; a float16
    row's minimum and range fit float16), float32 otherwise (bfloat16 values exceed
    float16's range; float32 runs on the CPU only)."""
    return torch.float16 if dtype == torch.float16 else torch.float32


@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """One quantized cache array of a layer (its K or its V), format v3 of attention.h:
    codes uint8 [slots, kv_heads, max_seq, head_dim * bits // 8] (int4: value 2j in the low
    nibble of byte j) and params [slots, kv_heads, max_seq, head_dim // group, 2] of
    kv_params_dtype(activation dtype), the (scale, zero) of each group of `group`
    consecutive channels of a row (group = kv_quant_group(bits, head_dim): the whole row for
    int8, 16 for int4); a group x is stored as q = min(2^bits - 1, rint((x - zero) * (1 / scale)))
    with zero = min(x), scale = (max(x) - min(x)) / (2^bits - 1) (rounded up to float16 for
    float16 parameters; codes come from the stored scale), and read as q * scale + zero."""

    codes: torch.Tensor
    params: torch.Tensor
    bits: int

    @classmethod
    def empty(
        cls, num_slots: int, kv_heads: int, max_seq: int, head_dim: int, bits: int, device=None, *, dtype: torch.dtype
    ) -> "QuantizedKV":
        """dtype: the activation dtype the cache serves (it sets the params dtype)."""
        if bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
        codes = torch.empty(num_slots, kv_heads, max_seq, head_dim * bits // 8, dtype=torch.uint8, device=device)
        groups = head_dim // kv_quant_group(bits, head_dim)
        params = torch.empty(num_slots, kv_heads, max_seq, groups, 2, dtype=kv_params_dtype(dtype), device=device)
        return cls(codes, params, bits)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(slots, kv_heads, max_seq, head_dim): the shape of the values it stands for."""
        s, h, m, b = self.codes.shape
        return (s, h, m, b * 8 // self.bits)

    @property
    def group(self) -> int:
        """Channels per (scale, zero) pair."""
        return kv_quant_group(self.bits, self.shape[3])

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    def nbytes(self) -> int:
        return self.codes.numel() + self.params.numel() * self.params.element_size()

    def check(self, name: str, dtype: Optional[torch.dtype] = None) -> None:
        """Types and shapes; with the activation dtype, also the params dtype it requires
        (the kernels read the pairs as that type: float32 pairs read as float16 would be
        garbage, not an error)."""
        if self.bits not in (8, 4):
            raise ValueError(f"{name}.bits must be 8 or 4, got {self.bits!r}")
        check_tensor(f"{name}.codes", self.codes, dtypes=(torch.uint8,), ndim=4)
        s, h, m, d = self.shape
        groups = d // kv_quant_group(self.bits, d)
        check_tensor(f"{name}.params", self.params, dtypes=(torch.float16, torch.float32), shape=(s, h, m, groups, 2))
        if dtype is not None and self.params.dtype != kv_params_dtype(dtype):
            want, act, got = (str(t).replace("torch.", "") for t in (kv_params_dtype(dtype), dtype, self.params.dtype))
            raise TypeError(
                f"{name}.params must have dtype {want} for {act} activations (attention.h format v3), got {got}"
            )
        same_device(**{f"{name}.codes": self.codes, f"{name}.params": self.params})

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values the kernels read, [slots, kv_heads, max_seq, head_dim] (computed in
        float64, then converted: the kernels' float32 fma agrees to half a float32 ulp)."""
        if self.bits == 8:
            q = self.codes.to(torch.float64)
        else:
            c = self.codes.to(torch.int16)
            q = torch.stack([c & 15, c >> 4], dim=-1).flatten(-2).to(torch.float64)
        p = self.params.to(torch.float64).repeat_interleave(self.group, dim=-2)  # [..., head_dim, 2]
        return (q * p[..., 0] + p[..., 1]).to(dtype)


KVArray = Union[torch.Tensor, QuantizedKV]


def empty_kv_cache(
    kv_cache: str, num_slots: int, kv_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype, device=None
) -> Tuple[KVArray, KVArray]:
    """An uninitialised (k_cache, v_cache) pair of one layer: kv_cache "int8" / "int4" for
    quantized arrays (their params of kv_params_dtype(dtype)), anything else the activation
    dtype `dtype` (the caller has resolved names such as "fp16" against it)."""
    if kv_cache in KV_QUANT_FORMATS:
        bits = KV_QUANT_FORMATS[kv_cache][1]
        return tuple(
            QuantizedKV.empty(num_slots, kv_heads, max_seq, head_dim, bits, device, dtype=dtype) for _ in range(2)
        )
    shape = (num_slots, kv_heads, max_seq, head_dim)
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


def _check_kv_pair(dtype: torch.dtype, k_cache, v_cache) -> Tuple[int, int, int, int]:
    """Both arrays of one kind: tensors of the activation dtype, or QuantizedKV of one bit
    width with params of kv_params_dtype(dtype); returns the cache shape (slots, kv_heads,
    max_seq, head_dim)."""
    if isinstance(k_cache, QuantizedKV) or isinstance(v_cache, QuantizedKV):
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(c, QuantizedKV):
                raise TypeError(f"{name} must be a QuantizedKV like the other cache array, got {type(c).__name__}")
            c.check(name, dtype)
        if v_cache.bits != k_cache.bits:
            raise ValueError(f"v_cache must be int{k_cache.bits} like k_cache, got int{v_cache.bits}")
        if v_cache.shape != k_cache.shape:
            raise ValueError(f"v_cache must have shape {k_cache.shape} like k_cache, got {v_cache.shape}")
        return k_cache.shape
    check_tensor("k_cache", k_cache, dtypes=(dtype,), ndim=4)
    check_tensor("v_cache", v_cache, dtypes=(dtype,), shape=tuple(k_cache.shape))
    return tuple(k_cache.shape)


def _cache_tensors(k_cache: KVArray, v_cache: KVArray) -> dict:
    """Every tensor of the pair, by argument name, for the device check."""
    if isinstance(k_cache, QuantizedKV):
        return {
            "k_cache.codes": k_cache.codes,
            "k_cache.params": k_cache.params,
            "v_cache.codes": v_cache.codes,
            "v_cache.params": v_cache.params,
        }
    return {"k_cache": k_cache, "v_cache": v_cache}


def _check_cache(q: torch.Tensor, k_cache: KVArray, v_cache: KVArray) -> Tuple[int, int, int, int]:
    check_tensor("q", q, ndim=3)
    check_activation("q", q)
    num_slots, kv_heads, max_seq, head_dim = _check_kv_pair(q.dtype, k_cache, v_cache)
    check_tensor("q", q, shape=(None, None, head_dim))
    check_nonempty("k_cache", k_cache.codes if isinstance(k_cache, QuantizedKV) else k_cache)
    check_nonempty("q", q, except_dim=0)
    return num_slots, kv_heads, max_seq, head_dim


def _cache_args(k_cache: KVArray, v_cache: KVArray):
    """The cache's leading binding arguments (pointers and shape)."""
    if isinstance(k_cache, QuantizedKV):
        return (k_cache.codes.data_ptr(), v_cache.codes.data_ptr(), *k_cache.shape)
    return (k_cache.data_ptr(), v_cache.data_ptr(), *k_cache.shape)


def _format_args(k_cache: KVArray, v_cache: KVArray):
    """The cache's trailing binding arguments: format code, k_params, v_params."""
    if isinstance(k_cache, QuantizedKV):
        code = KV_QUANT_FORMATS[k_cache.format][0]
        return (code, k_cache.params.data_ptr(), v_cache.params.data_ptr())
    return (0, 0, 0)


def _cache_shape(k_cache: KVArray) -> Tuple[int, int, int, int]:
    return tuple(k_cache.shape)


def attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: int,
    start: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Writes k, v [T, kv_heads, D] into `slot` at positions [start, start + T), then returns
    [T, q_heads, D] where query t attends causally to positions [0, start + t].

    start > 0 continues a long prompt whose earlier chunks were written by earlier calls.
    scale defaults to 1/sqrt(D). k_cache, v_cache: tensors of q's dtype, or two QuantizedKV
    (the rows are then quantized as they are written, and every cached row is read
    dequantized)."""
    _, kv_heads, max_seq, head_dim = _check_cache(q, k_cache, v_cache)
    tokens, q_heads = q.shape[0], q.shape[1]
    check_tensor("k", k, dtypes=(q.dtype,), shape=(tokens, kv_heads, head_dim))
    check_tensor("v", v, dtypes=(q.dtype,), shape=(tokens, kv_heads, head_dim))
    device = same_device(q=q, k=k, v=v, **_cache_tensors(k_cache, v_cache))
    check_no_overlap(_cache_tensors(k_cache, v_cache), {"q": q, "k": k, "v": v})
    slot = _host_int("slot", slot)
    start = _host_int("start", start)
    check_window("start", start, "tokens", tokens, "max_seq", max_seq)
    scale = _scale(scale, head_dim)
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    _C.attention_prefill(
        *context(device),
        dtype_code(q.dtype),
        out.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        *_cache_args(k_cache, v_cache),
        tokens,
        q_heads,
        slot,
        start,
        scale,
        *_format_args(k_cache, v_cache),
    )
    return out


def attention_decode_workspace_bytes(batch: int, q_heads: int, k_cache: KVArray) -> int:
    """Bytes of scratch attention_decode needs for a batch against this cache (0 on the CPU).
    Depends on sizes only, so a decode loop can allocate it once (and capture the step in a
    CUDA graph)."""
    if isinstance(k_cache, QuantizedKV):
        k_cache.check("k_cache")
        device = k_cache.device
    else:
        check_tensor("k_cache", k_cache, ndim=4)
        device = same_device(k_cache=k_cache)
    # Only the device type matters to the size; no CUDA call is made.
    code = 1 if device.type == "cuda" else 0
    return int(
        _C.attention_decode_workspace_bytes(
            code, device.index or 0, _host_int("batch", batch), _host_int("q_heads", q_heads), *_cache_shape(k_cache)
        )
    )


def _check_distinct(slots: torch.Tensor, enabled: bool) -> None:
    if not enabled or slots.numel() < 2:
        return
    if slots.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if torch.unique(slots).numel() != slots.numel():
        raise ValueError(f"slots must be distinct, got {slots.tolist()}")


def _decode_indices_and_workspace(
    device, slots, positions, num_slots, max_seq, batch, q_heads, k_cache, workspace, check_indices, first_name, first
):
    """What both decode entry points do after their own shape checks: the optional host-side
    index checks on CUDA, and the split-softmax scratch (allocated here when not given)."""
    if device.type == "cuda":
        check_index_range("slots", slots, 0, num_slots, check_indices)
        check_index_range("positions", positions, 0, max_seq, check_indices)
        _check_distinct(slots, check_indices)
    if workspace is None:
        ctx = context(device)
        nbytes = _C.attention_decode_workspace_bytes(ctx[0], ctx[1], batch, q_heads, *_cache_shape(k_cache))
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    check_tensor("workspace", workspace, dtypes=(torch.uint8,), ndim=1)
    same_device(**{first_name: first, "workspace": workspace})
    return workspace


def attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    scale: Optional[float] = None,
    *,
    workspace: Optional[torch.Tensor] = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """One new token per sequence: q [B, q_heads, D], k, v [B, kv_heads, D], slots and positions
    int32 [B] on the same device. Writes each token's k, v at positions[b] in slots[b], then
    returns [B, q_heads, D] attending over [0, positions[b]].

    workspace: a uint8 tensor of at least attention_decode_workspace_bytes(...) bytes on the
    device; allocated per call when None. check_indices: validate slots/positions here (on
    CUDA a host sync, skipped during graph capture); on the CPU the C++ entry point checks
    them anyway. On CUDA an unchecked out-of-range entry writes nothing and yields NaN rows
    for its sequence."""
    num_slots, kv_heads, max_seq, head_dim = _check_cache(q, k_cache, v_cache)
    batch, q_heads = q.shape[0], q.shape[1]
    check_tensor("k", k, dtypes=(q.dtype,), shape=(batch, kv_heads, head_dim))
    check_tensor("v", v, dtypes=(q.dtype,), shape=(batch, kv_heads, head_dim))
    check_tensor("slots", slots, dtypes=(torch.int32,), shape=(batch,))
    check_tensor("positions", positions, dtypes=(torch.int32,), shape=(batch,))
    device = same_device(q=q, k=k, v=v, **_cache_tensors(k_cache, v_cache), slots=slots, positions=positions)
    scale = _scale(scale, head_dim)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    workspace = _decode_indices_and_workspace(
        device, slots, positions, num_slots, max_seq, batch, q_heads, k_cache, workspace, check_indices, "q", q
    )
    check_no_overlap(
        {**_cache_tensors(k_cache, v_cache), "workspace": workspace},
        {"q": q, "k": k, "v": v, "slots": slots, "positions": positions},
    )
    ctx = context(device)
    _C.attention_decode(
        *ctx,
        dtype_code(q.dtype),
        out.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        *_cache_args(k_cache, v_cache),
        batch,
        q_heads,
        slots.data_ptr(),
        positions.data_ptr(),
        scale,
        workspace.data_ptr(),
        workspace.numel(),
        *_format_args(k_cache, v_cache),
    )
    return out


def attention_decode_qkv(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    bases: torch.Tensor,
    scale: Optional[float] = None,
    *,
    workspace: Optional[torch.Tensor] = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """attention_decode fed straight from InternLM2's fused projection, RoPE included:
    qkv [B, kv_heads, G + 2, D] (per KV head its G query rows, then k, then v: the wqkv
    GEMM's output viewed per group), bases float32 [B] (each sequence's rotary base).
    Rotates q and the new k at `positions` exactly as rotary_embedding would, writes the
    rotated k and v into the cache and returns [B, kv_heads * G, D]. qkv is not modified.
    One kernel (two with the split merge) where the unfused path runs six."""
    check_tensor("qkv", qkv, ndim=4)
    check_activation("qkv", qkv)
    num_slots, kv_heads, max_seq, head_dim = _check_kv_pair(qkv.dtype, k_cache, v_cache)
    batch, _, rows, _ = qkv.shape
    check_tensor("qkv", qkv, shape=(None, kv_heads, None, head_dim))
    check_nonempty("k_cache", k_cache.codes if isinstance(k_cache, QuantizedKV) else k_cache)
    if rows < 3:
        raise ValueError(f"qkv must have shape (B, kv_heads, G + 2, head_dim) with G >= 1, got {tuple(qkv.shape)}")
    q_heads = kv_heads * (rows - 2)
    check_tensor("slots", slots, dtypes=(torch.int32,), shape=(batch,))
    check_tensor("positions", positions, dtypes=(torch.int32,), shape=(batch,))
    check_tensor("bases", bases, dtypes=(torch.float32,), shape=(batch,))
    device = same_device(qkv=qkv, **_cache_tensors(k_cache, v_cache), slots=slots, positions=positions, bases=bases)
    scale = _scale(scale, head_dim)
    out = torch.empty(batch, q_heads, head_dim, dtype=qkv.dtype, device=device)
    if batch == 0:
        return out
    workspace = _decode_indices_and_workspace(
        device, slots, positions, num_slots, max_seq, batch, q_heads, k_cache, workspace, check_indices, "qkv", qkv
    )
    check_no_overlap(
        {**_cache_tensors(k_cache, v_cache), "workspace": workspace},
        {"qkv": qkv, "slots": slots, "positions": positions, "bases": bases},
    )
    ctx = context(device)
    _C.attention_decode_qkv(
        *ctx,
        dtype_code(qkv.dtype),
        out.data_ptr(),
        qkv.data_ptr(),
        *_cache_args(k_cache, v_cache),
        batch,
        q_heads,
        slots.data_ptr(),
        positions.data_ptr(),
        bases.data_ptr(),
        scale,
        workspace.data_ptr(),
        workspace.numel(),
        *_format_args(k_cache, v_cache),
    )
    return out


__all__ = [
    "KV_QUANT_FORMATS",
    "QuantizedKV",
    "kv_params_dtype",
    "attention_decode",
    "attention_decode_qkv",
    "attention_decode_workspace_bytes",
    "attention_prefill",
    "empty_kv_cache",
]
