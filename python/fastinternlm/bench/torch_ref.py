"""The plain-torch baseline of the end-to-end benchmark (gpt-fast style, no torch.compile):
the same weights in fastinternlm's fused layout, run with stock torch ops only.

- RMSNorm in float32 via torch ops; RoPE from precomputed cos/sin tables (half-split
  pairing) whose row p holds the rotation of position p with the dynamic-NTK base of
  length p + 1 (what a decoded token at p uses in HF's and our "hf" NTK mode; a prompt
  longer than max_position_embeddings would use its own length's base instead, which
  the benchmark never prefills);
- attention by F.scaled_dot_product_attention over a static KV cache
  [batch, kv_heads, max_seq, head_dim] written with index_copy_, masked over the whole
  cache (as gpt-fast does), GQA through enable_gqa (repeat_interleave where unsupported);
  attention="grouped" instead folds each KV head's G query heads into G query rows
  (q [B, KV, G*T, D] against k, v [B, KV, S, D]): no K/V repeat whatever backend SDPA picks;
- linears by F.linear (fp16), or torch._weight_int4pack_mm (tinygemm, bfloat16
  activations) for int4: our w = q * s + m is tinygemm's (q - 8) * s + z with z = m + 8 s.

One decode step reads its inputs from static tensors, so it can be captured in a CUDA
graph (`TorchDecodeGraph`), the strongest baseline that needs no compiler."""

from __future__ import annotations

import time
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from ..config import ModelConfig

INNER_K_TILES = 8
ATTENTION_MODES = ("sdpa", "grouped")


def ntk_bases(config: ModelConfig, lengths: torch.Tensor) -> torch.Tensor:
    """float64 rotary base for sequences of `lengths` tokens (dynamic NTK past
    max_position_embeddings): ops.ntk_bases, the model's own formula."""
    return ops.ntk_bases(lengths, *config.ntk_args, dtype=torch.float64)


def rope_tables(config: ModelConfig, max_seq: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [max_seq, D/2]: row p rotates position p with the base of length p + 1.
    Angles in float32 from float32 inv_freq, as the model's kernels and HF compute them."""
    d = config.head_dim
    pos = torch.arange(max_seq, device=device)
    bases = ntk_bases(config, pos + 1)
    inv_freq = (bases[:, None] ** (-torch.arange(0, d, 2, device=device, dtype=torch.float64) / d)).float()
    angles = pos.float()[:, None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


# ---- int4 through tinygemm ------------------------------------------------------------


def unpack_int4(qw: "ops.Int4Weight") -> torch.Tensor:
    """q [n, k] int32 in 0..15 from our packed format (nibble i of word j = column 8j + i)."""
    shifts = torch.arange(0, 32, 4, device=qw.device, dtype=torch.int32)
    return ((qw.qweight.unsqueeze(-1) >> shifts) & 15).reshape(qw.n, qw.k)


class TinyGemmWeight:
    """One int4 linear in tinygemm's layout (torch._weight_int4pack_mm), converted exactly
    from our Int4Weight except for bfloat16 rounding of the scales and zero points."""

    def __init__(self, qw: "ops.Int4Weight"):
        q = unpack_int4(qw)
        self.n, self.k, self.group_size = qw.n, qw.k, qw.group_size
        s = qw.scales.float()
        z = qw.offsets.float() + 8 * s
        self.scales_and_zeros = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.cpu = qw.device.type == "cpu"
        if self.cpu:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), INNER_K_TILES)
        else:
            # Byte j of row r: q[r, 2j] in the high nibble, q[r, 2j + 1] in the low one.
            u8 = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
            self.packed = torch._convert_weight_to_int4pack(u8, INNER_K_TILES)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.k)
        if self.cpu:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.n)


def tinygemm_available(device: torch.device) -> bool:
    name = "_weight_int4pack_mm_for_cpu" if device.type == "cpu" else "_weight_int4pack_mm"
    return hasattr(torch, name)


def check_tinygemm(qw: "ops.Int4Weight", rows: int = 4) -> float:
    """Relative error (Frobenius) of tinygemm against our int4_gemm on one weight."""
    tg = TinyGemmWeight(qw)
    x = torch.randn(rows, qw.k, device=qw.device, dtype=torch.float16)
    ours = ops.int4_gemm(x, qw).float()
    theirs = tg(x.to(torch.bfloat16)).float()
    return float((theirs - ours).norm() / ours.norm())


# ---- the model -------------------------------------------------------------------------


class TorchLayer:
    def __init__(self, attention_norm, wqkv, wo, ffn_norm, w13, w2):
        self.attention_norm, self.wqkv, self.wo = attention_norm, wqkv, wo
        self.ffn_norm, self.w13, self.w2 = ffn_norm, w13, w2


def _sdpa_has_gqa() -> bool:
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):
        try:
            F.scaled_dot_product_attention(
                torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), enable_gqa=True
            )
            return True
        except Exception:
            return False


def attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor, mode: str, gqa: bool = True
) -> torch.Tensor:
    """Causal GQA: q [B, H, T, D] against caches [B, KV, S, D] under mask [1, 1, T, S]."""
    b, h, t, d = q.shape
    kvh = k_cache.shape[1]
    g = h // kvh
    if mode == "grouped":
        # Query head h = kv * G + j: [B, H, T, D] -> [B, KV, G*T, D], rows (j, t).
        y = F.scaled_dot_product_attention(
            q.reshape(b, kvh, g * t, d), k_cache, v_cache, attn_mask=mask.repeat(1, 1, g, 1)
        )
        # SDPA may return a non-contiguous layout on CUDA (it did on the H100): reshape copies
        # only when it has to.
        return y.reshape(b, h, t, d)
    if gqa:
        return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(
        q, k_cache.repeat_interleave(g, 1), v_cache.repeat_interleave(g, 1), attn_mask=mask
    )


def pick_attention(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, context: int, calls: int = 20
) -> Tuple[str, dict]:
    """The faster of the ATTENTION_MODES for one batch-1 decode step's attention over a
    cache of `context` tokens (one layer; CUDA events, perf_counter on the CPU): SDPA's backend choice for GQA with
    a mask depends on the torch build, so the baseline takes whichever is stronger here."""
    h, kvh, d, s = config.num_heads, config.num_kv_heads, config.head_dim, context + 8
    q = torch.randn(1, h, 1, d, device=device, dtype=dtype)
    kc = torch.randn(1, kvh, s, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    mask = (torch.arange(s, device=device) <= context)[None, None, None]
    gqa = _sdpa_has_gqa()
    times = {}
    for mode in ATTENTION_MODES:
        for _ in range(3):
            attend(q, kc, vc, mask, mode, gqa)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                attend(q, kc, vc, mask, mode, gqa)
            end.record()
            end.synchronize()
            times[mode] = begin.elapsed_time(end) / 1e3 / calls
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                attend(q, kc, vc, mask, mode, gqa)
            times[mode] = (time.perf_counter() - t0) / calls
    return min(times, key=times.get), times


class TorchModel:
    """Decoder in plain torch. dtype: the activation dtype (float16; bfloat16 for int4,
    whose embedding and fp16 output head are cast at the edges). Weights are shared with
    the caller, never copied (the int4 ones are converted once)."""

    def __init__(
        self,
        config: ModelConfig,
        tok_embeddings,
        layers: List[TorchLayer],
        norm,
        output,
        *,
        dtype: torch.dtype,
        max_batch: int,
        max_seq: int,
        attention: str = "sdpa",
    ):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention
        self.config = config
        self.tok_embeddings, self.layers, self.norm, self.output = tok_embeddings, layers, norm, output
        self.dtype = dtype
        self.device = tok_embeddings.device
        self.max_batch, self.max_seq = max_batch, max_seq
        self.gqa = _sdpa_has_gqa()
        self.cos, self.sin = rope_tables(config, max_seq, self.device)
        shape = (max_batch, config.num_kv_heads, max_seq, config.head_dim)
        # Zeros, not empty: SDPA multiplies masked-out values by a zero weight, and garbage
        # NaN/inf bits there would still poison the output (0 * NaN).
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in layers]
        self.cache_index = torch.arange(max_seq, device=self.device)
        self._norm_w = {}

    def _w(self, w: torch.Tensor) -> torch.Tensor:
        """A norm weight in the activation dtype (cast once, cached)."""
        if w.dtype == self.dtype:
            return w
        key = w.data_ptr()
        if key not in self._norm_w:
            self._norm_w[key] = w.to(self.dtype)
        return self._norm_w[key]

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return y.to(self.dtype) * self._w(w)

    def _linear(self, x: torch.Tensor, w) -> torch.Tensor:
        if isinstance(w, torch.Tensor):
            if w.dtype != x.dtype:  # the fp16 output head of the bfloat16 int4 model
                return F.linear(x.to(w.dtype), w)
            return F.linear(x, w)
        return w(x)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, heads, D]; cos, sin [T, D/2] float32."""
        half = x.shape[-1] // 2
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] at positions input_pos [T] (int64, shared by the batch, as in
        gpt-fast); writes k, v there in cache rows 0..B-1; returns final hidden [B, T, hidden]."""
        c = self.config
        b, t = tokens.shape
        g, kvh, d = c.group_size, c.num_kv_heads, c.head_dim
        x = F.embedding(tokens, self.tok_embeddings).to(self.dtype)
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        # Built per forward from the device positions ([T, max_seq] rather than a
        # [max_seq, max_seq] table, which would be 1 GB at 32K), so it stays graph-safe.
        mask = (self.cache_index[None, :] <= input_pos[:, None])[None, None]  # [1, 1, T, max_seq]
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer.attention_norm)
            qkv = self._linear(h, layer.wqkv).view(b, t, kvh, g + 2, d)
            q = qkv[:, :, :, :g].reshape(b, t, c.num_heads, d)
            k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            kc, vc = self.k_cache[i][:b], self.v_cache[i][:b]
            kc.index_copy_(2, input_pos, k)
            vc.index_copy_(2, input_pos, v)
            y = attend(q, kc, vc, mask, self.attention, self.gqa)
            x = x + self._linear(y.transpose(1, 2).reshape(b, t, c.q_size), layer.wo)
            h = self._rms(x, layer.ffn_norm)
            gate, up = self._linear(h, layer.w13).chunk(2, dim=-1)
            x = x + self._linear(F.silu(gate) * up, layer.w2)
        return self._rms(x, self.norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._linear(hidden, self.output).float()

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens [B] at position input_pos [1] -> float32 logits [B, vocab]."""
        return self.logits(self.forward(tokens[:, None], input_pos))[:, 0]


class TorchDecodeGraph:
    """TorchModel.decode for a fixed batch, captured once as a CUDA graph."""

    def __init__(self, model: TorchModel, batch: int, pool=None):
        dev = model.device
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.input_pos = torch.full((1,), model.max_seq - 1, dtype=torch.int64, device=dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                model.decode(self.tokens, self.input_pos)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model.decode(self.tokens, self.input_pos)
        torch.cuda.synchronize(dev)

    def run(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens, non_blocking=True)
        self.input_pos.copy_(input_pos, non_blocking=True)
        self.graph.replay()
        return self.logits


def build_torch_model(
    config: ModelConfig,
    tok_embeddings,
    layers,
    norm,
    output,
    *,
    int4: bool,
    max_batch: int,
    max_seq: int,
    attention: str = "sdpa",
) -> TorchModel:
    """layers: fastinternlm model.Layer objects (dense fp16, or Int4Weight linears when int4)."""
    out = []
    for lw in layers:
        if int4:
            lin = [TinyGemmWeight(w) for w in (lw.wqkv, lw.wo, lw.w13, lw.w2)]
        else:
            lin = [lw.wqkv, lw.wo, lw.w13, lw.w2]
        out.append(TorchLayer(lw.attention_norm, lin[0], lin[1], lw.ffn_norm, lin[2], lin[3]))
    return TorchModel(
        config,
        tok_embeddings,
        out,
        norm,
        output,
        dtype=torch.bfloat16 if int4 else tok_embeddings.dtype,
        max_batch=max_batch,
        max_seq=max_seq,
        attention=attention,
    )


__all__ = [
    "TinyGemmWeight",
    "TorchDecodeGraph",
    "TorchModel",
    "build_torch_model",
    "check_tinygemm",
    "ntk_bases",
    "rope_tables",
    "tinygemm_available",
    "unpack_int4",
]
