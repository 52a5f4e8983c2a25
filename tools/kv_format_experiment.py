"""Perplexity of SmolLM2-135M with candidate KV-cache quantization formats, simulated.

HF transformers runs the model (the same Q4_1 GGUF and text windows as
`python -m fastinternlm.bench accuracy`); every attention call replaces its K and V (after
RoPE, all positions, as our cache holds them) by what a candidate format would give back:
round trip through codes and per-group (scale, zero), optionally in a Hadamard-rotated
basis (k -> H^T Q(H k) leaves q.k as (Hq).Q(Hk); v likewise, the output rotated back).
This is how the cache format of attention.h was chosen; the engine's own numbers come from
the bench. Usage: PYTHONPATH=python python tools/kv_format_experiment.py [names...]
"""

from __future__ import annotations

import math
import sys

import torch


def hadamard(d: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def fake_quant(x: torch.Tensor, bits: int, group: int, clip: bool, half: bool = False) -> torch.Tensor:
    shape = x.shape
    g = x.reshape(-1, shape[-1] // group, group)
    qmax = 2**bits - 1

    def rt(lo, hi):
        scale = (hi - lo) / qmax
        if half:  # parameters stored as float16
            scale, lo = scale.half().float(), lo.half().float()
        inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        q = torch.clamp(torch.round((g - lo) * inv), 0, qmax)
        return q * scale + lo

    lo = g.amin(-1, keepdim=True)
    hi = g.amax(-1, keepdim=True)
    best = rt(lo, hi)
    if clip:
        err = ((best - g) ** 2).sum(-1, keepdim=True)
        for c in torch.linspace(0.5, 0.95, 10).tolist():
            y = rt(lo * c, hi * c)
            e = ((y - g) ** 2).sum(-1, keepdim=True)
            better = e < err
            best = torch.where(better, y, best)
            err = torch.where(better, e, err)
    return best.reshape(shape)


def make_format(bits_k, bits_v, group, rotate, clip, group_v=0, half=False):
    def apply(x, bits, group):
        if bits is None:
            return x
        d = x.shape[-1]
        g = group or d
        if rotate:
            h = hadamard(d).to(x.dtype)
            return fake_quant(x @ h, bits, g, clip, half) @ h.T
        return fake_quant(x, bits, g, clip, half)

    return lambda k, v: (apply(k, bits_k, group), apply(v, bits_v, group if group_v == 0 else group_v))


def bytes_per_token(bits_k, bits_v, group, rotate=False, clip=False, group_v=0, half=False, d=64):
    total = 0
    for b, g in ((bits_k, group), (bits_v, group if group_v == 0 else group_v)):
        if b is None:
            total += 4 * d  # float32 cache as the bench runs it
        else:
            total += d * b // 8 + (4 if half else 8) * (d // (g or d))
    return total


FORMATS = {
    # name: (bits K, bits V, group (None: the whole row), Hadamard, MSE clip)
    "fp32": (None, None, None, False, False),
    "int8 v1": (8, 8, None, False, False),
    "int4 v1": (4, 4, None, False, False),
    "int4 K only": (4, None, None, False, False),
    "int4 V only": (None, 4, None, False, False),
    "int4 g32": (4, 4, 32, False, False),
    "int4 g16": (4, 4, 16, False, False),
    "int4 clip": (4, 4, None, False, True),
    "int4 g32 clip": (4, 4, 32, False, True),
    "int4 Hadamard": (4, 4, None, True, False),
    "int4 Hadamard K only": (4, None, None, True, False),
    "int4 Hadamard V only": (None, 4, None, True, False),
    "int4 Hadamard g32": (4, 4, 32, True, False),
    "int4 Hadamard g16": (4, 4, 16, True, False),
    "int4 Hadamard clip": (4, 4, None, True, True),
    "int4 K g16, V row": (4, 4, 16, False, False, None),
    "int4 K g32, V row": (4, 4, 32, False, False, None),
    "int4 K g16, V g32": (4, 4, 16, False, False, 32),
    "int4 g16, float16 params": (4, 4, 16, False, False, 0, True),
    "int4 Hadamard g32, float16 params": (4, 4, 32, True, False, 0, True),
    "int8 Hadamard": (8, 8, None, True, False),
    "int8 g32": (8, 8, 32, False, False),
}


def main(names):
    import transformers.models.llama.modeling_llama as ml
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import fastinternlm
    from fastinternlm.bench.accuracy import evaluation_text, hf_model, perplexity, windows
    from fastinternlm.weights.gguf import default_model_path

    path = default_model_path()
    tok = fastinternlm.load(path, device="cpu", dtype=torch.float32, max_seq_len=64, progress=False).tokenizer
    chunks = windows(tok.encode(evaluation_text(), add_bos=False), 4096, 512)
    model = hf_model(path)
    state = {}

    def attention(module, query, key, value, attention_mask, **kw):
        key, value = state["fmt"](key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    ml.eager_attention_forward = attention
    model.config._attn_implementation = "eager"
    base = None
    print("| format | bytes per token per KV head (K+V, head_dim 64) | perplexity | vs fp32 |")
    print("|---|---|---|---|")
    for name in names or FORMATS:
        spec = FORMATS[name]
        state["fmt"] = make_format(*spec)
        with torch.no_grad():
            ppl = perplexity(lambda c: model(torch.tensor([c])).logits[0], chunks)
        if base is None:
            base = ppl
        print(f"| {name} | {bytes_per_token(*spec)} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f} % |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
