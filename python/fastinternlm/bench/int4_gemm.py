"""Int4 weight-only GEMM benchmark: ours vs the dense matmul with the dequantized weight
(what the int4 format must beat to be worth it) and vs torch's own int4 kernel
(`torch._weight_int4pack_mm`, "tinygemm", what gpt-fast and torchao use) on the same
weights, where this torch build has it for the device and dtype.

CUDA: the InternLM2.5-7B linear layers at M = 1 (decode), 16 and 2048 (prefill), group
128. CPU: two small square-ish layers at group 128, and SmolLM2-135M's layers (fused q/k/v,
o, fused gate/up, down) at group 32 (its Q4_1 GGUF), the model the CPU path runs end to
end. Decode reads every weight once, so the weights are rotated among copies that
together exceed L2 (50 MB on H100); otherwise a repeated call would be served from L2.

    python -m fastinternlm.bench.int4_gemm [cuda|cpu] [float16|bfloat16|float32]
"""

from __future__ import annotations

import itertools
import sys
from typing import Callable, List, Optional

import torch

from .. import ops
from ..ops.int4_gemm import Int4Weight
from ._harness import Case, format_table, run_cases

# (name, n = out_features, k = in_features, group_size)
# InternLM2.5-7B
CUDA_SHAPES = [
    ("wqkv", 6144, 4096, 128),
    ("wo", 4096, 4096, 128),
    ("w1/w3", 14336, 4096, 128),
    ("w2", 4096, 14336, 128),
]
CUDA_ROWS = [1, 16, 2048]
CPU_SHAPES = [
    ("small", 1024, 1024, 128),
    ("ffn-ish", 2816, 1024, 128),
    ("smollm2 qkv", 960, 576, 32),
    ("smollm2 o", 576, 576, 32),
    ("smollm2 gate/up", 3072, 576, 32),
    ("smollm2 down", 576, 1536, 32),
]
# 1: batch-1 decode (the fused path); 16 and 64: the engine's batched decode steps; 512: a
# prefill chunk (both the buffered path, which has an AVX-512 tier: compare it with
# FASTINTERNLM_CPU_ISA=x86-64-v3 in a second process).
CPU_ROWS = [1, 16, 64, 512]
ROTATE_BYTES = 128 << 20  # > 2x the H100's L2


def random_weight(n: int, k: int, group_size: int, device: torch.device) -> Int4Weight:
    qweight = torch.randint(-(2**31), 2**31, (n, k // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(n, k // group_size, device=device) * 0.01 + 0.001).half()
    offsets = (-8 * scales.float() * (1 + 0.1 * torch.randn_like(scales.float()))).half()
    return Int4Weight.from_tensors(qweight, scales, offsets, group_size)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [n, k/8] -> int32 [n, k] nibbles (format v1: nibble i of word j is k = 8j + i)."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    return ((qweight.unsqueeze(-1) >> shifts) & 15).reshape(qweight.shape[0], -1)


def _tinygemm(x: torch.Tensor, qw: Int4Weight) -> Optional[Callable[[], torch.Tensor]]:
    """torch's int4 kernel on the same weights, or None where this torch lacks it for the
    device or dtype. tinygemm dequantizes (q - 8) * scale + zero, so zero = m + 8 s."""
    try:
        q = unpack(qw.qweight)
        zero = qw.offsets.float() + 8 * qw.scales.float()
        scale_zero = torch.stack([qw.scales.float().t(), zero.t()], dim=-1).to(x.dtype).contiguous()
        if x.is_cuda:
            # uint8 [n, k/2], even k in the high nibble; 8 inner k-tiles as torchao uses.
            packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
            fn = lambda: torch._weight_int4pack_mm(x, packed, qw.group_size, scale_zero)  # noqa: E731
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            fn = lambda: torch._weight_int4pack_mm_for_cpu(x, packed, qw.group_size, scale_zero)  # noqa: E731
        fn()
        return fn
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return None


def _agrees(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Loose check that a baseline computes the same product (so its layout is understood)."""
    a, b = a.float(), b.float()
    return bool(((a - b).norm() <= 0.02 * b.norm()).item())


def rotating(fns: List[Callable[[], object]]) -> Callable[[], object]:
    it = itertools.cycle(fns)
    return lambda: next(it)()


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.float32:
        return []  # float32 activations are CPU-only
    shapes, rows_list = (CUDA_SHAPES, CUDA_ROWS) if device.type == "cuda" else (CPU_SHAPES, CPU_ROWS)
    rotate = ROTATE_BYTES if device.type == "cuda" else 0
    out: List[Case] = []
    for name, n, k, group_size in shapes:
        first = random_weight(n, k, group_size, device)
        copies = max(1, -(-rotate // first.nbytes))
        weights = [first] + [random_weight(n, k, group_size, device) for _ in range(copies - 1)]
        dense_bytes = n * k * torch.tensor([], dtype=dtype).element_size()
        dense = [ops.dequantize_int4(w, dtype) for w in weights[: max(1, -(-rotate // dense_bytes))]]
        for rows in rows_list:
            x = torch.randn(rows, k, dtype=dtype, device=device)
            es = x.element_size()
            nbytes = first.nbytes + (rows * k + rows * n) * es
            shape = f"{name} M={rows} N={n} K={k} g={group_size}"
            ours = rotating([lambda w=w, x=x: ops.int4_gemm(x, w) for w in weights])
            out.append(
                Case(
                    "int4_gemm",
                    shape,
                    ours,
                    rotating([lambda d=d, x=x: torch.matmul(x, d.t()) for d in dense]),
                    f"torch.matmul (dense {str(dtype).replace('torch.', '')})",
                    bytes=nbytes,
                    flops=2 * rows * n * k,
                )
            )
            tiny = [_tinygemm(x, w) for w in weights]
            if all(t is not None for t in tiny):
                label = "torch._weight_int4pack_mm (tinygemm)"
                if not _agrees(tiny[0](), ops.int4_gemm(x, weights[0])):
                    label += " [outputs differ: layout not understood]"
                out.append(Case("int4_gemm", shape, ours, rotating(tiny), label, bytes=nbytes, flops=2 * rows * n * k))
    return out


if __name__ == "__main__":
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else (torch.float16 if dev.type == "cuda" else torch.float32)
    print(f"int4_gemm on {dev} ({dt})")
    print(format_table(run_cases(cases(dev, dt), dev)))
