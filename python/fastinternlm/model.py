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
head_dim]; a sequence owns one slot (a row of the batch dimension). kv_cache="int8" or
"int4" stores them quantized per token and KV head (ops.QuantizedKV, format v3 of
attention.h): a half or a quarter of the bytes plus a (scale, zero) per row (int8) or per
16 channels (int4), 4 bytes with float16 activations and 8 otherwise; the
attention kernels quantize on write and dequantize on read. Decode takes its
tokens, slots, positions and rotary bases as device tensors and never reads them back on
the host, so a whole decode step can be captured as a CUDA graph and replayed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import memory_plan, ops
from .config import ModelConfig


Weight = Union[torch.Tensor, "ops.Int4Weight"]


@dataclasses.dataclass
class DecodeRows:
    """One new token per sequence for a decode step: tokens [B] at positions [B] (int32) in
    slots [B] (int32) with rotary bases [B] (float32), all on the model's device."""

    tokens: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    bases: torch.Tensor


@dataclasses.dataclass
class Chunk:
    """Prompt tokens [n] of the sequence in `slot`, at positions start .. start+n-1,
    rotated with rotary base `base`."""

    tokens: torch.Tensor
    slot: int
    start: int
    base: float


@dataclasses.dataclass
class Layer:
    """One decoder layer's weights: the one weight form every loader returns (linears
    dense or ops.Int4Weight; row layouts in weights/layout.py)."""

    attention_norm: torch.Tensor
    wqkv: Weight  # [(H + 2 KV) * D, hidden], grouped per KV head
    wo: Weight  # [hidden, H * D]
    ffn_norm: torch.Tensor
    w13: Weight  # [2 * ffn, hidden]: gate (w1) rows, then up (w3) rows
    w2: Weight  # [hidden, ffn]


@dataclasses.dataclass
class ModelWeights:
    """Everything a Transformer is built from, as every loader returns it."""

    tok_embeddings: torch.Tensor  # [vocab, hidden]
    layers: List[Layer]
    norm: torch.Tensor  # [hidden]
    output: Weight  # [vocab, hidden]; `is tok_embeddings` when tied (and not quantized)

    def named_tensors(self) -> Iterator[Tuple[str, Weight]]:
        """Names as in Transformer ("layers.3.wqkv"); a tied output is listed once."""
        yield "tok_embeddings", self.tok_embeddings
        for i, layer in enumerate(self.layers):
            for field in dataclasses.fields(Layer):
                yield f"layers.{i}.{field.name}", getattr(layer, field.name)
        yield "norm", self.norm
        if self.output is not self.tok_embeddings:
            yield "output", self.output

    def check_finite(self) -> None:
        """model.check_finite over every tensor (int4 scales and offsets included)."""
        check_finite(_floating(self.named_tensors()))

    def nbytes(self) -> int:
        return sum(
            t.nbytes if isinstance(t, ops.Int4Weight) else t.numel() * t.element_size() for _, t in self.named_tensors()
        )


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or Inf: every token computed through it would be garbage."""


# Elements per isfinite pass: bounds the boolean temporary for a large embedding table.
_FINITE_CHUNK = 1 << 24


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on t's device (no host sync)."""
    flat = t.reshape(-1)
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    for i in range(0, flat.numel(), _FINITE_CHUNK):
        ok &= torch.isfinite(flat[i : i + _FINITE_CHUNK]).all()
    return ok


# kv_cache names: the activation dtypes (the cache must then be the model's own) and the
# quantized formats.
KV_CACHE_FLOAT = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
KV_CACHE_TYPES = ("fp16", "bf16", "fp32", "int8", "int4")


def resolve_kv_cache(kv_cache: Optional[str], dtype: torch.dtype) -> str:
    """The cache type for a model of activation dtype `dtype`: None means the activation
    dtype itself ("fp16", "bf16" or "fp32"); a float name must equal it (the kernels read a
    float cache in the activation dtype); "int8" / "int4" are the quantized formats."""
    own = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    if kv_cache is None:
        return own
    if not isinstance(kv_cache, str) or (kv_cache not in KV_CACHE_FLOAT and kv_cache not in ops.KV_QUANT_FORMATS):
        raise ValueError(f"kv_cache must be one of {KV_CACHE_TYPES} or None, got {kv_cache!r}")
    if kv_cache in KV_CACHE_FLOAT and KV_CACHE_FLOAT[kv_cache] != dtype:
        raise ValueError(
            f"kv_cache {kv_cache!r} must match the activation dtype {own} (a float cache is read in "
            f"the activation dtype); pass None, {own!r}, 'int8' or 'int4'"
        )
    return own if kv_cache in KV_CACHE_FLOAT else kv_cache


def _floating(named: Iterable[Tuple[str, Weight]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """An Int4Weight as its scales and offsets (its nibbles cannot be non-finite)."""
    for name, w in named:
        if isinstance(w, torch.Tensor):
            yield name, w
        else:
            yield f"{name}.scales", w.scales
            yield f"{name}.offsets", w.offsets


def check_finite(named: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Raise NonFiniteWeightError naming the first of `named` that holds a NaN or Inf;
    every tensor is scanned on its own device, with one host sync in all."""
    named = list(named)
    if not named:
        return
    flags = torch.stack([_all_finite(t) for _, t in named]).cpu()
    if bool(flags.all()):
        return
    name, t = named[int((~flags).nonzero()[0])]
    bad = ~torch.isfinite(t.reshape(-1))
    count, first = int(bad.sum()), int(bad.nonzero()[0])
    raise NonFiniteWeightError(
        f"weight {name} {tuple(t.shape)} holds {count} non-finite value(s) (NaN or Inf); the first at "
        f"flat index {first} is {float(t.reshape(-1)[first])}"
    )


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x @ w.T through torch (cuBLAS / oneDNN) for dense weights, our int4 GEMM for int4."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    return ops.int4_gemm(x, w)


class Transformer:
    def __init__(
        self,
        config: ModelConfig,
        tok_embeddings: torch.Tensor,
        layers: List[Layer],
        norm: torch.Tensor,
        output: Weight,
        *,
        max_batch: int,
        max_seq_len: Union[int, str],
        kv_cache: Optional[str] = None,
    ):
        """max_seq_len "auto": the longest context whose cache and workspace fit the free
        memory of the weights' device now (memory_plan.py). An explicit one is checked the
        same way first: a cache that does not fit is refused with the numbers and what
        would fit, before any of it is allocated."""
        self.config = config
        self.tok_embeddings = tok_embeddings
        self.layers = layers
        self.norm = norm
        self.output = output
        self.device = tok_embeddings.device
        self.dtype = tok_embeddings.dtype
        self.kv_cache = resolve_kv_cache(kv_cache, self.dtype)
        # The weights are resident already: the free memory is what the rest may use.
        self.memory_plan = memory_plan.resolve(
            memory_plan.ModelShape.from_config(config),
            self.device,
            max_seq_len=max_seq_len,
            max_batch=max_batch,
            kv_cache=self.kv_cache,
            dtype=self.dtype,
            weights=0,
        )
        max_seq_len = self.memory_plan.max_seq_len
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        pairs = [
            ops.empty_kv_cache(
                self.kv_cache, max_batch, config.num_kv_heads, max_seq_len, config.head_dim, self.dtype, self.device
            )
            for _ in layers
        ]
        self.k_cache = [k for k, _ in pairs]
        self.v_cache = [v for _, v in pairs]

    def named_weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Every floating-point tensor of the model with a readable name; an Int4Weight
        contributes its scales and offsets (its nibbles cannot be non-finite)."""
        weights = ModelWeights(self.tok_embeddings, self.layers, self.norm, self.output)
        return _floating(weights.named_tensors())

    def check_finite(self) -> None:
        """Raise NonFiniteWeightError naming the first weight (in model order) that holds a
        NaN or Inf. Runs where the weights live, one host sync for the whole model."""
        check_finite(self.named_weights())

    def cache_bytes(self) -> int:
        """Bytes of the KV cache, parameters of a quantized one included."""
        return sum(
            c.nbytes() if isinstance(c, ops.QuantizedKV) else c.numel() * c.element_size()
            for c in self.k_cache + self.v_cache
        )

    def _forward(self, tokens: torch.Tensor, attend: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
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
        return self.step(None, [Chunk(tokens, slot, start, base)])

    def step(self, decode: Optional["DecodeRows"], chunks: Sequence["Chunk"] = ()) -> torch.Tensor:
        """One forward over a batch of decode rows and prompt chunks of other sequences
        together; returns the final hidden states [B + sum of chunk lengths, hidden], the
        decode rows first, then each chunk's in order. The linear layers run once over all
        rows: the weights (the bulk of what a step reads) are streamed once per step, not
        once for the decode batch and again for each prompt chunk, and a chunk's rows add
        only their arithmetic. Attention runs per part: the decode rows through the fused
        decode kernel, each chunk through prefill attention over its own slot."""
        c = self.config
        parts = [decode.tokens] if decode is not None else []
        parts += [ch.tokens for ch in chunks]
        if not parts:
            raise ValueError("step needs decode rows or at least one prompt chunk, got neither")
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts)
        batch = decode.tokens.shape[0] if decode is not None else 0
        workspace = None
        if decode is not None:
            workspace = torch.empty(
                ops.attention_decode_workspace_bytes(batch, c.num_heads, self.k_cache[0]),
                dtype=torch.uint8,
                device=self.device,
            )
        positions = [
            torch.arange(ch.start, ch.start + ch.tokens.shape[0], dtype=torch.int32, device=self.device)
            for ch in chunks
        ]

        def attend(i, qkv):
            outs = []
            if decode is not None:
                outs.append(
                    ops.attention_decode_qkv(
                        qkv[:batch],
                        self.k_cache[i],
                        self.v_cache[i],
                        decode.slots,
                        decode.positions,
                        decode.bases,
                        workspace=workspace,
                        check_indices=False,
                    )
                )
            row = batch
            for ch, pos in zip(chunks, positions):
                n = ch.tokens.shape[0]
                outs.append(self._prefill_attend(i, qkv[row : row + n], ch, pos))
                row += n
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        return self._forward(tokens, attend)

    def _prefill_attend(self, i: int, qkv: torch.Tensor, chunk: "Chunk", positions: torch.Tensor) -> torch.Tensor:
        c = self.config
        n = qkv.shape[0]
        # With one KV head the reshape is a strided view, not a copy: rotary works in
        # place on contiguous rows.
        q = qkv[:, :, : c.group_size].reshape(n, c.num_heads, c.head_dim).contiguous()
        k = qkv[:, :, c.group_size].contiguous()
        v = qkv[:, :, c.group_size + 1].contiguous()
        ops.rotary_embedding(q, k, positions, chunk.base)
        return ops.attention_prefill(q, k, v, self.k_cache[i], self.v_cache[i], chunk.slot, chunk.start)

    def decode(
        self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, bases: torch.Tensor
    ) -> torch.Tensor:
        """One token per sequence: tokens [B] at positions [B] (int32) in slots [B] (int32),
        rotary bases [B] (float32), all on the device; returns float32 logits [B, vocab].
        The caller validates slots and positions once; nothing here syncs with the host.
        Attention takes q, k, v straight from the fused projection and applies RoPE itself
        (attention_decode_qkv): no split copies, no rotary launch."""
        return self.logits(self.decode_hidden(tokens, slots, positions, bases))

    def decode_hidden(
        self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, bases: torch.Tensor
    ) -> torch.Tensor:
        """decode without the output head: the final hidden states [B, hidden] (the engine
        runs the head itself, over decode and prefill rows together). A row whose slot is
        out of range (-1) writes nothing into the cache; its output is meaningless."""
        return self.step(DecodeRows(tokens, slots, positions, bases))
