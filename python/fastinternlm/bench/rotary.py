"""Rotary benchmark: ours (angles in the kernel) vs torch eager with a precomputed
cos/sin cache, the way HF applies it."""

from __future__ import annotations

from typing import List

import torch

from .. import ops
from ._harness import Case


def _torch_rotary(q, k, cos, sin):
    def rotate(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    q.copy_(q * cos + rotate(q) * sin)
    k.copy_(k * cos + rotate(k) * sin)


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    hq, hkv, dim, base = 32, 8, 128, 1e6  # InternLM2.5-7B
    token_list = [1, 16, 2048, 16384] if device.type == "cuda" else [1, 16, 512]
    out = []
    for tokens in token_list:
        q = torch.randn(tokens, hq, dim, dtype=dtype, device=device)
        k = torch.randn(tokens, hkv, dim, dtype=dtype, device=device)
        pos = torch.randint(0, 32768, (tokens,), dtype=torch.int32, device=device)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))
        freqs = pos.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
        nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + pos.numel() * 4
        out.append(
            Case(
                "rotary_embedding",
                f"tokens={tokens} hq={hq} hkv={hkv} d={dim}",
                lambda q=q, k=k, pos=pos: ops.rotary_embedding(q, k, pos, base),
                lambda q=q, k=k, cos=cos, sin=sin: _torch_rotary(q, k, cos, sin),
                "torch eager (cos/sin cache)",
                bytes=nbytes,
            )
        )
    return out
