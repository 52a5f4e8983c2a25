"""RMSNorm benchmark: ours vs torch eager doing the same float32-internal computation."""

from __future__ import annotations

from typing import List

import torch

from .. import ops
from ._harness import Case


def _torch_rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _torch_add_rms_norm(x, residual, w, eps):
    residual.add_(x)
    return _torch_rms_norm(residual, w, eps)


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    hidden = 4096  # InternLM2.5-7B
    rows_list = [1, 16, 2048, 16384] if device.type == "cuda" else [1, 16, 512]
    out = []
    for rows in rows_list:
        x = torch.randn(rows, hidden, dtype=dtype, device=device)
        r = torch.randn(rows, hidden, dtype=dtype, device=device)
        w = torch.randn(hidden, dtype=dtype, device=device)
        elt = x.element_size()
        out.append(
            Case(
                "rms_norm",
                f"rows={rows} hidden={hidden}",
                lambda x=x, w=w: ops.rms_norm(x, w, 1e-5),
                lambda x=x, w=w: _torch_rms_norm(x, w, 1e-5),
                "torch eager",
                bytes=(2 * rows * hidden + hidden) * elt,
            )
        )
        out.append(
            Case(
                "add_rms_norm",
                f"rows={rows} hidden={hidden}",
                lambda x=x, r=r, w=w: ops.add_rms_norm(x, r, w, 1e-5),
                lambda x=x, r=r, w=w: _torch_add_rms_norm(x, r, w, 1e-5),
                "torch eager",
                bytes=(4 * rows * hidden + hidden) * elt,
            )
        )
    return out
