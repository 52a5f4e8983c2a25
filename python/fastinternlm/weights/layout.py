"""Row layouts of the one weight form (model.Layer), dense or int4, all exact (rows are
moved, never recomputed):

- wqkv in InternLM2's grouped layout: row (g*(G+2) + s)*D + d, for KV head g, slot s,
  d < D; slots s < G are query head g*G + s, slot G key head g, slot G+1 value head g
  (G = heads / kv_heads). Llama-style q/k/v (separate, head-major) are placed into it.
- w13: the gate (w1) rows, then the up (w3) rows, so one GEMM feeds silu_and_mul.

For an Int4Weight, placing rows moves rows of qweight, scales and offsets together: int4
groups run along the input channels of one row, so any row permutation is exact.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..config import ModelConfig
from ..model import Weight
from ..ops.int4_gemm import Int4Weight
from .files import CheckpointError


def _qkv_dims(config: ModelConfig) -> Tuple[int, int, int]:
    return config.num_kv_heads, config.group_size, config.head_dim


def split_wqkv(wqkv: torch.Tensor, config: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped wqkv [(H + 2 KV) * D, ...] -> q [H * D, ...], k [KV * D, ...], v [KV * D, ...]
    (new contiguous tensors; rows in Llama's head-major order). Any trailing shape works,
    so per-row quantisation scales split the same way."""
    kv, g, d = _qkv_dims(config)
    if wqkv.dim() < 1 or wqkv.shape[0] != config.qkv_rows:
        raise ValueError(f"wqkv must have {config.qkv_rows} rows ((H + 2 KV) * D), got shape {tuple(wqkv.shape)}")
    rest = tuple(wqkv.shape[1:])
    grouped = wqkv.reshape(kv, g + 2, d, *rest)
    q = grouped[:, :g].reshape(kv * g * d, *rest).contiguous()
    k = grouped[:, g].reshape(kv * d, *rest).contiguous()
    v = grouped[:, g + 1].reshape(kv * d, *rest).contiguous()
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Inverse of split_wqkv: Llama q/k/v rows -> one grouped wqkv."""
    rest = tuple(q.shape[1:])
    for name, t, rows in (("q", q, config.q_size), ("k", k, config.kv_size), ("v", v, config.kv_size)):
        if t.dim() < 1 or t.shape[0] != rows or tuple(t.shape[1:]) != rest:
            raise ValueError(f"{name} must have shape {(rows, *rest)}, got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError("q, k and v must share dtype and device")
    out = torch.empty((config.qkv_rows, *rest), dtype=q.dtype, device=q.device)
    place_qkv(out, "q", q, config)
    place_qkv(out, "k", k, config)
    place_qkv(out, "v", v, config)
    return out


def place_qkv(wqkv: torch.Tensor, part: str, src: torch.Tensor, config: ModelConfig) -> None:
    """Copies one of Llama's q/k/v (any dtype/device) into its rows of the grouped wqkv."""
    kv, g, d = _qkv_dims(config)
    rest = tuple(wqkv.shape[1:])
    grouped = wqkv.view(kv, g + 2, d, *rest)
    if part == "q":
        grouped[:, :g].copy_(src.reshape(kv, g, d, *rest))
    else:
        grouped[:, g if part == "k" else g + 1].copy_(src.reshape(kv, d, *rest))


class Int4Rows:
    """The packed tensors of a fused wqkv, filled part by part (Llama's q, k, v) by the
    same row placement as dense weights."""

    def __init__(self, rows: int, first: Int4Weight):
        self.group_size = first.group_size
        self.k = first.k
        self.qweight = torch.empty((rows, first.qweight.shape[1]), dtype=torch.int32, device=first.device)
        self.scales = torch.empty((rows, first.scales.shape[1]), dtype=torch.float16, device=first.device)
        self.offsets = torch.empty_like(self.scales)

    def place(self, part: str, w: Int4Weight, config: ModelConfig) -> None:
        if (w.k, w.group_size) != (self.k, self.group_size):
            raise CheckpointError(
                f"the {part} projection is {w}, but the other parts of wqkv have k={self.k}, "
                f"group_size={self.group_size}"
            )
        place_qkv(self.qweight, part, w.qweight, config)
        place_qkv(self.scales, part, w.scales, config)
        place_qkv(self.offsets, part, w.offsets, config)

    def finish(self) -> Int4Weight:
        return Int4Weight.from_tensors(self.qweight, self.scales, self.offsets, self.group_size)


def concat_rows(*weights: Int4Weight) -> Int4Weight:
    """The Int4Weight whose rows are those of `weights` in order (output channels
    stacked, as torch.cat(dim=0) does for dense weights); exact."""
    if not weights or not all(isinstance(w, Int4Weight) for w in weights):
        raise TypeError("concat_rows takes Int4Weight arguments")
    first = weights[0]
    for w in weights[1:]:
        if (w.k, w.group_size, w.device) != (first.k, first.group_size, first.device):
            raise ValueError(f"cannot stack {w} under {first}: k, group_size and device must agree")
    return Int4Weight.from_tensors(
        torch.cat([w.qweight for w in weights]),
        torch.cat([w.scales for w in weights]),
        torch.cat([w.offsets for w in weights]),
        first.group_size,
    )


def stack_rows(*weights: Weight) -> Weight:
    """Rows of each weight in order (gate and up into one GEMM), dense or int4; exact."""
    quantized = [isinstance(w, Int4Weight) for w in weights]
    if any(quantized):
        if not all(quantized):
            raise CheckpointError("gate and up projections must be both quantized or both dense")
        return concat_rows(*weights)
    return torch.cat(list(weights))


__all__ = ["Int4Rows", "Weight", "concat_rows", "fuse_qkv", "place_qkv", "split_wqkv", "stack_rows"]
