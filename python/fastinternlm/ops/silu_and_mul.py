"""SwiGLU's gate (see csrc/include/fastinternlm/silu_and_mul.h)."""

from __future__ import annotations

import torch

from ._checks import _C, check_activation, check_tensor, context, dtype_code, same_device


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2F] -> silu(x[..., :F]) * x[..., F:], shape [..., F]."""
    check_tensor("x", x)
    check_activation("x", x)
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x must have an even last dimension [..., 2 * ffn], got shape {tuple(x.shape)}")
    device = same_device(x=x)
    ffn = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], ffn, dtype=x.dtype, device=x.device)
    if out.numel():
        _C.silu_and_mul(*context(device), dtype_code(x.dtype), out.data_ptr(), x.data_ptr(), out.numel() // ffn, ffn)
    return out
