"""A SmolLM2-135M-shaped decoder stack built from the CPU ops alone, timed end to end.

    python -m fastinternlm.bench.cpu_stack [--threads N] [--dtype float32] [--prompt 256]

30 layers of hidden 576, 9 query / 3 KV heads of 64, ffn 1536, random int4 group-32
weights (the shapes of its Q4_1 GGUF), float32 activations: per layer add_rms_norm,
int4_gemm (fused q/k/v), rotary, attention over the KV cache, int4_gemm (o), add_rms_norm,
int4_gemm (fused gate/up), silu_and_mul, int4_gemm (down). No embedding, LM head, loader
or sampling: this isolates what the kernels and the thread pool cost per token, the
number a real model run adds its own overheads to. Reports ms per decode step at a
context of `prompt` tokens and prefill tokens/s for the prompt."""

from __future__ import annotations

import argparse
import time

import torch

from .. import cpu, ops
from .int4_gemm import random_weight

LAYERS, HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, FFN, GROUP = 30, 576, 9, 3, 64, 1536, 32


def build(dtype: torch.dtype, max_seq: int):
    dev = torch.device("cpu")
    qkv = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    return [
        dict(
            qkv=random_weight(qkv, HIDDEN, GROUP, dev),
            o=random_weight(HIDDEN, Q_HEADS * HEAD_DIM, GROUP, dev),
            gate_up=random_weight(2 * FFN, HIDDEN, GROUP, dev),
            down=random_weight(HIDDEN, FFN, GROUP, dev),
            norm1=(torch.rand(HIDDEN) + 0.5).to(dtype),
            norm2=(torch.rand(HIDDEN) + 0.5).to(dtype),
            k_cache=torch.randn(1, KV_HEADS, max_seq, HEAD_DIM, dtype=dtype),
            v_cache=torch.randn(1, KV_HEADS, max_seq, HEAD_DIM, dtype=dtype),
        )
        for _ in range(LAYERS)
    ]


def forward(layers, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Tokens [start, start + T) of one sequence through every layer (prefill when T > 1)."""
    tokens = hidden.shape[0]
    positions = torch.arange(start, start + tokens)
    residual = torch.zeros_like(hidden)
    q_dim, kv_dim = Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for lw in layers:
        x = ops.add_rms_norm(hidden, residual, lw["norm1"], 1e-5)
        qkv = ops.int4_gemm(x, lw["qkv"])
        q = qkv[:, :q_dim].reshape(tokens, Q_HEADS, HEAD_DIM).contiguous()
        k = qkv[:, q_dim : q_dim + kv_dim].reshape(tokens, KV_HEADS, HEAD_DIM).contiguous()
        v = qkv[:, q_dim + kv_dim :].reshape(tokens, KV_HEADS, HEAD_DIM).contiguous()
        ops.rotary_embedding(q, k, positions, 100000.0)
        if tokens > 1:
            a = ops.attention_prefill(q, k, v, lw["k_cache"], lw["v_cache"], 0, start)
        else:
            a = ops.attention_decode(
                q,
                k,
                v,
                lw["k_cache"],
                lw["v_cache"],
                torch.zeros(1, dtype=torch.int32),
                positions.to(torch.int32),
                check_indices=False,
            )
        attn = ops.int4_gemm(a.reshape(tokens, q_dim), lw["o"])
        x = ops.add_rms_norm(attn, residual, lw["norm2"], 1e-5)
        hidden = ops.int4_gemm(ops.silu_and_mul(ops.int4_gemm(x, lw["gate_up"])), lw["down"])
    return hidden


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastinternlm.bench.cpu_stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for our ops (0: the default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--prompt", type=int, default=256, help="prefill length, then the decode context")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")
    args = parser.parse_args(argv)
    cpu.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layers = build(dtype, args.prompt + args.steps + 1)
    prompt = torch.randn(args.prompt, HIDDEN, dtype=dtype)
    forward(layers, prompt, 0)  # warm-up, and fills the caches
    start = time.perf_counter()
    forward(layers, prompt, 0)
    prefill = time.perf_counter() - start
    token = torch.randn(1, HIDDEN, dtype=dtype)
    forward(layers, token, args.prompt)
    start = time.perf_counter()
    for i in range(args.steps):
        forward(layers, token, args.prompt + i)
    decode = (time.perf_counter() - start) / args.steps
    print(
        f"SmolLM2-135M-shaped stack, {args.dtype}, {cpu.get_num_threads()} thread(s), CPU tier {cpu.cpu_isa()}: "
        f"prefill {args.prompt} tokens {prefill * 1e3:.0f} ms ({args.prompt / prefill:.0f} tokens/s); "
        f"decode {decode * 1e3:.2f} ms/step ({1 / decode:.0f} steps/s) at context {args.prompt}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
