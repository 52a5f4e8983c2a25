"""Random weights of a given shape, in the one weight form, for the benchmarks (no
checkpoint, no download). Speed does not depend on the values, but zeros could take
shortcuts, so: linears randn * 0.02, norms 1 + 0.1 randn."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import Layer, ModelWeights
from ..ops.int4_gemm import quantize_int4


def random_weights(
    config: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float16, seed: int = 0
) -> ModelWeights:
    """ModelWeights of `config` drawn on `device` (an untied head of its own)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    c = config

    def lin(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).mul_(0.02)

    def norm():
        return torch.randn(c.hidden_size, generator=gen, device=device, dtype=dtype).mul_(0.1).add_(1)

    tok_embeddings = lin(c.vocab_size, c.hidden_size)
    layers = [
        Layer(
            norm(),
            lin(c.qkv_rows, c.hidden_size),
            lin(c.hidden_size, c.q_size),
            norm(),
            lin(2 * c.intermediate_size, c.hidden_size),
            lin(c.hidden_size, c.intermediate_size),
        )
        for _ in range(c.num_layers)
    ]
    return ModelWeights(tok_embeddings, layers, norm(), lin(c.vocab_size, c.hidden_size))


def quantize_linears(weights: ModelWeights, group_size: int) -> ModelWeights:
    """The same model with every decoder linear quantized to int4 (ops.quantize_int4, as
    quant="int4" at load does); embeddings, norms and the head are shared, not copied."""
    layers = [
        Layer(
            layer.attention_norm,
            quantize_int4(layer.wqkv, group_size),
            quantize_int4(layer.wo, group_size),
            layer.ffn_norm,
            quantize_int4(layer.w13, group_size),
            quantize_int4(layer.w2, group_size),
        )
        for layer in weights.layers
    ]
    return ModelWeights(weights.tok_embeddings, layers, weights.norm, weights.output)


__all__ = ["quantize_linears", "random_weights"]
