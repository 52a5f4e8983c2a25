"""SiLU-and-mul benchmark: ours vs torch eager F.silu(gate) * up."""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .. import ops
from ._harness import Case


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    ffn = 14336  # InternLM2.5-7B
    rows_list = [1, 16, 2048] if device.type == "cuda" else [1, 16, 128]
    out = []
    for rows in rows_list:
        x = torch.randn(rows, 2 * ffn, dtype=dtype, device=device)
        out.append(
            Case(
                "silu_and_mul",
                f"rows={rows} ffn={ffn}",
                lambda x=x: ops.silu_and_mul(x),
                lambda x=x: F.silu(x[:, :ffn]) * x[:, ffn:],
                "torch eager",
                bytes=3 * rows * ffn * x.element_size(),
            )
        )
    return out
