"""Rotary embedding with per-token bases, and the dynamic-NTK base
(see csrc/include/fastinternlm/rotary.h)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._checks import (
    POSITION_DTYPES,
    _C,
    check_activation,
    check_no_overlap,
    check_nonempty,
    check_tensor,
    context,
    dtype_code,
    host_float,
    host_int,
    same_device,
)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, base: Union[float, torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (half-split pairing) and return them.

    positions: int32/int64 [T]. base: one float for every token, or a float32 tensor [T]
    with one base per token (a batch can carry one dynamic-NTK base per sequence)."""
    check_tensor("q", q, ndim=3)
    check_activation("q", q)
    tokens, _, head_dim = q.shape
    check_tensor("k", k, dtypes=(q.dtype,), shape=(tokens, None, head_dim))
    check_tensor("positions", positions, dtypes=POSITION_DTYPES, shape=(tokens,))
    tensors = dict(q=q, k=k, positions=positions)
    bases_ptr, base_value = 0, 1.0
    if isinstance(base, torch.Tensor):
        check_tensor("base", base, dtypes=(torch.float32,), shape=(tokens,))
        tensors["base"] = base
        bases_ptr = base.data_ptr()
    else:
        try:
            base_value = host_float("base", base, float32=True)
        except TypeError:
            raise TypeError(f"base must be a float or a float32 tensor, got {type(base).__name__}") from None
    device = same_device(**tensors)
    if tokens == 0:
        return q, k
    check_nonempty("q", q)
    check_nonempty("k", k)
    # Both are rotated in place: a byte shared by q and k would be rotated twice.
    check_no_overlap({"q": q, "k": k}, {name: t for name, t in tensors.items() if name not in ("q", "k")})
    _C.rotary_embedding(
        *context(device),
        dtype_code(q.dtype),
        q.data_ptr(),
        k.data_ptr(),
        positions.data_ptr(),
        dtype_code(positions.dtype),
        bases_ptr,
        base_value,
        tokens,
        q.shape[1],
        k.shape[1],
        head_dim,
    )
    return q, k


def ntk_base(theta: float, factor: Optional[float], max_position_embeddings: int, length: int, head_dim: int) -> float:
    """The dynamic-NTK rotary base for a sequence of `length` tokens: theta itself while
    length <= max_position_embeddings (or factor is None: no dynamic NTK), else
    theta * (factor * length / max_position_embeddings - (factor - 1)) ** (D / (D - 2)).

    The integers must be ints (a fractional length is refused, not truncated); a base that
    would not fit the float32 the rotary kernels take is refused with the numbers."""
    if factor is None:
        return float(host_float("theta", theta))
    return _C.ntk_base(
        host_float("theta", theta),
        host_float("factor", factor),
        host_int("max_position_embeddings", max_position_embeddings),
        host_int("length", length),
        host_int("head_dim", head_dim),
    )


def ntk_bases(
    lengths: torch.Tensor,
    theta: float,
    factor: Optional[float],
    max_position_embeddings: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ntk_base's formula on a tensor of sequence lengths, on its device, without a host
    sync (so a CUDA-graph decode step can compute its bases): theta where length <=
    max_position_embeddings or factor is None (no dynamic NTK), else
    theta * (factor * length / max_position_embeddings - (factor - 1)) ** (D / (D - 2)),
    computed in float64 and returned in `dtype`. The arguments are
    `ModelConfig.ntk_args` in this order."""
    if factor is None:
        return torch.full(lengths.shape, theta, dtype=dtype, device=lengths.device)
    length = lengths.double()
    f, m, d = factor, max_position_embeddings, head_dim
    scaled = theta * (f * length / m - (f - 1)).pow(d / (d - 2))
    return torch.where(length > m, scaled, torch.full_like(scaled, theta)).to(dtype)
