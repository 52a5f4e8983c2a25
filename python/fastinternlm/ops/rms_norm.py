"""RMSNorm and the fused residual-add + RMSNorm (see csrc/include/fastinternlm/rms_norm.h)."""

from __future__ import annotations

import torch

from ._checks import _C, check_activation, check_no_overlap, check_tensor, context, dtype_code, host_float, same_device


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, residual=None):
    """The device and eps as a float; residual (written in place) must share no byte with x
    or weight."""
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_activation("x", x)
    eps = host_float("eps", eps, float32=True)
    check_tensor("weight", weight, dtypes=(x.dtype,), shape=(x.shape[-1],))
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), shape=tuple(x.shape))
        device = same_device(x=x, residual=residual, weight=weight)
        check_no_overlap({"residual": residual}, {"x": x, "weight": weight})
        return device, eps
    return same_device(x=x, weight=weight), eps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension of x ([..., hidden]), returning a new tensor."""
    device, eps = _check(x, weight, eps)
    out = torch.empty_like(x)
    if x.numel():
        hidden = x.shape[-1]
        _C.rms_norm(
            *context(device),
            dtype_code(x.dtype),
            out.data_ptr(),
            x.data_ptr(),
            weight.data_ptr(),
            x.numel() // hidden,
            hidden,
            eps,
        )
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """residual += x in place, then return rms_norm(residual): the step between sub-layers."""
    device, eps = _check(x, weight, eps, residual=residual)
    out = torch.empty_like(x)
    if x.numel():
        hidden = x.shape[-1]
        _C.add_rms_norm(
            *context(device),
            dtype_code(x.dtype),
            out.data_ptr(),
            residual.data_ptr(),
            x.data_ptr(),
            weight.data_ptr(),
            x.numel() // hidden,
            hidden,
            eps,
        )
    return out
