"""What a model needs in device memory, computed before anything is allocated: weights, KV
cache (quantization parameters included), activation workspace and a reserve, for a given
max_seq_len, max_batch and kv_cache type. Pure functions of the model's shapes, so the
plan for a checkpoint can be printed without loading it (`fastinternlm info MODEL --plan`)
and a load that would not fit is refused with the numbers and what would fit, instead of
failing in the allocator half way.

Sizes (bytes, exact for what this package allocates):
- weights: every parameter in the activation dtype, except int4 linears (quant="int4" or a
  pre-quantized checkpoint): k/2 bytes of codes per row plus a float16 scale and offset per
  group of `group_size` inputs; embeddings and norms stay in the activation dtype, the
  output head too unless quant_head.
- KV cache per token: layers x 2 (K, V) x kv_heads x row, a row being head_dim values of
  the activation dtype, or head_dim * bits / 8 bytes of codes plus a (scale, zero) pair per
  group of channels for int8 / int4 (attention.h, format v3: one group per row for int8,
  groups of 16 for int4; the pair is 4 bytes (float16) with fp16 activations, 8 (float32)
  with bf16 and fp32).
- workspace: the largest set of activations alive at once in one prefill chunk (residual,
  normed input, attention output, the fused projections, the SwiGLU output), the decode
  split scratch for max_batch, float32 logits; plus `reserve` for the allocator's rounding
  and the CUDA libraries' own buffers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

import torch

from .ops.attention import KV_QUANT_FORMATS, kv_params_dtype, kv_quant_group

GiB = 1 << 30
MiB = 1 << 20
# The allocator rounds, cuBLAS keeps a workspace, graphs keep pools: kept free on top.
DEFAULT_RESERVE = 768 * MiB
# attention.cu: at most this many decode splits per sequence.
MAX_DECODE_SPLITS = 256
# The CUDA kernels' position limit (attention_prefill refuses more).
MAX_SEQ_LIMIT = 0x7FFFFFFF - 64
ACT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KV_TYPES = ("fp16", "bf16", "fp32", "int8", "int4")


class MemoryPlanError(ValueError):
    """The requested model and cache do not fit the device memory."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        return cls(
            config.num_layers,
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.intermediate_size,
            config.vocab_size,
            bool(config.tie_word_embeddings),
        )

    def linear_shapes(self):
        """(rows, inputs) of each decoder layer's linears: wqkv, wo, w13 (gate and up), w2."""
        d = self.head_dim
        return [
            ((self.heads + 2 * self.kv_heads) * d, self.hidden),
            (self.hidden, self.heads * d),
            (2 * self.ffn, self.hidden),
            (self.hidden, self.ffn),
        ]


def _act(dtype: str) -> int:
    if dtype not in ACT_BYTES:
        raise ValueError(f"dtype must be one of {tuple(ACT_BYTES)}, got {dtype!r}")
    return ACT_BYTES[dtype]


def dtype_name(dtype) -> str:
    """ "fp16" / "bf16" / "fp32" for a torch dtype or one of those names."""
    names = {
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
        torch.float32: "fp32",
        "float16": "fp16",
        "bfloat16": "bf16",
        "float32": "fp32",
    }
    return names.get(dtype, dtype)


def int4_linear_bytes(rows: int, inputs: int, group_size: int) -> int:
    """ops.quantize_int4's tensors: int32 codes [rows, inputs / 8] and float16 scales and
    offsets [rows, inputs / group_size]."""
    return rows * inputs // 2 + 2 * 2 * rows * (inputs // group_size)


def weight_bytes(
    shape: ModelShape, dtype: str = "fp16", quant: Optional[str] = None, group_size: int = 128, quant_head: bool = False
) -> int:
    act = _act(dtype)
    if quant not in (None, "int4"):
        raise ValueError(f"quant must be None or 'int4', got {quant!r}")
    per_layer = 0
    for rows, inputs in shape.linear_shapes():
        per_layer += int4_linear_bytes(rows, inputs, group_size) if quant else rows * inputs * act
    per_layer += 2 * shape.hidden * act  # attention_norm, ffn_norm
    embed = shape.vocab * shape.hidden * act
    if shape.tie_word_embeddings:
        head = 0
    elif quant and quant_head:
        head = int4_linear_bytes(shape.vocab, shape.hidden, group_size)
    else:
        head = shape.vocab * shape.hidden * act
    return shape.layers * per_layer + embed + head + shape.hidden * act


def kv_param_row_bytes(shape: ModelShape, kv_cache: str, dtype: str = "fp16") -> int:
    """Bytes of one cached row's (scale, zero) pairs (0 for a float cache): float16 pairs
    with fp16 activations, float32 otherwise (ops.kv_params_dtype)."""
    name = dtype_name(dtype)
    _act(name)
    if kv_cache not in KV_QUANT_FORMATS:
        return 0
    pair = 2 * kv_params_dtype(_TORCH_DTYPES[name]).itemsize
    return pair * (shape.head_dim // kv_quant_group(KV_QUANT_FORMATS[kv_cache][1], shape.head_dim))


def kv_row_bytes(shape: ModelShape, kv_cache: str, dtype: str = "fp16") -> int:
    """Bytes of one cached row (a token of one KV head, K or V), parameters included;
    dtype: the activation dtype (it sets a quantized cache's parameter dtype)."""
    _act(dtype_name(dtype))
    if kv_cache in KV_QUANT_FORMATS:
        return shape.head_dim * KV_QUANT_FORMATS[kv_cache][1] // 8 + kv_param_row_bytes(shape, kv_cache, dtype)
    if kv_cache not in ACT_BYTES:
        raise ValueError(f"kv_cache must be one of {KV_TYPES}, got {kv_cache!r}")
    return shape.head_dim * ACT_BYTES[kv_cache]


def kv_bytes_per_token(shape: ModelShape, kv_cache: str, dtype: str = "fp16") -> int:
    return shape.layers * 2 * shape.kv_heads * kv_row_bytes(shape, kv_cache, dtype)


def kv_param_bytes_per_token(shape: ModelShape, kv_cache: str, dtype: str = "fp16") -> int:
    """The (scale, zero) share of kv_bytes_per_token (0 for a float cache)."""
    return shape.layers * 2 * shape.kv_heads * kv_param_row_bytes(shape, kv_cache, dtype)


def workspace_bytes(shape: ModelShape, dtype: str, max_batch: int, chunk: int) -> int:
    act = _act(dtype)
    d = shape.head_dim
    rows = max(chunk, max_batch)
    per_row = (
        3 * shape.hidden  # residual, normed input, a linear's output
        + 2 * (shape.heads + 2 * shape.kv_heads) * d  # fused qkv, and q/k/v split from it
        + shape.heads * d  # attention output
        + 3 * shape.ffn
    )  # w13 output, SwiGLU output
    decode_scratch = max_batch * shape.heads * MAX_DECODE_SPLITS * (d + 2) * 4
    logits = max_batch * shape.vocab * 4 * 2  # float32 logits and a sampling copy
    return rows * per_row * act + decode_scratch + logits


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape
    dtype: str
    kv_cache: str
    max_seq_len: int
    max_batch: int
    weights: int
    kv_cache_bytes: int  # parameters included
    kv_params: int  # of which (scale, zero) pairs
    workspace: int
    reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache_bytes + self.workspace + self.reserve

    def describe(self) -> str:
        return (
            f"weights {gib(self.weights)} + KV cache {gib(self.kv_cache_bytes)} ({self.kv_cache}, "
            f"{self.max_batch} x {self.max_seq_len} tokens, parameters {gib(self.kv_params)}) + workspace "
            f"{gib(self.workspace)} + reserve {gib(self.reserve)} = {gib(self.total)}"
        )


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def plan(
    shape: ModelShape,
    *,
    max_seq_len: int,
    max_batch: int = 1,
    kv_cache: str = "fp16",
    dtype: str = "fp16",
    quant: Optional[str] = None,
    group_size: int = 128,
    quant_head: bool = False,
    chunk: int = 2048,
    reserve: int = DEFAULT_RESERVE,
    weights: Optional[int] = None,
) -> MemoryPlan:
    """weights: bytes to count for the weights instead of computing them (0 when they are
    already resident and the free memory was measured after loading them)."""
    dtype = dtype_name(dtype)
    kv_cache = dtype if kv_cache is None else kv_cache
    for name, v in (("max_seq_len", max_seq_len), ("max_batch", max_batch), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    tokens = max_seq_len * max_batch
    return MemoryPlan(
        shape,
        dtype,
        kv_cache,
        max_seq_len,
        max_batch,
        weight_bytes(shape, dtype, quant, group_size, quant_head) if weights is None else weights,
        kv_bytes_per_token(shape, kv_cache, dtype) * tokens,
        kv_param_bytes_per_token(shape, kv_cache, dtype) * tokens,
        workspace_bytes(shape, dtype, max_batch, min(chunk, max_seq_len)),
        reserve,
    )


def largest_context(shape: ModelShape, free: int, *, max_batch: int = 1, kv_cache: str = "fp16", **kw) -> int:
    """The largest max_seq_len whose plan fits in `free` bytes (0 if not even one token),
    rounded down to a multiple of 64 above 64 tokens."""
    fixed = plan(shape, max_seq_len=1, max_batch=max_batch, kv_cache=kv_cache, **kw)
    # The workspace grows with the context up to one prefill chunk: plan at a full chunk.
    fixed = plan(
        shape, max_seq_len=max(fixed.max_seq_len, kw.get("chunk", 2048)), max_batch=max_batch, kv_cache=kv_cache, **kw
    )
    fixed_bytes = fixed.total - fixed.kv_cache_bytes
    per_seq_token = kv_bytes_per_token(shape, fixed.kv_cache, fixed.dtype) * max_batch
    n = max(0, (free - fixed_bytes) // per_seq_token)
    n = min(n, MAX_SEQ_LIMIT)
    return n // 64 * 64 if n > 64 else n


def largest_batch(shape: ModelShape, free: int, *, max_seq_len: int, kv_cache: str = "fp16", **kw) -> int:
    lo, hi = 0, 1
    while plan(shape, max_seq_len=max_seq_len, max_batch=hi, kv_cache=kv_cache, **kw).total <= free:
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            return lo
    while hi - lo > 1:  # plan(lo) fits, plan(hi) does not
        mid = (lo + hi) // 2
        if plan(shape, max_seq_len=max_seq_len, max_batch=mid, kv_cache=kv_cache, **kw).total <= free:
            lo = mid
        else:
            hi = mid
    return lo


def alternatives(
    p: MemoryPlan,
    free: int,
    *,
    quant: Optional[str] = None,
    group_size: int = 128,
    quant_head: bool = False,
    chunk: int = 2048,
) -> Dict[str, int]:
    """What would fit in `free`: the longest context for each smaller cache type at this
    batch, the most slots at this context, the longest context at this batch."""
    kw = dict(
        dtype=p.dtype,
        quant=quant,
        group_size=group_size,
        quant_head=quant_head,
        chunk=chunk,
        reserve=p.reserve,
        weights=p.weights,
    )
    out = {}
    for kv in ("int8", "int4"):
        if kv_row_bytes(p.shape, kv, p.dtype) < kv_row_bytes(p.shape, p.kv_cache, p.dtype):
            out[f"max_seq_len with kv_cache={kv}"] = largest_context(
                p.shape, free, max_batch=p.max_batch, kv_cache=kv, **kw
            )
    out["max_batch at this max_seq_len"] = largest_batch(
        p.shape, free, max_seq_len=p.max_seq_len, kv_cache=p.kv_cache, **kw
    )
    out["max_seq_len at this max_batch"] = largest_context(
        p.shape, free, max_batch=p.max_batch, kv_cache=p.kv_cache, **kw
    )
    return out


def check_fits(p: MemoryPlan, free: int, where: str = "the device", **kw) -> None:
    """Raises MemoryPlanError naming the plan, the free memory and what would fit."""
    if p.total <= free:
        return
    alt = alternatives(p, free, **kw)
    options = "; ".join(f"{k}: {v}" for k, v in alt.items())
    raise MemoryPlanError(
        f"the model does not fit: {p.describe()} > {gib(free)} free on {where}. What would fit: {options}"
    )


def free_memory(device) -> int:
    """Free bytes on `device`: the CUDA driver's count, or MemAvailable on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def resolve(
    shape: ModelShape,
    device,
    *,
    max_seq_len,
    max_batch: int,
    kv_cache: str,
    dtype: str,
    quant: Optional[str] = None,
    group_size: int = 128,
    quant_head: bool = False,
    chunk: int = 2048,
    free: Optional[int] = None,
    reserve: int = DEFAULT_RESERVE,
    weights: Optional[int] = None,
) -> MemoryPlan:
    """The plan for a load: max_seq_len "auto" becomes the largest context that fits the free
    memory of `device`; an explicit one is checked against it. Raises MemoryPlanError.
    weights=0 when they are loaded already (free then counts what is left after them)."""
    free = free_memory(device) if free is None else free
    kw = dict(
        dtype=dtype_name(dtype),
        quant=quant,
        group_size=group_size,
        quant_head=quant_head,
        chunk=chunk,
        reserve=reserve,
        weights=weights,
    )
    if max_seq_len == "auto":
        n = largest_context(shape, free, max_batch=max_batch, kv_cache=kv_cache, **kw)
        if n < 2:
            p = plan(shape, max_seq_len=2, max_batch=max_batch, kv_cache=kv_cache, **kw)
            check_fits(p, free, str(device), quant=quant, group_size=group_size, quant_head=quant_head, chunk=chunk)
        max_seq_len = max(n, 2)
    p = plan(shape, max_seq_len=max_seq_len, max_batch=max_batch, kv_cache=kv_cache, **kw)
    check_fits(p, free, str(device), quant=quant, group_size=group_size, quant_head=quant_head, chunk=chunk)
    return p


# GPU sizes for the `info --plan` table: (name, usable bytes: the card's memory less what the
# driver and a CUDA context keep, about 0.5-0.9 GiB).
GPU_SIZES = (("24 GB", 23 * GiB), ("40 GB", 39 * GiB), ("48 GB", 47 * GiB), ("80 GB", 79 * GiB), ("141 GB", 139 * GiB))


def report(
    shape: ModelShape,
    *,
    dtype: str = "bf16",
    quant: Optional[str] = None,
    group_size: int = 128,
    quant_head: bool = False,
    max_batch: int = 1,
) -> str:
    """The text of `fastinternlm info MODEL --plan`."""
    lines = [
        f"weights: {gib(weight_bytes(shape, dtype_name(dtype), quant, group_size, quant_head))} "
        f"({dtype_name(dtype)}{', int4 linears' if quant else ''})",
        f"KV cache per token (all layers, K and V; {dtype_name(dtype)} activations):",
    ]
    kvs = [dtype_name(dtype), "int8", "int4"]
    for kv in kvs:
        per = kv_bytes_per_token(shape, kv, dtype_name(dtype))
        params = kv_param_bytes_per_token(shape, kv, dtype_name(dtype))
        lines.append(
            f"  {kv:5s} {per / 1024:8.1f} KiB"
            + (f" (parameters {params / 1024:.1f} KiB)" if params else "")
            + f"; 1M tokens: {gib(per << 20)}"
        )
    lines.append(f"largest context per GPU (max_batch {max_batch}, {dtype_name(dtype)} activations):")
    lines.append("  GPU      " + "".join(f"{kv:>12s}" for kv in kvs))
    for name, size in GPU_SIZES:
        row = [
            largest_context(
                shape,
                size,
                max_batch=max_batch,
                kv_cache=kv,
                dtype=dtype_name(dtype),
                quant=quant,
                group_size=group_size,
                quant_head=quant_head,
            )
            for kv in kvs
        ]
        lines.append(f"  {name:8s} " + "".join(f"{n:12d}" for n in row))
    return "\n".join(lines)


__all__ = [
    "MemoryPlan",
    "MemoryPlanError",
    "ModelShape",
    "alternatives",
    "check_fits",
    "free_memory",
    "kv_bytes_per_token",
    "kv_row_bytes",
    "largest_batch",
    "largest_context",
    "plan",
    "report",
    "resolve",
    "weight_bytes",
    "workspace_bytes",
]
