"""AWQ and GPTQ 4-bit weights, and our own int4 checkpoints' parts -> Int4Weight (packed
format v1). Placing rows (fusing Llama's q/k/v, stacking gate and up) is layout.py's.

Both formats store, per group of G input channels k of one output channel n, 4-bit
integers q, an integer zero point z and a float16 scale s, and mean
    W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G].
Our format holds w = q' * s' + m' per group of g in (32, 64, 128) channels. Per source
group the import writes one of two exact rewrites,
    A: q' = q,      s' = s,  m' = -z * s
    B: q' = 15 - q, s' = -s, m' = (15 - z) * s
(B is the bitwise NOT of the group's packed words), with m' rounded to float16 once;
B is taken only where its rounding is smaller. A group G > 128 (or a whole row, G = -1)
becomes G / g equal groups of ours.

What is exact (see README "int4 models" and tests/test_awq_gptq.py):
- Every output channel keeps its row; a fused wqkv built from Llama's q/k/v is a pure
  permutation of rows. The integers and scales arrive unchanged up to the flip B.
- The GEMM dequantizes q' * s' + m' in float32, which is exact (11 + 4 significant bits
  plus an 11-bit m' of no lower weight), so the weight it uses is exactly (q - z) * s
  whenever z * s or (15 - z) * s is a float16 number: always for z in {0, 1, 2, 4, 7,
  8, 11, 13, 14, 15} (and GPTQ's 16), which covers GPTQ's symmetric checkpoints (z = 8)
  and most groups of real AWQ checkpoints (z near 7.5); for z in {3, 5, 6, 9, 10, 12}
  whenever s's significand has the trailing zero bits that 3 * s or 5 * s needs.
  There, dequantize_int4(float16) equals the formats' own torch dequantization
  float16((q - z) * s) bit for bit.
- Otherwise the weight is off by the float16 rounding of m' only:
  |w - (q - z) * s| <= 2^-11 * min(z, 15 - z) * |s| <= 6 * 2^-11 * |s| (under 0.3 % of the
  quantization step s, under 0.6 % of the half step that 4-bit rounding itself costs).

Packing, as the formats' writers do it (facts note int4-formats.md):
- AWQ "gemm": qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales float16 [K/G, N];
  nibble i (bits 4i..4i+3) of word c holds output column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i];
  zero points unsigned 0..15.
- GPTQ: qweight int32 [K/8, N], nibble i of row r is input channel 8r + i (so its
  transpose is exactly our qweight); qzeros int32 [K/G, N/8], nibble i of word c is column
  8c + i; scales float16 [K/G, N]; g_idx [K]. The "gptq" format stores z - 1 (so a stored
  15 means z = 16, which is what its kernels compute), "gptq_v2" stores z.
- Act-order (desc_act) checkpoints whose g_idx is not k // G are refused: the int4 GEMM
  reads each group as g consecutive input channels, and honouring a permutation would
  mean gathering the activations per linear (different for q, k and v, so no fused wqkv).
  A g_idx equal to k // G (desc_act=false, or act-order with static groups) loads.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..ops._checks import check_tensor, same_device
from ..ops.int4_gemm import GROUP_SIZES, Int4Weight
from .arch import FASTINTERNLM_INT4
from .quant_config import QuantizationConfig

# AWQ's nibble order: nibble i of a word holds output column 8c + AWQ_ORDER[i] ...
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# ... so column 8c + j is nibble AWQ_UNORDER[j].
AWQ_UNORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [r, c] -> uint8 [r, c, 8], [..., i] = bits 4i..4i+3. The arithmetic right
    shift of negative words copies the sign bit in from the left, which the mask drops."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 15).to(torch.uint8)


def _pack_k(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k] in 0..15 -> our qweight int32 [n, k / 8] (nibble i of word j is
    channel 8j + i). Built in int32 without overflow: bits 0..30 as a non-negative sum,
    then bit 31 (the top nibble's high bit) as -2^31."""
    n, k = q.shape
    q = q.view(n, k // 8, 8).to(torch.int32)
    shifts = torch.arange(0, 28, 4, dtype=torch.int32, device=q.device)
    low = (q[..., :7] << shifts).sum(-1, dtype=torch.int32) + ((q[..., 7] & 7) << 28)
    return torch.where(q[..., 7] >= 8, low + torch.iinfo(torch.int32).min, low).contiguous()


def _our_group(g_source: int) -> int:
    """The largest of our group sizes that divides the source's (so each source group is
    a whole number of ours, each with the same s and m)."""
    for g in sorted(GROUP_SIZES, reverse=True):
        if g_source % g == 0:
            return g
    raise ValueError(f"group size {g_source} is not a multiple of any of {GROUP_SIZES}")


def _finish(qweight: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_source: int) -> Int4Weight:
    """Our Int4Weight from our qweight [n, k/8] (nibbles q), zero points z [n, k/G]
    (integers) and scales s [n, k/G] (float16), meaning (q - z) * s.

    Per source group, one of two exact rewrites of (q - z) * s:
      A: q * s + m,                 m = -z * s
      B: (15 - q) * (-s) + m,       m = (15 - z) * s
    m is rounded to float16 once; a group takes B only where that rounding is smaller
    (B is exact where A is not for z in {7, 11, 13, 14, 15}, A for z in {0, 1, 2, 4, 8}).
    15 - q flips all four bits of every nibble, so B is the bitwise NOT of the group's
    words; q * s, -s and the exact m stay exact in the GEMM's float32 dequantization."""
    g = _our_group(g_source)
    zs = z.to(torch.float64) * s.to(torch.float64)  # exact: 5 + 11 significant bits
    rest = (15 - z).to(torch.float64) * s.to(torch.float64)
    m_a, m_b = (-zs).to(torch.float16), rest.to(torch.float16)
    err_a = (m_a.to(torch.float64) + zs).abs()  # inf where m_a overflowed
    err_b = (m_b.to(torch.float64) - rest).abs()
    flip = err_b < err_a
    m = torch.where(flip, m_b, m_a)
    s = torch.where(flip, -s, s)
    if not bool(torch.isfinite(m).all()):
        raise ValueError(
            "zero point * scale exceeds the float16 range (|z * s| > 65504), which the int4 "
            "format's offsets cannot hold"
        )
    n, words = qweight.shape
    per_group = g_source // 8
    grouped = qweight.view(n, words // per_group, per_group)
    qweight = torch.where(flip.unsqueeze(-1), ~grouped, grouped).reshape(n, words)
    if g != g_source:
        s = s.repeat_interleave(g_source // g, dim=1)
        m = m.repeat_interleave(g_source // g, dim=1)
    return Int4Weight.from_tensors(qweight.contiguous(), s.contiguous(), m.contiguous(), g)


def _group_size(name_k: str, k: int, groups: int) -> int:
    if groups < 1 or k % groups:
        raise ValueError(f"scales must have a row count dividing {name_k} = {k}, got {groups}")
    return k // groups


def awq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Int4Weight:
    """An AWQ "gemm" linear (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales
    float16 [K/G, N]) as an Int4Weight [N, K] on the same device. G = K / scales.shape[0]
    must be a multiple of 32 (G > 128 is split into equal groups of ours)."""
    check_tensor("qweight", qweight, dtypes=(torch.int32,), ndim=2)
    check_tensor("qzeros", qzeros, dtypes=(torch.int32,), ndim=2)
    check_tensor("scales", scales, dtypes=(torch.float16,), ndim=2)
    same_device(qweight=qweight, qzeros=qzeros, scales=scales)
    k, n = qweight.shape[0], 8 * qweight.shape[1]
    g = _group_size("qweight.shape[0]", k, scales.shape[0])
    check_tensor("scales", scales, shape=(k // g, n))
    check_tensor("qzeros", qzeros, shape=(k // g, n // 8))
    unorder = torch.tensor(AWQ_UNORDER, device=qweight.device)
    q = _nibbles(qweight).index_select(-1, unorder).reshape(k, n)
    z = _nibbles(qzeros).index_select(-1, unorder).reshape(k // g, n)
    return _finish(_pack_k(q.t().contiguous()), z.t(), scales.t(), g)


def gptq_to_int4(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor] = None,
    zero_offset: int = 1,
) -> Int4Weight:
    """A GPTQ linear (qweight int32 [K/8, N], qzeros int32 [K/G, N/8], scales float16
    [K/G, N], optional g_idx [K]) as an Int4Weight [N, K]. zero_offset is added to the
    stored zero points: 1 for the "gptq" format, 0 for "gptq_v2". g_idx, when given, must
    be k // G (act-order permutations are refused)."""
    check_tensor("qweight", qweight, dtypes=(torch.int32,), ndim=2)
    check_tensor("qzeros", qzeros, dtypes=(torch.int32,), ndim=2)
    check_tensor("scales", scales, dtypes=(torch.float16,), ndim=2)
    same_device(qweight=qweight, qzeros=qzeros, scales=scales)
    if zero_offset not in (0, 1):
        raise ValueError(f"zero_offset must be 0 or 1, got {zero_offset!r}")
    k, n = 8 * qweight.shape[0], qweight.shape[1]
    g = _group_size("8 * qweight.shape[0]", k, scales.shape[0])
    check_tensor("scales", scales, shape=(k // g, n))
    check_tensor("qzeros", qzeros, shape=(k // g, n // 8))
    if g_idx is not None:
        check_tensor("g_idx", g_idx, dtypes=(torch.int32, torch.int64), shape=(k,))
        same_device(qweight=qweight, g_idx=g_idx)
        trivial = torch.arange(k, device=g_idx.device) // g
        if not torch.equal(g_idx.to(torch.int64), trivial):
            raise ValueError(
                f"g_idx is not k // group_size ({g}): this is an act-order (desc_act=true) checkpoint whose "
                f"input channels are permuted across groups, which the int4 format (groups of consecutive "
                f"channels) cannot hold; re-quantize with desc_act=false (or static_groups=true), or load "
                f"the unquantized model with quant='int4'"
            )
    z = _nibbles(qzeros).reshape(k // g, n).to(torch.int32) + zero_offset
    # Nibble i of GPTQ's row r is channel 8r + i of column n: the transpose is our layout.
    return _finish(qweight.t().contiguous(), z.t(), scales.t(), g)


def import_linear(q: QuantizationConfig, name: str, parts: Dict[str, torch.Tensor], n: int, k: int) -> Int4Weight:
    """One quantized linear of a checkpoint (its parts by name, on the target device) as
    an Int4Weight [n, k]; errors name the linear."""
    try:
        if q.method == FASTINTERNLM_INT4:
            w = Int4Weight.from_state_dict(parts)
            if w.group_size != q.group_size:
                raise ValueError(f"int4_format records group_size {w.group_size}, config.json says {q.group_size}")
        elif q.method == "awq":
            w = awq_to_int4(parts["qweight"], parts["qzeros"], parts["scales"])
        elif q.method == "gptq":
            w = gptq_to_int4(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), q.zero_offset)
        else:
            raise ValueError(f"unknown quantization method {q.method!r}")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None
    if (w.n, w.k) != (n, k):
        raise ValueError(f"{name}: holds a [{w.n}, {w.k}] weight, expected [{n}, {k}]")
    return w


__all__ = ["AWQ_ORDER", "awq_to_int4", "gptq_to_int4", "import_linear"]
