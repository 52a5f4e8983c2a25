"""The InternLM2 decoder, composed from fastinternlm's ops: the whole forward pass in one
file.

    h = embed(tokens)
    for each layer:
        x = rmsnorm(h)                       (fused with the residual add from layer 2 on)
        q, k, v = split(x @ wqkv.T)          (one GEMM: InternLM2's grouped wqkv layout)
        q, k = rope(q, k, positions, base)   (angles in the kernel; one base per token)
        h = h + attention(q, k, v, cache) @ wo.T
                                             (decode: split, rope and attention are one kernel
                                             reading the fused projection)
        x = rmsnorm(h)
        h = h + silu(x @ w1.T) * (x @ w3.T) @ w2.T   (w1 and w3 stacked: one GEMM)
    logits = rmsnorm(h) @ output.T           (float32)

The KV cache is preallocated: per layer, k and v of [max_batch, kv_heads, max_seq_len,
head_dim]; a sequence owns one slot (a row of the batch dimension). Decode takes its
tokens, slots, positions and rotary bases as device tensors and never reads them back on
the host, so a whole decode step can be captured as a CUDA graph and replayed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Union

import torch
import torch.nn.functional as F

from . import ops
from .config import ModelConfig


@dataclasses.dataclass
class Layer:
    attention_norm: torch.Tensor
    wqkv: torch.Tensor        # [(H + 2 KV) * D, hidden], grouped per KV head (see config.py)
    wo: torch.Tensor          # [hidden, H * D]
    ffn_norm: torch.Tensor
    w13: torch.Tensor         # [2 * ffn, hidden]: gate (w1) rows, then up (w3) rows
    w2: torch.Tensor          # [hidden, ffn]


Weight = Union[torch.Tensor, "ops.Int4Weight"]


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x @ w.T through torch (cuBLAS / oneDNN) for dense weights, our int4 GEMM for int4."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    return ops.int4_gemm(x, w)


class Transformer:
    def __init__(self, config: ModelConfig, tok_embeddings: torch.Tensor, layers: List[Layer],
                 norm: torch.Tensor, output: Weight, *, max_batch: int, max_seq_len: int):
        self.config = config
        self.tok_embeddings = tok_embeddings
        self.layers = layers
        self.norm = norm
        self.output = output
        self.device = tok_embeddings.device
        self.dtype = tok_embeddings.dtype
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        shape = (max_batch, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in layers]
        self.v_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in layers]

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def _forward(self, tokens: torch.Tensor,
                 attend: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Hidden states after the final norm for `tokens` [T]; attend(layer, qkv) takes the
        fused projection [T, kv_heads, G + 2, D], applies RoPE, writes k, v into the cache
        and returns the attention output [T, H, D]."""
        c = self.config
        n = tokens.shape[0]
        # F.embedding returns a fresh tensor, so it can serve as the residual stream that
        # add_rms_norm updates in place.
        residual = F.embedding(tokens, self.tok_embeddings)
        x = ops.rms_norm(residual, self.layers[0].attention_norm, c.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = ops.add_rms_norm(out, residual, layer.attention_norm, c.rms_norm_eps)
            qkv = linear(x, layer.wqkv).view(n, c.num_kv_heads, c.group_size + 2, c.head_dim)
            attn = attend(i, qkv)
            out = linear(attn.view(n, c.q_size), layer.wo)
            x = ops.add_rms_norm(out, residual, layer.ffn_norm, c.rms_norm_eps)
            out = linear(ops.silu_and_mul(linear(x, layer.w13)), layer.w2)
        return ops.add_rms_norm(out, residual, self.norm, c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits, computed in the activation dtype as HF does, then widened."""
        return linear(hidden, self.output).float()

    def prefill(self, tokens: torch.Tensor, slot: int, start: int, base: float) -> torch.Tensor:
        """Run tokens [T] (positions start .. start+T-1) of the sequence in `slot`, filling
        its cache; returns the final hidden states [T, hidden]."""
        c = self.config
        positions = torch.arange(start, start + tokens.shape[0], dtype=torch.int32, device=self.device)

        def attend(i, qkv):
            n = qkv.shape[0]
            q = qkv[:, :, : c.group_size].reshape(n, c.num_heads, c.head_dim)
            k = qkv[:, :, c.group_size].contiguous()
            v = qkv[:, :, c.group_size + 1].contiguous()
            ops.rotary_embedding(q, k, positions, base)
            return ops.attention_prefill(q, k, v, self.k_cache[i], self.v_cache[i], slot, start)

        return self._forward(tokens, attend)

    def decode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
               bases: torch.Tensor) -> torch.Tensor:
        """One token per sequence: tokens [B] at positions [B] (int32) in slots [B] (int32),
        rotary bases [B] (float32), all on the device; returns float32 logits [B, vocab].
        The caller validates slots and positions once; nothing here syncs with the host.
        Attention takes q, k, v straight from the fused projection and applies RoPE itself
        (attention_decode_qkv): no split copies, no rotary launch."""
        return self.logits(self.decode_hidden(tokens, slots, positions, bases))

    def decode_hidden(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                      bases: torch.Tensor) -> torch.Tensor:
        """decode without the output head: the final hidden states [B, hidden] (the engine
        runs the head itself, over decode and prefill rows together). A row whose slot is
        out of range (-1) writes nothing into the cache; its output is meaningless."""
        c = self.config
        workspace = torch.empty(ops.attention_decode_workspace_bytes(tokens.shape[0], c.num_heads, self.k_cache[0]),
                                dtype=torch.uint8, device=self.device)

        def attend(i, qkv):
            return ops.attention_decode_qkv(qkv, self.k_cache[i], self.v_cache[i], slots, positions, bases,
                                            workspace=workspace, check_indices=False)

        return self._forward(tokens, attend)
