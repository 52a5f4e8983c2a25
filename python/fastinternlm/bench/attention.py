"""Attention benchmark: ours vs torch F.scaled_dot_product_attention over the same K/V.

Decode reads every cached K/V byte once, so it is reported in GB/s (bytes = the K/V
bytes attended over). Prefill is compute-bound and reported in TFLOP/s, counting the two
matmuls of causal attention, about 4 * T^2 / 2 * D * q_heads. The baseline does not write
the cache (ours does: T or B rows, negligible next to the reads)."""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .. import ops
from ._harness import Case


def _sdpa(q, k, v, causal):
    """q [N, Hq, L, D], k/v [N, Hkv, S, D]; grouped-query natively where torch has it."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def _baseline_kv(k, v, q_heads):
    """K/V as the baseline reads them: as is if SDPA takes enable_gqa (torch >= 2.5),
    else expanded to q_heads once here (outside the timed call)."""
    try:
        _sdpa(
            torch.zeros(1, q_heads, 1, k.shape[-1], dtype=k.dtype, device=k.device), k[:1, :, :1], v[:1, :, :1], False
        )
        return k, v, "F.scaled_dot_product_attention(enable_gqa)"
    except TypeError:
        group = q_heads // k.shape[1]
        return (
            k.repeat_interleave(group, 1),
            v.repeat_interleave(group, 1),
            "F.scaled_dot_product_attention(repeated KV)",
        )


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    if device.type == "cuda":
        if dtype == torch.float32:
            return []  # the CUDA kernels are float16/bfloat16
        # InternLM2.5-7B
        return _cases(
            device, dtype, 32, 8, 128, [(1, 2048), (1, 8192), (1, 32768), (16, 2048)], [2048, 8192]
        ) + _quantized_cases(device, dtype, 32, 8, 128, [(1, 32768), (1, 131072), (16, 8192)], [8192])
    # A small grouped layout, then SmolLM2-135M's (9 query heads over 3 KV heads, D = 64),
    # the model the CPU path runs end to end.
    return (
        _cases(device, dtype, 8, 2, 128, [(1, 512), (1, 2048), (4, 512)], [128, 512])
        + _cases(device, dtype, 9, 3, 64, [(1, 512)], [256])
        + _quantized_cases(device, dtype, 8, 2, 128, [(1, 2048)], [512])
        # The engine's chunked prefill: a chunk of a long prompt over the cache its
        # earlier chunks wrote (SmolLM2's layout, then InternLM2's D = 128 with group 4
        # and 8).
        + _chunk_cases(device, dtype, 9, 3, 64, [(16, 500), (32, 2000), (64, 4000)])
        + _chunk_cases(device, dtype, 32, 8, 128, [(32, 2000)])
        + _chunk_cases(device, dtype, 32, 4, 128, [(32, 2000)])
    )


def _chunk_cases(device, dtype, q_heads, kv_heads, head_dim, chunks) -> List[Case]:
    """attention_prefill of `tokens` new tokens at position `start` of a cache holding the
    positions before; the baseline is SDPA over the same K/V with the chunk's causal mask
    (token t sees positions [0, start + t])."""
    elt = torch.empty(0, dtype=dtype).element_size()
    out = []
    for tokens, start in chunks:
        length = start + tokens
        q = torch.randn(tokens, q_heads, head_dim, dtype=dtype, device=device)
        k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
        v = torch.randn_like(k)
        k_cache = torch.randn(1, kv_heads, length, head_dim, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
        k_cache[0, :, start:] = k.transpose(0, 1)
        v_cache[0, :, start:] = v.transpose(0, 1)
        qt = q.transpose(0, 1).unsqueeze(0).contiguous()
        bk, bv, name = _baseline_kv(k_cache, v_cache, q_heads)
        mask = torch.arange(length, device=device)[None, :] <= start + torch.arange(tokens, device=device)[:, None]
        out.append(
            Case(
                "attention_prefill chunk",
                f"T={tokens} start={start} H={q_heads}/{kv_heads} D={head_dim}",
                lambda q=q, k=k, v=v, kc=k_cache, vc=v_cache, s=start: ops.attention_prefill(q, k, v, kc, vc, 0, s),
                lambda qt=qt, bk=bk, bv=bv, m=mask: F.scaled_dot_product_attention(
                    qt, bk, bv, attn_mask=m, **({"enable_gqa": True} if bk.shape[1] != qt.shape[1] else {})
                ),
                f"{name}, chunk mask",
                bytes=2 * kv_heads * length * head_dim * elt,
                flops=4 * tokens * (start + (tokens + 1) // 2) * head_dim * q_heads,
            )
        )
    return out


def _random_quantized(batch, kv_heads, ctx, head_dim, bits, device, dtype) -> ops.QuantizedKV:
    """Random codes with (scale, zero) spanning about [-2.5, 2.5]: the values of a unit
    normal row, for timing (params of the dtype `dtype` activations use)."""
    c = ops.QuantizedKV.empty(batch, kv_heads, ctx, head_dim, bits, device, dtype=dtype)
    c.codes.random_(0, 256)
    c.params[..., 0] = 5.0 / (2**bits - 1)
    c.params[..., 1] = -2.5
    return c


def _quantized_cases(device, dtype, q_heads, kv_heads, head_dim, decode_shapes, prefill_tokens) -> List[Case]:
    """Ours with an int8 / int4 cache (bytes: the codes and parameters it reads) against SDPA
    over the activation-dtype cache of the same shape (what the quantized cache replaces)."""
    out = []
    for bits in (8, 4):
        for batch, ctx in decode_shapes:
            kc = _random_quantized(batch, kv_heads, ctx, head_dim, bits, device, dtype)
            vc = _random_quantized(batch, kv_heads, ctx, head_dim, bits, device, dtype)
            q = torch.randn(batch, q_heads, head_dim, dtype=dtype, device=device)
            k = torch.randn(batch, kv_heads, head_dim, dtype=dtype, device=device)
            v = torch.randn_like(k)
            slots = torch.arange(batch, dtype=torch.int32, device=device)
            positions = torch.full((batch,), ctx - 1, dtype=torch.int32, device=device)
            workspace = torch.empty(
                ops.attention_decode_workspace_bytes(batch, q_heads, kc), dtype=torch.uint8, device=device
            )
            bk, bv, name = _baseline_kv(kc.dequantize(dtype), vc.dequantize(dtype), q_heads)
            q4 = q.view(batch, q_heads, 1, head_dim)
            out.append(
                Case(
                    f"attention_decode int{bits} cache",
                    f"B={batch} ctx={ctx} H={q_heads}/{kv_heads} D={head_dim}",
                    lambda q=q, k=k, v=v, kc=kc, vc=vc, s=slots, p=positions, w=workspace: ops.attention_decode(
                        q, k, v, kc, vc, s, p, workspace=w, check_indices=False
                    ),
                    lambda q4=q4, bk=bk, bv=bv: _sdpa(q4, bk, bv, False),
                    f"{name} over the {dtype} cache",
                    bytes=kc.nbytes() + vc.nbytes(),  # every row of both caches, codes and pairs
                )
            )
            del bk, bv
        for tokens in prefill_tokens:
            q = torch.randn(tokens, q_heads, head_dim, dtype=dtype, device=device)
            k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
            v = torch.randn_like(k)
            kc = _random_quantized(1, kv_heads, tokens, head_dim, bits, device, dtype)
            vc = _random_quantized(1, kv_heads, tokens, head_dim, bits, device, dtype)
            qt = q.transpose(0, 1).unsqueeze(0).contiguous()
            bk, bv, name = _baseline_kv(
                k.transpose(0, 1).unsqueeze(0).contiguous(), v.transpose(0, 1).unsqueeze(0).contiguous(), q_heads
            )
            out.append(
                Case(
                    f"attention_prefill int{bits} cache",
                    f"T={tokens} H={q_heads}/{kv_heads} D={head_dim} causal",
                    lambda q=q, k=k, v=v, kc=kc, vc=vc: ops.attention_prefill(q, k, v, kc, vc, 0, 0),
                    lambda qt=qt, bk=bk, bv=bv: _sdpa(qt, bk, bv, True),
                    f"{name}, causal",
                    bytes=kc.nbytes() + vc.nbytes(),
                    flops=4 * tokens * tokens // 2 * head_dim * q_heads,
                )
            )
    return out


def _cases(device, dtype, q_heads, kv_heads, head_dim, decode_shapes, prefill_tokens) -> List[Case]:
    elt = torch.empty(0, dtype=dtype).element_size()
    out = []

    for batch, ctx in decode_shapes:
        k_cache = torch.randn(batch, kv_heads, ctx, head_dim, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(batch, q_heads, head_dim, dtype=dtype, device=device)
        k = torch.randn(batch, kv_heads, head_dim, dtype=dtype, device=device)
        v = torch.randn_like(k)
        slots = torch.arange(batch, dtype=torch.int32, device=device)
        positions = torch.full((batch,), ctx - 1, dtype=torch.int32, device=device)
        workspace = torch.empty(
            ops.attention_decode_workspace_bytes(batch, q_heads, k_cache), dtype=torch.uint8, device=device
        )
        # The baseline attends one query over the whole cache, which is what ours does at
        # position ctx - 1.
        bk, bv, name = _baseline_kv(k_cache, v_cache, q_heads)
        q4 = q.view(batch, q_heads, 1, head_dim)
        out.append(
            Case(
                "attention_decode",
                f"B={batch} ctx={ctx} H={q_heads}/{kv_heads} D={head_dim}",
                lambda q=q, k=k, v=v, kc=k_cache, vc=v_cache, s=slots, p=positions, w=workspace: ops.attention_decode(
                    q, k, v, kc, vc, s, p, workspace=w, check_indices=False
                ),
                lambda q4=q4, bk=bk, bv=bv: _sdpa(q4, bk, bv, False),
                name,
                bytes=2 * batch * kv_heads * ctx * head_dim * elt,
            )
        )

    for tokens in prefill_tokens:
        q = torch.randn(tokens, q_heads, head_dim, dtype=dtype, device=device)
        k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
        v = torch.randn_like(k)
        k_cache = torch.randn(1, kv_heads, tokens, head_dim, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
        # SDPA's [N, H, T, D] layout, made once outside the timed call.
        qt = q.transpose(0, 1).unsqueeze(0).contiguous()
        bk, bv, name = _baseline_kv(
            k.transpose(0, 1).unsqueeze(0).contiguous(), v.transpose(0, 1).unsqueeze(0).contiguous(), q_heads
        )
        out.append(
            Case(
                "attention_prefill",
                f"T={tokens} H={q_heads}/{kv_heads} D={head_dim} causal",
                lambda q=q, k=k, v=v, kc=k_cache, vc=v_cache: ops.attention_prefill(q, k, v, kc, vc, 0, 0),
                lambda qt=qt, bk=bk, bv=bv: _sdpa(qt, bk, bv, True),
                f"{name}, causal",
                bytes=2 * tokens * kv_heads * head_dim * elt,
                flops=4 * tokens * tokens // 2 * head_dim * q_heads,
            )
        )
    return out
