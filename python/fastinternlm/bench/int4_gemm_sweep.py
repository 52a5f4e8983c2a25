"""Sweep of the CUDA int4 GEMV (M <= 16) configurations built into the module.

csrc/int4_gemm_small_m.cu builds a few configurations of its kernel (warps per block,
rows per block, groups per pipeline step, register stages; described there) next to the
default, variant 0, for group 128. This times each of them, in one process, on the
InternLM2.5-7B decode shapes, so one GPU run says which is fastest. Variants are selected
through the benchmarking hook fastinternlm._C._set_small_m_variant, reset to 0 at the end.

For every variant it first checks the product against a float64 reference on one random
weight per shape and M (PASS/FAIL with the relative error), then times M = 1 and M = 16
with CUDA-graph replays of back-to-back calls (launch overhead mostly hidden), the weights
rotated among copies that exceed L2 so every call streams them from DRAM. Reported: us per
call and the bytes moved per second as a percentage of the measured copy bandwidth.

    python -m fastinternlm.bench.int4_gemm_sweep [float16|bfloat16]
"""

from __future__ import annotations

import sys
from typing import Dict, List, Tuple

import torch

from .. import ops
from ..ops._checks import _C
from ._harness import copy_bandwidth, time_fn
from .int4_gemm import ROTATE_BYTES, random_weight, rotating, unpack

# (name, n = out_features, k = in_features); group 128. w13 is the fused gate/up
# projection the model runs, w1 one half of it.
SHAPES = [("wqkv", 6144, 4096), ("wo", 4096, 4096), ("w13", 28672, 4096), ("w1", 14336, 4096), ("w2", 4096, 14336)]
ROWS = [1, 16]
GROUP = 128
MIN_TIME = 0.02  # seconds of calibration per timing: 60 timings must fit in a few seconds


def _reference(x: torch.Tensor, qw) -> torch.Tensor:
    """float64 x @ W^T with W dequantized in float64 from the packed format (q s + m)."""
    q = unpack(qw.qweight).double()
    s = qw.scales.double().repeat_interleave(qw.group_size, dim=1)
    m = qw.offsets.double().repeat_interleave(qw.group_size, dim=1)
    return x.double() @ (q * s + m).t()


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        print("int4_gemm_sweep: no CUDA device, nothing to sweep")
        return 0
    dtype = getattr(torch, argv[0]) if argv else torch.float16
    return sweep(torch.device("cuda"), dtype)


def sweep(device: torch.device, dtype: torch.dtype) -> int:
    """Checks and times every variant; 1 if any check failed. (On the CPU, which ignores
    the variants, it only exercises this script.)"""
    variants = int(_C.int4_small_m_variants)
    # Output rounding (2^-11 f16, 2^-8 bf16 relative) dominates; the float32 sums add far
    # less. A bound of 4 roundings of the norm flags a wrong kernel (errors of O(1)) without
    # flagging rounding noise.
    tol = 4 * (2.0**-11 if dtype == torch.float16 else 2.0**-8)
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"int4_gemm small-M sweep on {name} ({dtype}, g{GROUP}); "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; {variants} variants"
    )

    # [shape][rows] -> (weights, x, bytes moved per call)
    setups: Dict[Tuple[str, int], Tuple[List, torch.Tensor, int]] = {}
    references: Dict[Tuple[str, int], torch.Tensor] = {}
    for name, n, k in SHAPES:
        first = random_weight(n, k, GROUP, device)
        copies = max(1, -(-ROTATE_BYTES // first.nbytes))
        weights = [first] + [random_weight(n, k, GROUP, device) for _ in range(copies - 1)]
        for rows in ROWS:
            x = torch.randn(rows, k, dtype=dtype, device=device)
            setups[(name, rows)] = (weights, x, first.nbytes + (rows * k + rows * n) * x.element_size())
            references[(name, rows)] = _reference(x, first)

    times: Dict[Tuple[int, str, int], float] = {}
    failures = 0
    bad_variants = set()
    try:
        for v in range(variants):
            _C._set_small_m_variant(v)
            checks = []
            for (name, rows), (weights, x, _) in setups.items():
                err = _rel_error(ops.int4_gemm(x, weights[0]), references[(name, rows)])
                ok = err <= tol
                failures += not ok
                checks.append(f"{name}/M{rows} {'PASS' if ok else 'FAIL'} {err:.1e}")
            print(f"variant {v} check: " + ", ".join(checks))
            if any("FAIL" in c for c in checks):
                bad_variants.add(v)
            for (name, rows), (weights, x, _) in setups.items():
                fn = rotating([lambda w=w, x=x: ops.int4_gemm(x, w) for w in weights])
                times[(v, name, rows)] = time_fn(fn, device, MIN_TIME, graph=True)
    finally:
        _C._set_small_m_variant(0)

    keys = list(setups)
    width = 17
    print("\nus per call (% of copy bandwidth)")
    print("variant".ljust(8) + "".join(f"{n}/M{r}".rjust(width) for n, r in keys))
    for v in range(variants):
        cells = []
        for key in keys:
            t = times[(v,) + key]
            cells.append(f"{t * 1e6:.1f} ({100 * setups[key][2] / t / bandwidth:.0f}%)".rjust(width))
        print(str(v).ljust(8) + "".join(cells))
    print("\nbest variant per shape:")
    for key in keys:
        best = min(range(variants), key=lambda v: times[(v,) + key])
        t, t0 = times[(best,) + key], times[(0,) + key]
        print(
            f"  {key[0]}/M{key[1]}: variant {best}, {t * 1e6:.1f} us "
            f"({100 * setups[key][2] / t / bandwidth:.0f}% of copy), default {t0 * 1e6:.1f} us"
        )
    # One pick for a whole decode step: the least summed M = 1 time over one InternLM2.5-7B
    # layer's GEMVs (wqkv, wo, the fused gate/up, w2), among variants whose checks passed.
    layer = [key for key in keys if key[1] == 1 and key[0] in ("wqkv", "wo", "w13", "w2")]
    good = [v for v in range(variants) if v not in bad_variants]
    if layer and good:
        pick = min(good, key=lambda v: sum(times[(v,) + key] for key in layer))
        total = sum(times[(pick,) + key] for key in layer)
        total0 = sum(times[(0,) + key] for key in layer)
        print(f"\nOVERALL_BEST_M1 {pick}  (one layer's M=1 GEMVs: {total * 1e6:.1f} us; default {total0 * 1e6:.1f} us)")
    if failures:
        print(f"\n{failures} correctness check(s) FAILED: their timings mean nothing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
