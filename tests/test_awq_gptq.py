"""AWQ and GPTQ 4-bit weights imported into Int4Weight: tensors built here from known
integers by the formats' published packing rules (written in this file, independently
of fastinternlm.int4_import), then checked nibble by nibble, scale by scale, and as
whole tiny checkpoints (InternLM2 and Llama layouts, safetensors and .bin) against the
same models loaded from the dequantized float weights.

What "without loss" means here, precisely (see int4_import.py): per group, either
(q, s, m = -z s) or (15 - q, -s, m = (15 - z) s), whichever rounds m to float16 less.
- Where z * s or (15 - z) * s is a float16 number (always for z in {0, 1, 2, 4, 7, 8, 11,
  13, 14, 15, 16}; GPTQ symmetric is z = 8) the weights the GEMM uses are exactly
  (q - z) * s, and dequantize_int4(float16) equals the formats' own torch dequantization
  float16((q - z) * s) bit for bit.
- Otherwise each weight is within 2^-11 min(z, 15 - z) |s| of (q - z) * s.
"""

import json
import math
import random
import shutil

import pytest
import torch

from conftest import UNIT_ROUNDOFF
import fastinternlm
from fastinternlm.config import ConfigError
from fastinternlm.weights import files as files_module
from fastinternlm.weights.files import CheckpointError
from fastinternlm.weights.hf import load_checkpoint
from fastinternlm.weights.int4_import import awq_to_int4, gptq_to_int4
from fastinternlm.weights.layout import concat_rows
from fastinternlm.ops import Int4Weight, dequantize_int4
from model_fixtures import (
    TinyCheckpoint,
    _write_weights,
    hf_llama_reference,
    reference_forward,
    write_tiny_internlm2,
    write_tiny_llama,
)

U16 = UNIT_ROUNDOFF[torch.float16]
FP16_TINY = 2.0**-25  # half the smallest float16 subnormal: the absolute rounding floor

# ---- the formats' packing rules, written from the facts note ------------------------------

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of word c holds column 8c + AWQ_PACK_ORDER[i]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[R, N] integers 0..15 -> int32 [R, N/8], AWQ's interleaved column order."""
    r, n = values.shape
    v = values.to(torch.int64)
    words = torch.zeros(r, n // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_PACK_ORDER):
        words |= v[:, col::8] << (4 * i)
    return _to_int32(words)


def pack_gptq_qweight(q: torch.Tensor) -> torch.Tensor:
    """q [K, N] -> int32 [K/8, N]: nibble i of row r is input channel 8r + i."""
    k, n = q.shape
    v = q.to(torch.int64)
    words = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(8):
        words |= v[i::8, :] << (4 * i)
    return _to_int32(words)


def pack_gptq_zeros(stored: torch.Tensor) -> torch.Tensor:
    """stored zero points [K/G, N] (0..15) -> int32 [K/G, N/8], nibble i of word c is column 8c + i."""
    r, n = stored.shape
    v = stored.to(torch.int64)
    words = torch.zeros(r, n // 8, dtype=torch.int64)
    for i in range(8):
        words |= v[:, i::8] << (4 * i)
    return _to_int32(words)


def our_nibbles(qw: Int4Weight) -> torch.Tensor:
    """Our format read back: int64 [n, k], nibble i of word j of row r is W[r, 8j + i]."""
    words = qw.qweight.cpu().to(torch.int64)
    out = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
    for i in range(8):
        out[:, i::8] = (words >> (4 * i)) & 15
    return out


def expected_import(q, z, s, g):
    """The documented import of (q - z) * s, decided here in float64: per group, B =
    (15 - q, -s, float16((15 - z) s)) where its offset rounds strictly less than A's =
    (q, s, float16(-z s)). Returns the nibbles [n, k], scales, offsets [n, k/g] and the
    weights' exact float64 values q' s' + m'."""
    zs, rest = z.double() * s.double(), (15 - z).double() * s.double()
    m_a, m_b = (-zs).to(torch.float16), rest.to(torch.float16)
    flip = (m_b.double() - rest).abs() < (m_a.double() + zs).abs()
    flip_k = flip.repeat_interleave(g, 1)
    nibbles = torch.where(flip_k, 15 - q, q)
    scales = torch.where(flip, -s, s)
    offsets = torch.where(flip, m_b, m_a)
    values = nibbles.double() * scales.double().repeat_interleave(g, 1) + offsets.double().repeat_interleave(g, 1)
    return nibbles, scales, offsets, values


def exact_z(z):
    """Zero points for which z * s or (15 - z) * s is a float16 number for every s."""
    return sum(z == v for v in (0, 1, 2, 4, 7, 8, 11, 13, 14, 15, 16)).bool()


def random_scales(*shape) -> torch.Tensor:
    """Positive float16 scales of realistic size, every significand pattern."""
    return (torch.rand(*shape, dtype=torch.float64) * 0.05 + 1e-3).to(torch.float16)


def sizes(group):
    """Odd multiples of 8 outputs; 2..4 groups of inputs (group -1: one group per row)."""
    n = 8 * (2 * random.randint(1, 12) + 1)
    if group == -1:
        k = 32 * (2 * random.randint(1, 6) + 1)
        return n, k, k
    return n, group * random.randint(2, 4), group


def expected_group(group_source):
    return next(g for g in (128, 64, 32) if group_source % g == 0)


# ---- AWQ, tensor level ----------------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 64, 128, 256, -1])
def test_awq_import_keeps_every_bit(device, group):
    n, k, g = sizes(group)
    q = torch.randint(0, 16, (n, k))  # W[n, k]'s integers
    z = torch.randint(0, 16, (n, k // g))
    s = random_scales(n, k // g)
    qw = awq_to_int4(pack_awq(q.T).to(device), pack_awq(z.T).to(device), s.T.contiguous().to(device))
    ours = expected_group(g)
    assert isinstance(qw, Int4Weight) and qw.device == device
    assert (qw.n, qw.k, qw.group_size) == (n, k, ours)
    nibbles, scales, offsets, values = expected_import(q, z, s, g)
    assert torch.equal(our_nibbles(qw), nibbles)
    assert torch.equal(qw.scales.cpu(), scales.repeat_interleave(g // ours, dim=1))
    assert torch.equal(qw.offsets.cpu(), offsets.repeat_interleave(g // ours, dim=1))
    # The GEMM's weights: q' s' + m' exactly (float32 holds it), within 2^-11 min(z, 15 - z) |s|
    # of (q - z) s, and equal to it for the zero points where an offset is always exact.
    deq = dequantize_int4(qw, torch.float32).cpu().double()
    assert torch.equal(deq, values)
    s_full = s.double().repeat_interleave(g, dim=1)
    z_full = z.repeat_interleave(g, dim=1)
    exact = (q.double() - z_full) * s_full
    near = torch.minimum(z_full, 15 - z_full).double() * s_full
    assert bool(((deq - exact).abs() <= U16 * near + FP16_TINY).all())
    assert torch.equal(deq[exact_z(z_full)], exact[exact_z(z_full)])


def test_awq_exact_zero_points_are_bitwise(device):
    """z in {0, 1, 2, 4, 7, 8, 11, 13, 14, 15}: z * s or (15 - z) * s is a float16 number,
    so the import is exact, and the float16 dequantization equals AutoAWQ's torch
    reference bit for bit."""
    n, k, g = 8 * 9, 128 * 3, 128
    q = torch.randint(0, 16, (n, k))
    choices = torch.tensor([0, 1, 2, 4, 7, 8, 11, 13, 14, 15])
    z = choices[torch.randint(0, len(choices), (n, k // g))]
    s = random_scales(n, k // g)
    qw = awq_to_int4(pack_awq(q.T).to(device), pack_awq(z.T).to(device), s.T.contiguous().to(device))
    exact = (q.double() - z.double().repeat_interleave(g, 1)) * s.double().repeat_interleave(g, 1)
    assert torch.equal(dequantize_int4(qw, torch.float32).cpu().double(), exact)
    # AutoAWQ's dequantize_gemm: (iweight - izeros) * scales, an int tensor times float16.
    reference = (q.to(torch.int32) - z.repeat_interleave(g, 1).to(torch.int32)) * s.repeat_interleave(g, 1)
    assert reference.dtype == torch.float16
    assert torch.equal(dequantize_int4(qw, torch.float16).cpu(), reference)


def test_awq_general_zero_points_measured(device, capsys):
    """Every zero point: report how often float16 dequantization differs from AutoAWQ's
    torch reference and by how much (in units of s), and hold the documented bound."""
    n, k, g = 8 * 33, 128 * 4, 128
    q = torch.randint(0, 16, (n, k))
    z = torch.randint(0, 16, (n, k // g))
    s = random_scales(n, k // g)
    qw = awq_to_int4(pack_awq(q.T).to(device), pack_awq(z.T).to(device), s.T.contiguous().to(device))
    s_full = s.double().repeat_interleave(g, 1)
    z_full = z.repeat_interleave(g, 1)
    reference = ((q - z_full).to(torch.int32) * s.repeat_interleave(g, 1)).double()
    ours = dequantize_int4(qw, torch.float16).cpu().double()
    diff = (ours - reference).abs() / s_full
    exact32 = dequantize_int4(qw, torch.float32).cpu().double() == (q - z_full).double() * s_full
    with capsys.disabled():
        print(
            f"\nAWQ z uniform in 0..15, random scales: {exact32.double().mean().item():.2%} of weights exact "
            f"in float32; float16 dequantization vs (q - z) * s in float16: {(diff > 0).double().mean().item():.2%} "
            f"differ, by at most {diff.max().item():.4f} s"
        )
    # Ours: one rounding of m (<= 2^-11 min(z, 15 - z) |s|) and one of the sum; the
    # reference: one of the product. Each rounding to float16 is <= u16 * |value|.
    near = torch.minimum(z_full, 15 - z_full).double() * s_full
    bound = U16 * near + U16 * (ours.abs() + reference.abs()) + 2 * FP16_TINY
    assert bool(((ours - reference).abs() <= bound).all())
    assert torch.equal(ours[exact_z(z_full)], reference[exact_z(z_full)])


# ---- GPTQ, tensor level ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_gptq_symmetric_is_exact(device, fmt, group):
    """sym=true stores zero point 7 ("gptq": z - 1) or 8 ("gptq_v2"): z = 8, m = -8 s exact."""
    n, k, g = sizes(group)
    q = torch.randint(0, 16, (n, k))
    s = random_scales(n, k // g)
    stored = torch.full((k // g, n), 7 if fmt == "gptq" else 8)
    g_idx = (torch.arange(k) // g).to(torch.int32)
    qweight = pack_gptq_qweight(q.T)
    qw = gptq_to_int4(
        qweight.to(device),
        pack_gptq_zeros(stored).to(device),
        s.T.contiguous().to(device),
        g_idx.to(device),
        zero_offset=1 if fmt == "gptq" else 0,
    )
    ours = expected_group(g)
    assert (qw.n, qw.k, qw.group_size) == (n, k, ours)
    assert torch.equal(qw.qweight.cpu(), qweight.T)  # GPTQ's words, transposed, unchanged
    assert torch.equal(our_nibbles(qw), q)
    assert torch.equal(qw.scales.cpu(), s.repeat_interleave(g // ours, 1))
    exact = (q.double() - 8) * s.double().repeat_interleave(g, 1)
    assert torch.equal(dequantize_int4(qw, torch.float32).cpu().double(), exact)
    # AutoGPTQ's torch dequantization: scales * (weight - (zeros + 1)), in float16.
    reference = s.repeat_interleave(g, 1) * (q.to(torch.int32) - (torch.tensor(7, dtype=torch.int32) + 1))
    assert torch.equal(dequantize_int4(qw, torch.float16).cpu(), reference)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_asymmetric(device, fmt):
    """Any zero point, including "gptq"'s z = 0, which it stores as -1 = nibble 15 and its
    kernels read back as z = 16: the import reproduces what the kernels compute."""
    n, k, g = 8 * 11, 64 * 3, 64
    q = torch.randint(0, 16, (n, k))
    z = torch.randint(0, 16, (n, k // g))
    z[0, 0] = 0
    s = random_scales(n, k // g)
    stored = ((z - 1) & 15) if fmt == "gptq" else z
    qw = gptq_to_int4(
        pack_gptq_qweight(q.T).to(device),
        pack_gptq_zeros(stored.T).to(device),
        s.T.contiguous().to(device),
        None,
        zero_offset=1 if fmt == "gptq" else 0,
    )
    z_eff = stored + 1 if fmt == "gptq" else z  # what the format's kernels use
    assert fmt == "gptq_v2" or z_eff[0, 0] == 16
    nibbles, scales, offsets, values = expected_import(q, z_eff, s, g)
    assert torch.equal(our_nibbles(qw), nibbles)
    assert torch.equal(qw.scales.cpu(), scales) and torch.equal(qw.offsets.cpu(), offsets)
    deq = dequantize_int4(qw, torch.float32).cpu().double()
    assert torch.equal(deq, values)
    z_full, s_full = z_eff.repeat_interleave(g, 1), s.double().repeat_interleave(g, 1)
    exact = (q - z_full).double() * s_full
    near = torch.minimum(z_full, (15 - z_full).abs()).double() * s_full
    assert bool(((deq - exact).abs() <= U16 * near + FP16_TINY).all())
    assert torch.equal(deq[exact_z(z_full)], exact[exact_z(z_full)])


def test_gptq_g_idx(device):
    n, k, g = 8 * 5, 32 * 6, 32
    q = torch.randint(0, 16, (n, k))
    s = random_scales(n, k // g)
    parts = [
        pack_gptq_qweight(q.T).to(device),
        pack_gptq_zeros(torch.full((k // g, n), 7)).to(device),
        s.T.contiguous().to(device),
    ]
    trivial = torch.arange(k) // g
    a = gptq_to_int4(*parts, trivial.to(torch.int64).to(device))  # int64 g_idx is fine too
    b = gptq_to_int4(*parts, None)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.offsets, b.offsets)
    # Act-order: channel k belongs to group perm_inverse[k] // g, not k // g.
    perm = torch.randperm(k)
    act_order = (torch.argsort(perm) // g).to(torch.int32)
    assert not torch.equal(act_order.long(), trivial)
    with pytest.raises(ValueError, match=r"g_idx is not k // group_size \(32\): this is an act-order"):
        gptq_to_int4(*parts, act_order.to(device))


def test_import_bad_inputs(device):
    n, k, g = 16, 64, 32
    qweight = torch.zeros(k, n // 8, dtype=torch.int32, device=device)
    qzeros = torch.zeros(k // g, n // 8, dtype=torch.int32, device=device)
    scales = torch.ones(k // g, n, dtype=torch.float16, device=device)
    with pytest.raises(TypeError, match="scales must have dtype float16, got float32"):
        awq_to_int4(qweight, qzeros, scales.float())
    with pytest.raises(TypeError, match="qzeros must have dtype int32"):
        awq_to_int4(qweight, qzeros.to(torch.int64), scales)
    with pytest.raises(ValueError, match=r"qzeros must have shape \(2, 2\), got \(3, 2\)"):
        awq_to_int4(qweight, torch.zeros(3, 2, dtype=torch.int32, device=device), scales)
    with pytest.raises(ValueError, match=r"scales must have a row count dividing qweight.shape\[0\] = 64, got 3"):
        awq_to_int4(qweight, qzeros, torch.ones(3, n, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"group size 16 is not a multiple of any of \(32, 64, 128\)"):
        awq_to_int4(
            torch.zeros(16, 2, dtype=torch.int32, device=device),
            torch.zeros(1, 2, dtype=torch.int32, device=device),
            torch.ones(1, 16, dtype=torch.float16, device=device),
        )
    with pytest.raises(ValueError, match=f"scales must be on {device.type}"):
        awq_to_int4(qweight, qzeros, scales.to("meta"))
    with pytest.raises(ValueError, match="qweight must be contiguous"):
        gptq_to_int4(torch.zeros(n, k // 8, dtype=torch.int32, device=device).T, qzeros, scales)
    with pytest.raises(ValueError, match="zero_offset must be 0 or 1"):
        gptq_to_int4(torch.zeros(k // 8, n, dtype=torch.int32, device=device), qzeros, scales, zero_offset=2)
    with pytest.raises(ValueError, match="exceeds the float16 range"):
        gptq_to_int4(
            torch.zeros(k // 8, n, dtype=torch.int32, device=device),
            qzeros + 0x77777777,
            torch.full((k // g, n), 20000.0, dtype=torch.float16, device=device),
        )


def test_concat_rows(device):
    a = awq_to_int4(
        pack_awq(torch.randint(0, 16, (64, 16))).to(device),
        pack_awq(torch.randint(0, 16, (2, 16))).to(device),
        random_scales(2, 16).to(device),
    )
    b = awq_to_int4(
        pack_awq(torch.randint(0, 16, (64, 24))).to(device),
        pack_awq(torch.randint(0, 16, (2, 24))).to(device),
        random_scales(2, 24).to(device),
    )
    c = concat_rows(a, b)
    assert (c.n, c.k, c.group_size) == (40, 64, 32)
    assert torch.equal(
        dequantize_int4(c, torch.float32),
        torch.cat([dequantize_int4(a, torch.float32), dequantize_int4(b, torch.float32)]),
    )
    other = awq_to_int4(
        pack_awq(torch.randint(0, 16, (128, 8))).to(device),
        pack_awq(torch.randint(0, 16, (2, 8))).to(device),
        random_scales(2, 8).to(device),
    )
    with pytest.raises(ValueError, match="k, group_size and device must agree"):
        concat_rows(a, other)
    with pytest.raises(TypeError, match="Int4Weight"):
        concat_rows(a, torch.zeros(3))


# ---- whole checkpoints -------------------------------------------------------------------------

LINEAR_SUFFIXES = (
    "attention.wqkv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w3",
    "feed_forward.w2",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
FFN = 256  # the tiny models' ffn, a multiple of 128 so w2's input splits into whole groups


def decoder_linear(name: str):
    """The module name if `name` is a decoder layer's linear weight, else None."""
    if name.startswith("model.layers.") and name.endswith(".weight"):
        module = name[: -len(".weight")]
        if module.endswith(LINEAR_SUFFIXES):
            return module
    return None


def rtn(w: torch.Tensor, g: int, symmetric: bool):
    """Round-to-nearest with integer zero points, per group of g inputs of each output row:
    asymmetric z = round(-min / s), s = (max - min) / 15; symmetric z = 8, s = max|w| / 7.
    Returns q [n, k], z [n, k/g], s float16 [n, k/g]."""
    n, k = w.shape
    grp = w.double().reshape(n, k // g, g)
    if symmetric:
        s = (grp.abs().amax(-1) / 7).to(torch.float16)
        z = torch.full((n, k // g), 8, dtype=torch.int64)
    else:
        lo, hi = grp.amin(-1), grp.amax(-1)
        s = ((hi - lo) / 15).to(torch.float16)
        z = torch.round(-lo / s.double()).clamp(0, 15).to(torch.int64)
    q = (torch.round(grp / s.double().unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, 15).to(torch.int64)
    return q.reshape(n, k), z, s


def write_quantized(
    directory,
    base: TinyCheckpoint,
    method: str,
    group: int,
    *,
    fmt="safetensors",
    shards=2,
    symmetric=False,
    gptq_format="gptq",
    config_in_quantize_config=False,
):
    """A 4-bit checkpoint of the model `base` (quantized here with rtn, packed by the rules
    above), plus the two dense models it stands for, as {name: float64 tensor}:
    `exact` = (q - z) * s and `ours` = the documented import's q' s' + m' per linear."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(base.path / f, directory / f)
    tensors, exact, ours = {}, {}, {}
    for name, t in base.tensors.items():
        module = decoder_linear(name)
        if module is None:
            tensors[name] = t.to(torch.float16)  # embeddings, norms and the head stay float16
            continue
        n, k = t.shape
        gk = k if group == -1 else group
        q, z, s = rtn(t, gk, symmetric)
        if method == "awq":
            tensors[module + ".qweight"] = pack_awq(q.T)
            tensors[module + ".qzeros"] = pack_awq(z.T)
        else:
            tensors[module + ".qweight"] = pack_gptq_qweight(q.T)
            stored = ((z - 1) & 15) if gptq_format == "gptq" else z
            tensors[module + ".qzeros"] = pack_gptq_zeros(stored.T)
            tensors[module + ".g_idx"] = (torch.arange(k) // gk).to(torch.int32)
        tensors[module + ".scales"] = s.T.contiguous()
        s_full, z_full = s.double().repeat_interleave(gk, 1), z.double().repeat_interleave(gk, 1)
        exact[name] = (q.double() - z_full) * s_full
        ours[name] = expected_import(q, z, s, gk)[3]
    config = dict(base.config, torch_dtype="float16")
    if method == "awq":
        qc = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group, "zero_point": True}
    else:
        qc = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group,
            "desc_act": False,
            "sym": symmetric,
            "checkpoint_format": gptq_format,
        }
    if config_in_quantize_config:  # AutoGPTQ's own file; config.json says nothing
        qc.pop("quant_method")
        (directory / "quantize_config.json").write_text(json.dumps(qc))
    else:
        config["quantization_config"] = qc
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    _write_weights(directory, tensors, shards, fmt)
    return tensors, exact, ours


def write_dense(directory, base: TinyCheckpoint, linears: dict):
    """The same checkpoint as write_quantized's, with the linears given as float32 (exact
    for both dense stand-ins: at most 16 significant bits)."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(base.path / f, directory / f)
    tensors = {
        name: (linears[name].to(torch.float32) if name in linears else t.to(torch.float16))
        for name, t in base.tensors.items()
    }
    for name, t in linears.items():
        assert torch.equal(tensors[name].double(), t), name
    (directory / "config.json").write_text(json.dumps(dict(base.config, torch_dtype="float16"), indent=2))
    _write_weights(directory, tensors, 1, "safetensors")
    internlm2 = {n: t.double() for n, t in tensors.items()}
    return TinyCheckpoint(directory, base.config, tensors, internlm2, base.tokenizer)


def activation_dtype(device):
    return torch.float32 if device.type == "cpu" else torch.float16


def load(path, device, **kw):
    return fastinternlm.load(path, device=device, dtype=activation_dtype(device), max_seq_len=96, progress=False, **kw)


def random_ids(ck, n):
    return torch.randint(3, ck.tokenizer.vocab_size - 6, (n,)).tolist()


def assert_logits_like_hf(ours, dense_ck, ids, dtype):
    """Our int4 logits against the float64 forward of the dense model with the very same
    weights: no more than twice the error HF transformers makes in the same dtype (as
    test_model's oracle), plus one rounding of the logits as a floor."""
    ref = reference_forward(dense_ck, ids)
    with torch.no_grad():
        hf = hf_llama_reference(dense_ck, dtype)(torch.tensor([ids])).logits[0].double()
    err = (ours.double().cpu() - ref).abs().max().item()
    err_hf = (hf - ref).abs().max().item()
    floor = UNIT_ROUNDOFF[dtype] * ref.abs().mean().item()
    assert err <= 2 * err_hf + floor, f"int4 {err:.3e} vs HF {err_hf:.3e} (floor {floor:.1e})"


@pytest.fixture(scope="module")
def base_internlm2(tmp_path_factory):
    return write_tiny_internlm2(tmp_path_factory.mktemp("fp"), dtype=torch.float32, ffn=FFN, seed=11)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("group", [64, 128])
def test_internlm2_awq_checkpoint(device, tmp_path, base_internlm2, fmt, group):
    """lmdeploy's auto_awq output for InternLM2 (fused wqkv, kept fused), as safetensors
    and as the official 4-bit repo's pytorch_model-*.bin shards."""
    _, _, ours = write_quantized(tmp_path / "awq", base_internlm2, "awq", group, fmt=fmt)
    llm = load(tmp_path / "awq", device)
    for layer in llm.model.layers:
        for w in (layer.wqkv, layer.wo, layer.w13, layer.w2):
            assert isinstance(w, Int4Weight) and w.group_size == group
    assert isinstance(llm.model.output, torch.Tensor)  # AWQ leaves the head in float16
    # Every weight the GEMM uses is q * s + m: compare with the dense model of those weights.
    _, weights = load_checkpoint(tmp_path / "awq", device, torch.float32, progress=False)
    for i, lw in enumerate(weights.layers):
        p = f"model.layers.{i}."
        for field, suffixes in (
            ("wqkv", ["attention.wqkv"]),
            ("wo", ["attention.wo"]),
            ("w13", ["feed_forward.w1", "feed_forward.w3"]),
            ("w2", ["feed_forward.w2"]),
        ):
            got = dequantize_int4(getattr(lw, field), torch.float32).cpu().double()
            assert torch.equal(got, torch.cat([ours[p + suffix + ".weight"] for suffix in suffixes])), (i, field)
    dense = write_dense(tmp_path / "dense", base_internlm2, ours)
    ids = random_ids(base_internlm2, 24)
    assert_logits_like_hf(llm.logits(ids), dense, ids, activation_dtype(device))


def test_awq_m_rounding_effect_on_logits(tmp_path, base_internlm2, capsys):
    """The one inexact step, m = float16(-z s), measured on the logits in float64 (the
    model of exact (q - z) s vs the model of our q s + m), held to the first-order
    estimate sqrt(linears on a path) * (RMS of the weight change / RMS of the weights)."""
    _, exact, ours = write_quantized(tmp_path / "awq", base_internlm2, "awq", 128)
    ck_exact = write_dense(tmp_path / "exact", base_internlm2, exact)
    ck_ours = write_dense(tmp_path / "ours", base_internlm2, ours)
    ids = random_ids(base_internlm2, 24)
    a, b = reference_forward(ck_exact, ids), reference_forward(ck_ours, ids)
    rel = ((a - b).pow(2).mean() / a.pow(2).mean()).sqrt().item()
    rho = math.sqrt(
        sum((ours[n] - exact[n]).pow(2).sum().item() for n in exact) / sum(exact[n].pow(2).sum().item() for n in exact)
    )
    layers = base_internlm2.config["num_hidden_layers"]
    same = sum((ours[n] == exact[n]).sum().item() for n in exact) / sum(exact[n].numel() for n in exact)
    with capsys.disabled():
        print(
            f"\nAWQ import of RTN weights: {same:.1%} of weights exact; the rest changes the weights by "
            f"{rho:.2e} (relative RMS), the logits by {rel:.2e}"
        )
    assert 0 < rel <= math.sqrt(4 * layers) * rho


def test_llama_awq_fuses_qkv_rows(device, tmp_path):
    """AutoAWQ on a Llama-layout model quantizes q_proj, k_proj, v_proj separately; their
    rows land in the fused wqkv exactly where the InternLM2 checkpoint of the same model
    has them (rows are output channels; groups run along the inputs, so RTN per row of
    the split equals RTN of the fused rows)."""
    llama = write_tiny_llama(tmp_path / "fp_llama", dtype=torch.float32, ffn=FFN, seed=5)
    internlm2 = write_tiny_internlm2(tmp_path / "fp_internlm2", dtype=torch.float32, ffn=FFN, seed=5)
    write_quantized(tmp_path / "a", llama, "awq", 128, shards=3)
    write_quantized(tmp_path / "b", internlm2, "awq", 128)
    dtype = activation_dtype(device)
    _, wa = load_checkpoint(tmp_path / "a", device, dtype, progress=False)
    _, wb = load_checkpoint(tmp_path / "b", device, dtype, progress=False)
    for la, lb in zip(wa.layers, wb.layers):
        for field in ("wqkv", "wo", "w13", "w2"):
            x, y = getattr(la, field), getattr(lb, field)
            assert isinstance(x, Int4Weight)
            assert torch.equal(x.qweight, y.qweight) and torch.equal(x.scales, y.scales)
            assert torch.equal(x.offsets, y.offsets)
    ids = random_ids(llama, 20)
    assert torch.equal(load(tmp_path / "a", device).logits(ids), load(tmp_path / "b", device).logits(ids))


@pytest.mark.parametrize(
    "symmetric,gptq_format,quantize_config",
    [(True, "gptq", False), (False, "gptq", False), (False, "gptq_v2", False), (True, "gptq", True)],
)
def test_gptq_checkpoint(device, tmp_path, symmetric, gptq_format, quantize_config):
    """AutoGPTQ / GPTQModel output on a Llama-layout model (g_idx = k // g); symmetric
    checkpoints import exactly: the int4 model IS the dense (q - 8) s model."""
    base = write_tiny_llama(tmp_path / "fp", dtype=torch.float32, ffn=FFN, seed=3)
    _, exact, ours = write_quantized(
        tmp_path / "gptq",
        base,
        "gptq",
        128,
        symmetric=symmetric,
        gptq_format=gptq_format,
        config_in_quantize_config=quantize_config,
    )
    if symmetric:
        assert all(torch.equal(exact[n], ours[n]) for n in exact)
    llm = load(tmp_path / "gptq", device)
    assert all(isinstance(layer.wqkv, Int4Weight) for layer in llm.model.layers)
    ref_llm = load(write_dense(tmp_path / "dense", base, ours).path, device)
    ids = random_ids(base, 20)
    ours_logits, dense_logits = llm.logits(ids), ref_llm.logits(ids)
    # Same weights, different GEMMs (int4 dequantized in float32 vs dense): they differ by
    # accumulation order only; bound both against HF on the same weights via the fused copy.
    internlm2 = write_tiny_internlm2(tmp_path / "fp_i", dtype=torch.float32, ffn=FFN, seed=3)
    _, _, ours_i = write_quantized(
        tmp_path / "gptq_i", internlm2, "gptq", 128, symmetric=symmetric, gptq_format=gptq_format
    )
    dense_i = write_dense(tmp_path / "dense_i", internlm2, ours_i)
    assert_logits_like_hf(ours_logits, dense_i, ids, activation_dtype(device))
    assert_logits_like_hf(dense_logits, dense_i, ids, activation_dtype(device))


def test_pre_quantized_refuses_quant_at_load(tmp_path, base_internlm2):
    write_quantized(tmp_path, base_internlm2, "awq", 128)
    with pytest.raises(
        ValueError, match="is already quantized .quantization_config.quant_method 'awq'.; load it with quant=None"
    ):
        fastinternlm.load(tmp_path, device="cpu", quant="int4", progress=False)


# ---- validation before any data is read -------------------------------------------------------


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def refuse(handle, name):
        raise AssertionError(f"tensor data of {name} was read before validation finished")

    monkeypatch.setattr(files_module, "read_tensor", refuse)


def _edit(path, mutate):
    from safetensors.torch import load_file, save_file

    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        mutate(tensors)
        save_file(tensors, file)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda t: t.pop("model.layers.1.attention.wo.qzeros", None),
            r"missing tensor\(s\) model\.layers\.1\.attention\.wo\.qzeros",
        ),
        (
            lambda t: (
                t.update({"model.layers.0.feed_forward.w2.scales": torch.ones(2, 384)})
                if "model.layers.0.feed_forward.w2.scales" in t
                else None
            ),
            r"tensor model\.layers\.0\.feed_forward\.w2\.scales has dtype F32, expected float16",
        ),
        (
            lambda t: (
                t.update({"model.layers.0.attention.wqkv.qweight": torch.zeros(384, 81, dtype=torch.int32)})
                if "model.layers.0.attention.wqkv.qweight" in t
                else None
            ),
            r"tensor model\.layers\.0\.attention\.wqkv\.qweight has shape \(384, 81\), expected \(384, 80\)",
        ),
        (
            lambda t: (
                t.update({"model.layers.0.attention.wo.weight": torch.zeros(384, 384)})
                if "model.layers.0.attention.wo.qweight" in t
                else None
            ),
            r"unexpected tensor\(s\) model\.layers\.0\.attention\.wo\.weight",
        ),
    ],
)
def test_bad_awq_tensors_fail_before_reading(tmp_path, base_internlm2, no_tensor_reads, mutate, message):
    write_quantized(tmp_path, base_internlm2, "awq", 128)
    _edit(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path, progress=False)


def test_qweight_without_quantization_config_is_explained(tmp_path, base_internlm2, no_tensor_reads):
    write_quantized(tmp_path, base_internlm2, "awq", 128)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match="tensors named .*qweight belong to a quantized checkpoint, but config.json has no quantization_config",
    ):
        load_checkpoint(tmp_path, progress=False)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"bits": 8}, r"quantization_config.bits must be 4 .the int4 GEMM's width. for awq, got 8"),
        ({"version": "gemv"}, r"quantization_config.version 'gemv' is not supported"),
        ({"zero_point": False}, r"zero_point=false .symmetric AWQ without qzeros. is not supported"),
        ({"group_size": 48}, r"group_size 48 is not supported: it must be a multiple of 32"),
        (
            {"group_size": 256},
            r"group_size 256 does not divide hidden_size \(384\), the input size of "
            r"model\.layers\.0\.attention\.wqkv",
        ),
        ({"quant_method": "exl2"}, r"quant_method 'exl2' is not supported; supported: fastinternlm-int4, awq, gptq"),
        ({"backend": "llm-awq"}, r"backend 'llm-awq' is not supported"),
    ],
)
def test_bad_awq_config(tmp_path, base_internlm2, no_tensor_reads, change, message):
    write_quantized(tmp_path, base_internlm2, "awq", 128)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_checkpoint(tmp_path, progress=False)


def test_bad_gptq_config(tmp_path, base_internlm2, no_tensor_reads):
    write_quantized(tmp_path, base_internlm2, "gptq", 128)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "marlin"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="checkpoint_format 'marlin' is not supported"):
        load_checkpoint(tmp_path, progress=False)


def test_gptq_act_order_refused_before_weights(tmp_path, base_internlm2, monkeypatch):
    """desc_act=true with a real permutation: only the g_idx tensors are read, then a
    clear refusal."""
    write_quantized(tmp_path, base_internlm2, "gptq", 128)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    name = "model.layers.1.feed_forward.w2.g_idx"
    perm = torch.randperm(FFN)
    _edit(tmp_path, lambda t: t.update({name: (torch.argsort(perm) // 128).to(torch.int32)}) if name in t else None)
    read = []
    real = files_module.read_tensor
    monkeypatch.setattr(files_module, "read_tensor", lambda h, n: (read.append(n), real(h, n))[1])
    with pytest.raises(
        CheckpointError,
        match=r"model\.layers\.1\.feed_forward\.w2\.g_idx is not k // group_size "
        r"\(128\): an act-order .desc_act=true. GPTQ checkpoint",
    ):
        load_checkpoint(tmp_path, progress=False)
    assert read and all(n.endswith(".g_idx") for n in read)
