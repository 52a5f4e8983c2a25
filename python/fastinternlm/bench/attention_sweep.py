"""Sweep of the CUDA decode-attention split sizing (the benchmarking hook
fastinternlm._C._set_decode_split_tuning): for each (min_chunk, target_blocks), every case is
checked against SDPA and timed as CUDA-graph replays, then the best setting per case is
printed. The cache is sized as the model sizes it (max_seq 32K + a little), which is what
the split count depends on; the sequence's position sets the context.

    python -m fastinternlm.bench.attention_sweep
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .. import _C, ops
from ._harness import copy_bandwidth, time_fn

MIN_CHUNKS = [64, 128, 256, 512]
TARGET_BLOCKS = [264, 528, 1056, 2112]
CASES = [(1, 2048, 32832), (1, 8192, 32832), (1, 32768, 32832), (16, 2048, 2112)]  # batch, ctx, max_seq
Q_HEADS, KV_HEADS, D = 32, 8, 128


def main() -> int:
    if not torch.cuda.is_available():
        print("attention_sweep: no CUDA device, nothing to do")
        return 0
    dev, dt = torch.device("cuda"), torch.float16
    bw = copy_bandwidth(dev)
    print(f"decode attention split sweep on {torch.cuda.get_device_name(dev)}, copy bandwidth {bw / 1e9:.0f} GB/s")
    table = {}
    try:
        for batch, ctx, max_seq in CASES:
            kc = torch.randn(batch, KV_HEADS, max_seq, D, dtype=dt, device=dev)
            vc = torch.randn_like(kc)
            q = torch.randn(batch, Q_HEADS, D, dtype=dt, device=dev)
            k = torch.randn(batch, KV_HEADS, D, dtype=dt, device=dev)
            v = torch.randn_like(k)
            slots = torch.arange(batch, dtype=torch.int32, device=dev)
            pos = torch.full((batch,), ctx - 1, dtype=torch.int32, device=dev)
            nbytes = 2 * batch * KV_HEADS * ctx * D * 2
            # SDPA over the same keys, the new token's k, v included (ours writes it at ctx - 1).
            kc[:, :, ctx - 1], vc[:, :, ctx - 1] = k, v
            ref = F.scaled_dot_product_attention(q[:, :, None], kc[:, :, :ctx], vc[:, :, :ctx], enable_gqa=True)[
                :, :, 0
            ].float()
            for mc in MIN_CHUNKS:
                for tb in TARGET_BLOCKS:
                    _C._set_decode_split_tuning(mc, tb)
                    ws = torch.empty(
                        ops.attention_decode_workspace_bytes(batch, Q_HEADS, kc), dtype=torch.uint8, device=dev
                    )

                    def fn(ws=ws):
                        return ops.attention_decode(q, k, v, kc, vc, slots, pos, workspace=ws, check_indices=False)

                    err = float((fn().float() - ref).norm() / ref.norm())
                    t = time_fn(fn, dev, 0.05, graph=True)
                    table[(batch, ctx, mc, tb)] = (t, err)
                    print(
                        f"B={batch:<3d} ctx={ctx:<6d} min_chunk={mc:<4d} target={tb:<5d} {t * 1e6:8.1f} us "
                        f"{100 * nbytes / t / bw:5.1f}% copy  rel err vs SDPA {err:.1e}"
                        + ("" if err < 1e-2 else "  FAIL"),
                        flush=True,
                    )
            del kc, vc
            torch.cuda.empty_cache()
    finally:
        _C._set_decode_split_tuning(*_C.decode_split_defaults)
    print("best per case:")
    for batch, ctx, _ in CASES:
        rows = [(t, mc, tb) for (b, c, mc, tb), (t, e) in table.items() if b == batch and c == ctx and e < 1e-2]
        if rows:
            t, mc, tb = min(rows)
            print(f"  B={batch} ctx={ctx}: min_chunk={mc} target={tb} {t * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
