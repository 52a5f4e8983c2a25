"""int8 / int4 KV cache (format v3 of csrc/include/fastinternlm/attention.h: a (scale, zero)
pair per row for int8, per 16 channels for int4, float16 for float16 activations and float32
otherwise): quantize on write in prefill, decode and the fused decode_qkv, dequantize on read
in their attention.

Three kinds of checks:
- the stored codes and (scale, zero) pairs are exactly the format's, emulated here in
  float64 with every float32 operation rounded to float32 (exact: for +, -, *, / a float64
  result rounded to float32 is the correctly rounded float32 result) and a float16 scale
  rounded up, and each stored value is within half of its stored step of what was written;
- the attention output against float64 attention over the dequantized cache (the op's own
  inputs: the tolerances of tests/test_attention.py apply unchanged);
- the output against float64 attention over the original, unquantized keys and values,
  within a bound derived from the steps (see `quantization_bound`), and a needle among N
  random keys retrieved within half a step of its value.
"""

import math
import os

import pytest
import torch

from conftest import UNIT_ROUNDOFF, assert_close, rand
from fastinternlm import ops
from fastinternlm.ops import QuantizedKV
from test_attention import prefill_roundings, prob_rounding_spread, reference, roundings, skip_cuda_float32

BITS = [8, 4]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
U32 = UNIT_ROUNDOFF[torch.float32]


def f32(t: torch.Tensor) -> torch.Tensor:
    """Round float64 values to float32 and back (one float32 operation's rounding)."""
    return t.to(torch.float32).to(torch.float64)


def ref_scale(hi_minus_lo: torch.Tensor, bits: int, params_dtype: torch.dtype) -> torch.Tensor:
    """The stored scale of groups whose range is hi_minus_lo (float64, exact), as float64:
    (hi - lo) / qmax in float32, then for float16 parameters the least float16 >= it."""
    s = f32(f32(hi_minus_lo) / float(2**bits - 1))
    if params_dtype == torch.float32:
        return s
    h = s.to(torch.float16)  # to nearest: one of the two float16 neighbours of s
    up = torch.nextafter(h, torch.full_like(h, math.inf))
    return torch.where(h.double() < s, up, h).double()


def ref_quantize(x: torch.Tensor, bits: int, params_dtype=None):
    """The format on rows x [..., D]: (codes uint8 [..., D * bits / 8], params [..., D / group,
    2] of params_dtype, by default ops.kv_params_dtype(x.dtype)), on x's device (float64
    there too: a million rows take seconds on a GPU, minutes here)."""
    params_dtype = params_dtype or ops.kv_params_dtype(x.dtype)
    qmax = float(2**bits - 1)
    d = x.shape[-1]
    g = ops.kv_quant_group(bits, d)
    xf = x.to(torch.float64).reshape(*x.shape[:-1], d // g, g)
    lo = xf.amin(-1, keepdim=True)
    hi = xf.amax(-1, keepdim=True)
    # The codes come from the stored scale (and lo, exact in either parameter dtype).
    scale = ref_scale(hi - lo, bits, params_dtype)
    inv = torch.where(scale >= 2.0**-126, f32(1.0 / scale), torch.zeros_like(scale))
    q = torch.clamp(torch.round(f32(f32(xf - lo) * inv)), max=qmax).flatten(-2)  # round: ties to even, like rint
    if bits == 4:
        q = q[..., 0::2] + 16 * q[..., 1::2]
    return q.to(torch.uint8), torch.cat([scale, lo], dim=-1).to(params_dtype)


def steps(params: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each value's step (its group's scale), float64: params [..., groups, 2] -> [..., D]."""
    p = params[..., 0].to(torch.float64)
    return p.repeat_interleave(head_dim // p.shape[-1], dim=-1)


def poisoned_cache(num_slots, kv_heads, max_seq, head_dim, bits, device, dtype) -> QuantizedKV:
    """Random codes and plausible (scale, zero) pairs (params of the dtype activations of
    `dtype` use): rows the op must not touch keep them, and rows an earlier chunk would have
    written hold them as data."""
    c = QuantizedKV.empty(num_slots, kv_heads, max_seq, head_dim, bits, device, dtype=dtype)
    c.codes.copy_(torch.randint(0, 256, c.codes.shape, dtype=torch.uint8))
    groups = c.params.shape[3]
    scale = torch.rand(num_slots, kv_heads, max_seq, groups, 1, dtype=torch.float64) * 0.04 + 0.01
    zero = -torch.rand(num_slots, kv_heads, max_seq, groups, 1, dtype=torch.float64) * 2
    c.params.copy_(torch.cat([scale * 15 / (2**bits - 1), zero], -1).to(c.params.dtype))
    return c


def clone(c: QuantizedKV) -> QuantizedKV:
    return QuantizedKV(c.codes.clone(), c.params.clone(), c.bits)


def set_rows(expected: QuantizedKV, slot, pos, x):
    """expected[slot, heads, pos] = quantized x [heads, D] (positions: an int or a slice)."""
    codes, params = ref_quantize(x, expected.bits)
    expected.codes[slot, :, pos] = codes.to(expected.codes.device)
    expected.params[slot, :, pos] = params.to(expected.params.device)


def assert_cache_equal(actual: QuantizedKV, expected: QuantizedKV, name: str):
    diff = (actual.codes != expected.codes).nonzero()
    assert diff.numel() == 0, f"{name}: {diff.shape[0]} codes differ, first at {diff[0].tolist()}"
    pdiff = (actual.params != expected.params).nonzero()
    assert pdiff.numel() == 0, (
        f"{name}: {pdiff.shape[0]} parameters differ, first at {pdiff[0].tolist()}: "
        f"{actual.params[tuple(pdiff[0])]} != {expected.params[tuple(pdiff[0])]}"
    )


def assert_within_half_step(c: QuantizedKV, slot, pos, x, name):
    """|dequantized - x| <= scale / 2 (its group's scale) plus the float32 roundings of the
    format's arithmetic:
    x - zero, times 1/scale (itself rounded), the scale's own rounding times q <= qmax, and
    the final fma; 8 u32 of |x| + |zero| + qmax * scale covers them."""
    xf = x.to("cpu", torch.float64)  # [heads, tokens, D]
    back = c.dequantize(torch.float64)[slot, :, pos].cpu()
    p = c.params[slot, :, pos].cpu().to(torch.float64)
    g = c.group
    scale, zero = p[..., 0].repeat_interleave(g, -1), p[..., 1].repeat_interleave(g, -1)
    slack = 8 * U32 * (xf.abs() + zero.abs() + (2**c.bits - 1) * scale)
    err = (back - xf).abs()
    assert bool((err <= scale / 2 + slack).all()), f"{name}: error {float((err - scale / 2).max()):.3e} past scale/2"


def quantization_bound(q, k_orig, v_orig, k_params, v_params, scale, bits):
    """Per output element, how far attention over the quantized cache may be from attention
    over the original rows, for one query row q [D] over keys/values [L, D] with their
    (scale, zero) [L, groups, 2]. Each key element errs by at most step/2 (step: its group's
    scale), so score j moves by at most delta_j = scale * sum_i |q_i| step_ji / 2, and with
    delta = max_j delta_j every weight p_j moves by a factor in [e^-2delta, e^2delta]:
    |sum_j (p'_j - p_j) v_j| <= (e^(2 delta) - 1) * (max_j v_j - min_j v_j) / 2. The values
    themselves err by at most max_j vstep_ji / 2 in channel i. Float64 throughout (a few float32 ulps of
    slack are added by the caller's rounding budget)."""
    d = q.shape[-1]
    half_step_k = steps(k_params, d) / 2 * (1 + 16 * U32)  # [L, D]
    delta = float((scale * (q.to(torch.float64).abs() * half_step_k).sum(-1)).max())
    vv = v_orig.to(torch.float64)
    spread = (vv.amax(0) - vv.amin(0)) / 2
    return math.expm1(2 * delta) * spread + steps(v_params, d).amax(0) / 2 * (1 + 16 * U32)


def check_against_original(out, q, k_rows, v_rows, kc, vc, slot_of_row, last_of_row, scale, dtype):
    """out [N, Hq, D] against float64 attention over the ORIGINAL rows k_rows, v_rows
    (dicts slot -> [kv_heads, L, D] float64, the values written, poison included as
    dequantized), within quantization_bound plus the float rounding budget."""
    n, q_heads, d = q.shape
    kv_heads = kc.shape[1]
    group = q_heads // kv_heads
    for r in range(n):
        slot, last = slot_of_row[r], last_of_row[r]
        for hq in range(q_heads):
            h = hq // group
            kk, vv = k_rows[slot][h, : last + 1], v_rows[slot][h, : last + 1]
            qq = q[r, hq].to("cpu", torch.float64)
            s = (kk @ qq) * scale
            expected = torch.softmax(s, 0) @ vv
            bound = quantization_bound(
                qq, kk, vv, kc.params[slot, h, : last + 1].cpu(), vc.params[slot, h, : last + 1].cpu(), scale, kc.bits
            )
            rounding = roundings(dtype, last + 1, d, float(s.abs().max())) * UNIT_ROUNDOFF[dtype]
            err = (out[r, hq].to("cpu", torch.float64) - expected).abs()
            tol = bound + rounding * (expected.abs() + expected.abs().mean() + vv.abs().max())
            assert bool((err <= tol).all()), (
                f"row {r} head {hq}: error {float(err.max()):.3e} past the quantization bound {float(tol.max()):.3e}"
            )


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "group,head_dim,tokens,start",
    [
        (1, 64, 37, 0),
        (3, 128, 70, 29),
        (8, 64, 5, 100),
        (4, 128, 129, 3),
        (6, 64, 1, 0),
        (2, 128, 17, 11),
        (5, 64, 33, 7),
        (7, 128, 9, 2),
    ],
)
def test_quantized_prefill(device, bits, dtype, group, head_dim, tokens, start):
    skip_cuda_float32(device, dtype)
    kv_heads, num_slots, slot = 2, 3, 1
    max_seq = start + tokens + 5
    q = rand(tokens, kv_heads * group, head_dim, dtype=dtype, device=device, scale=0.5 if bits == 4 else 1.0)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    kc = poisoned_cache(num_slots, kv_heads, max_seq, head_dim, bits, device, dtype)
    vc = poisoned_cache(num_slots, kv_heads, max_seq, head_dim, bits, device, dtype)
    ek, ev = clone(kc), clone(vc)
    set_rows(ek, slot, slice(start, start + tokens), k.transpose(0, 1))
    set_rows(ev, slot, slice(start, start + tokens), v.transpose(0, 1))

    out = ops.attention_prefill(q, k, v, kc, vc, slot, start)
    assert out.dtype == dtype and out.shape == q.shape
    assert_cache_equal(kc, ek, "k_cache")
    assert_cache_equal(vc, ev, "v_cache")
    assert_within_half_step(kc, slot, slice(start, start + tokens), k.transpose(0, 1), "k_cache")
    assert_within_half_step(vc, slot, slice(start, start + tokens), v.transpose(0, 1), "v_cache")

    # Against the dequantized cache: the op's own inputs. On CUDA the tensor-core kernel
    # rounds the dequantized float32 values to the activation dtype for the mma operands.
    kd, vd = kc.dequantize(torch.float64), vc.dequantize(torch.float64)
    if device.type == "cuda":
        kd, vd = kd.float().to(dtype).double(), vd.float().to(dtype).double()
    scale = 1 / math.sqrt(head_dim)
    lasts = [start + t for t in range(tokens)]
    expected, smax = reference(q, kd, vd, [slot] * tokens, lasts, scale)
    spread = prob_rounding_spread(q, kd, vd, slot, start, scale)
    assert_close(
        out,
        expected,
        dtype,
        prefill_roundings(device, roundings(dtype, start + tokens, head_dim, smax), expected, spread),
    )

    # Against the original rows (the poison before `start` as it dequantizes: that is what
    # an earlier chunk would have left), within the bound the steps allow.
    k_rows = {slot: kd[slot].cpu().clone()}
    v_rows = {slot: vd[slot].cpu().clone()}
    k_rows[slot][:, start : start + tokens] = k.transpose(0, 1).cpu().double()
    v_rows[slot][:, start : start + tokens] = v.transpose(0, 1).cpu().double()
    rows = range(0, tokens, max(1, tokens // 5))  # a few rows: the check is per row in Python
    check_against_original(
        out[list(rows)],
        q[list(rows)],
        k_rows,
        v_rows,
        kc,
        vc,
        [slot] * len(rows),
        [lasts[t] for t in rows],
        scale,
        dtype,
    )


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_prefill_chunked_equals_one_shot(device, bits, dtype):
    # A prompt in chunks stores the same rows and gives the same outputs (to rounding) as
    # in one call: each row is quantized on its own, whichever call writes it.
    skip_cuda_float32(device, dtype)
    kv_heads, group, head_dim, tokens = 2, 3, 64, 91
    q = rand(tokens, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    one = [poisoned_cache(1, kv_heads, tokens, head_dim, bits, device, dtype) for _ in range(2)]
    many = [poisoned_cache(1, kv_heads, tokens, head_dim, bits, device, dtype) for _ in range(2)]
    whole = ops.attention_prefill(q, k, v, *one, 0, 0)
    parts = [ops.attention_prefill(q[a:b], k[a:b], v[a:b], *many, 0, a) for a, b in [(0, 40), (40, 41), (41, 91)]]
    assert_cache_equal(many[0], one[0], "k_cache")
    assert_cache_equal(many[1], one[1], "v_cache")
    expected, smax = reference(
        q,
        one[0].dequantize(torch.float64),
        one[1].dequantize(torch.float64),
        [0] * tokens,
        list(range(tokens)),
        1 / math.sqrt(head_dim),
    )
    base = roundings(dtype, tokens, head_dim, smax)
    tol = base if device.type == "cpu" else base + 2 * 7.0 * math.sqrt(tokens)  # CUDA: P rounded, see test_attention
    assert_close(torch.cat(parts), whole.double(), dtype, 2 * tol)


def run_quantized_decode(device, dtype, bits, group, head_dim, batch, kv_heads, num_slots, max_seq, fused):
    slots = torch.randperm(num_slots)[:batch].tolist()
    positions = [0, max_seq - 1, *torch.randint(1, max_seq - 1, (batch - 2,)).tolist()][:batch]
    q_heads = kv_heads * group
    kc = poisoned_cache(num_slots, kv_heads, max_seq, head_dim, bits, device, dtype)
    vc = poisoned_cache(num_slots, kv_heads, max_seq, head_dim, bits, device, dtype)
    ek, ev = clone(kc), clone(vc)
    st = torch.tensor(slots, dtype=torch.int32, device=device)
    pt = torch.tensor(positions, dtype=torch.int32, device=device)
    qscale = 0.5 if bits == 4 else 1.0
    if fused:
        qkv = rand(batch, kv_heads, group + 2, head_dim, dtype=dtype, device=device)
        qkv[:, :, :group] *= qscale
        bases = torch.rand(batch, dtype=torch.float64).mul(1e6).add(1e4).float().to(device)
        # The unfused oracle's rotated q and k: rotary_embedding on copies.
        q = qkv[:, :, :group].reshape(batch, q_heads, head_dim).clone()
        k = qkv[:, :, group].contiguous()
        v = qkv[:, :, group + 1].contiguous()
        ops.rotary_embedding(q, k, pt, bases)
        out = ops.attention_decode_qkv(qkv, kc, vc, st, pt, bases)
    else:
        q = rand(batch, q_heads, head_dim, dtype=dtype, device=device, scale=qscale)
        k = rand(batch, kv_heads, head_dim, dtype=dtype, device=device)
        v = rand(batch, kv_heads, head_dim, dtype=dtype, device=device)
        out = ops.attention_decode(q, k, v, kc, vc, st, pt)
    for b, (s, p) in enumerate(zip(slots, positions)):
        set_rows(ek, s, p, k[b])
        set_rows(ev, s, p, v[b])
    assert_cache_equal(kc, ek, "k_cache")
    assert_cache_equal(vc, ev, "v_cache")
    for b, (s, p) in enumerate(zip(slots, positions)):
        assert_within_half_step(kc, s, p, k[b], "k_cache")
        assert_within_half_step(vc, s, p, v[b], "v_cache")
    # Decode dequantizes to float32 in registers on every device: the float64 reference of
    # the dequantized cache agrees with its inputs to half a float32 ulp.
    kd, vd = kc.dequantize(torch.float64), vc.dequantize(torch.float64)
    scale = 1 / math.sqrt(head_dim)
    expected, smax = reference(q, kd, vd, slots, positions, scale)
    assert out.dtype == dtype and out.shape == (batch, q_heads, head_dim)
    assert_close(out, expected, dtype, roundings(dtype, max(positions) + 1, head_dim, smax))
    k_rows = {s: kd[s].cpu().clone() for s in slots}
    v_rows = {s: vd[s].cpu().clone() for s in slots}
    for b, (s, p) in enumerate(zip(slots, positions)):
        k_rows[s][:, p] = k[b].cpu().double()
        v_rows[s][:, p] = v[b].cpu().double()
    check_against_original(out, q, k_rows, v_rows, kc, vc, slots, positions, scale, dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_quantized_decode(device, bits, dtype, group, head_dim):
    skip_cuda_float32(device, dtype)
    run_quantized_decode(
        device, dtype, bits, group, head_dim, batch=5, kv_heads=2, num_slots=6, max_seq=203, fused=False
    )


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 128), (7, 128), (8, 64)])
def test_quantized_decode_qkv(device, bits, dtype, group, head_dim):
    # The fused path rotates the new key in registers and quantizes it there: the stored
    # row must be the format applied to rotary_embedding's output.
    skip_cuda_float32(device, dtype)
    run_quantized_decode(
        device, dtype, bits, group, head_dim, batch=4, kv_heads=3, num_slots=5, max_seq=131, fused=True
    )


@pytest.mark.parametrize("bits", BITS)
def test_quantized_decode_long_context(device, bits):
    # Several decode splits on CUDA (one new token in one of them), 20K+ positions.
    run_quantized_decode(
        device, torch.float16, bits, 4, 128, batch=2, kv_heads=1, num_slots=2, max_seq=20011, fused=False
    )


def test_quantize_constant_and_extreme_rows(device):
    # A constant row has scale 0 (every code 0, read back exactly); a row with one large
    # outlier keeps its other values within half of its own, larger step.
    dtype = torch.float16
    k = rand(3, 1, 64, dtype=dtype, device=device)
    k[0] = 0.375
    k[1, 0, 5] = 3000.0
    k[2] = -k[2].abs() - 1  # all negative: zero is the minimum, codes still span [0, qmax]
    for bits in BITS:
        kc = poisoned_cache(1, 1, 3, 64, bits, device, dtype)
        vc = poisoned_cache(1, 1, 3, 64, bits, device, dtype)
        q = rand(3, 1, 64, dtype=dtype, device=device)
        ops.attention_prefill(q, k, k.clone(), kc, vc, 0, 0)
        codes, params = ref_quantize(k.transpose(0, 1), bits)
        assert torch.equal(kc.codes[0].cpu(), codes.cpu()) and torch.equal(kc.params[0].cpu(), params.cpu())
        assert bool((kc.params[0, 0, 0, :, 0] == 0).all())
        # The outlier coarsens only its own group: int4's other groups keep the fine steps
        # of unit-normal values (int8's one group is the whole row).
        outlier_step = float(kc.params[0, 0, 1, 0, 0])
        assert outlier_step >= 2900 / (2**bits - 1)
        if kc.params.shape[3] > 1:
            assert float(kc.params[0, 0, 1, 1:, 0].max()) < outlier_step / 100
        assert torch.equal(kc.dequantize()[0, 0, 0].cpu(), k[0, 0].float().cpu())
        assert_within_half_step(kc, 0, slice(0, 3), k.transpose(0, 1), "k_cache")
        assert int(kc.dequantize()[0, 0, 2].argmin()) == int(k[2, 0].float().argmin())


# ---------------------------------------------------------------------------------------
# The needle: N random keys, one planted to match the query; the output must be the
# needle's value within what the format allows.

NEEDLE_N = int(os.environ.get("FASTINTERNLM_TEST_NEEDLE_N", "65539"))
CACHE_TYPES = ["float16", "bfloat16", "float32", "int8", "int4"]


def fill_cache_rows(cache, rows: torch.Tensor, dtype):
    """cache[0, 0, :L] = rows [L, D] (float64 values representable in dtype), quantizing
    with the format emulation for quantized caches, in pieces to bound the memory."""
    if isinstance(cache, QuantizedKV):
        for a in range(0, rows.shape[0], 1 << 16):
            codes, params = ref_quantize(rows[a : a + (1 << 16)].to(cache.codes.device), cache.bits, cache.params.dtype)
            cache.codes[0, 0, a : a + codes.shape[0]] = codes.to(cache.codes.device)
            cache.params[0, 0, a : a + codes.shape[0]] = params.to(cache.params.device)
    else:
        cache[0, 0, : rows.shape[0]] = rows.to(dtype).to(cache.device)


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_needle(device, cache_type, where):
    dtype = (
        torch.float32 if cache_type == "float32" else (torch.bfloat16 if cache_type == "bfloat16" else torch.float16)
    )
    skip_cuda_float32(device, dtype)
    n, d = NEEDLE_N, 128
    if device.type == "cuda":
        n = int(os.environ.get("FASTINTERNLM_TEST_NEEDLE_N_CUDA", str(1 << 20)))
    scale = 1 / math.sqrt(d)
    q = rand(1, 1, d, dtype=dtype)  # [batch 1, 1 head, D]
    qd = q[0, 0].double()
    keys = torch.randn(n, d, dtype=torch.float64).to(dtype).double()
    values = torch.randn(n, d, dtype=torch.float64).to(dtype).double()
    # The needle: 4 q, whose score 4 |q|^2 / sqrt(D) ~ 45 stands ~40 above the random keys'
    # (~N(0, 1)); the bound below is computed from the actual scores and steps.
    at = {"start": 0, "middle": n // 2 + 1, "end": n - 1}[where]
    keys[at] = (4 * qd).to(dtype).double()
    bits = {"int8": 8, "int4": 4}.get(cache_type)
    max_seq = n + 3
    if bits:
        kc, vc = (QuantizedKV.empty(1, 1, max_seq, d, bits, device, dtype=dtype) for _ in range(2))
    else:
        kc, vc = (torch.empty(1, 1, max_seq, d, dtype=dtype, device=device) for _ in range(2))
    # Positions [0, n - 1) are written here; the op writes the last token itself (the
    # needle when where == "end": then it goes through the op's quantize-on-write).
    fill_cache_rows(kc, keys[: n - 1], dtype)
    fill_cache_rows(vc, values[: n - 1], dtype)
    out = ops.attention_decode(
        q.to(device),
        keys[n - 1 :].to(dtype).view(1, 1, d).to(device),
        values[n - 1 :].to(dtype).view(1, 1, d).to(device),
        kc,
        vc,
        torch.zeros(1, dtype=torch.int32, device=device),
        torch.full((1,), n - 1, dtype=torch.int32, device=device),
    )
    del kc, vc
    # Bound: every score may move by delta_j = scale * sum_i |q_i| step_ji / 2 (step 0 for
    # float caches, whose keys are stored exactly), so the needle's weight is at least
    # p = 1 / (1 + sum_{j != needle} exp(s_j + delta_j - s_needle + delta_needle)), and the
    # output is within (1 - p) * max_j |v_j - v_needle| of the stored needle value, itself
    # within step_v / 2 of the original; plus float32 arithmetic over n terms and the
    # output's rounding.
    s = (keys @ qd) * scale
    if bits:
        g, pd = ops.kv_quant_group(bits, d), ops.kv_params_dtype(dtype)
        kg, vg = keys.view(n, d // g, g), values[at].view(d // g, g)
        step_k = ref_scale(kg.amax(-1) - kg.amin(-1), bits, pd).repeat_interleave(g, -1)  # [n, D]
        step_v = float(ref_scale(vg.amax(-1) - vg.amin(-1), bits, pd).max())
    else:
        step_k, step_v = torch.zeros(n, d, dtype=torch.float64), 0.0
    delta = scale * (qd.abs() * step_k).sum(1) / 2 * (1 + 16 * U32)
    others = torch.ones(n, dtype=torch.bool)
    others[at] = False
    lse = torch.logsumexp(s[others] + delta[others] - (s[at] - delta[at]), 0)
    p_needle = 1 / (1 + math.exp(float(lse)))
    far = float((values - values[at]).abs().max())
    bound = (1 - p_needle) * far + step_v / 2 * (1 + 16 * U32)
    bound += (2 * math.sqrt(n) * U32 * far + UNIT_ROUNDOFF[dtype]) * float(values[at].abs().max()) + 1e-6
    assert bound < 0.25, f"the bound {bound} says nothing: the needle does not stand out enough"
    err = float((out[0, 0].to("cpu", torch.float64) - values[at]).abs().max())
    assert err <= bound, f"needle at {at} of {n} ({cache_type}): error {err:.3e} > bound {bound:.3e}"


# ---------------------------------------------------------------------------------------
# Offsets past 2^31: a cache whose last slot starts beyond 2^31 elements (and beyond 2^31
# bytes of codes). torch.empty reserves address space only; the op touches the rows of
# one slot, so the resident memory is a few MB although the arrays span 4+ GiB each.
# FASTINTERNLM_TEST_BIG_CACHE=0 skips (on a machine whose overcommit policy refuses the
# reservation).

BIG = os.environ.get("FASTINTERNLM_TEST_BIG_CACHE", "1") != "0"


@pytest.mark.skipif(not BIG, reason="FASTINTERNLM_TEST_BIG_CACHE=0")
@pytest.mark.parametrize("cache_type", ["float16", "int8", "int4"])
def test_cache_offsets_past_2_31(device, cache_type):
    dtype = torch.float16
    kv_heads, group, d, max_seq = 2, 2, 128, 4099
    # The last slot's first element: past 2^32 elements, so byte offsets of int4 codes
    # (half an element each) are past 2^31 too.
    num_slots = (1 << 32) // (kv_heads * max_seq * d) + 2
    assert (num_slots - 1) * kv_heads * max_seq * d > 1 << 32
    bits = {"int8": 8, "int4": 4}.get(cache_type)
    try:
        if bits:
            kc, vc = (QuantizedKV.empty(num_slots, kv_heads, max_seq, d, bits, device, dtype=dtype) for _ in range(2))
        else:
            kc, vc = (torch.empty(num_slots, kv_heads, max_seq, d, dtype=dtype, device=device) for _ in range(2))
    except (RuntimeError, MemoryError) as e:  # torch's OutOfMemoryError is a RuntimeError
        pytest.skip(f"cannot reserve the cache: {e}")
    slot, tokens, start = num_slots - 1, 45, max_seq - 60
    q = rand(tokens, kv_heads * group, d, dtype=dtype, device=device)
    k = rand(tokens, kv_heads, d, dtype=dtype, device=device)
    v = rand(tokens, kv_heads, d, dtype=dtype, device=device)
    # The first `start` rows of the slot, as an earlier chunk would have written them.
    pk = rand(kv_heads, start, d, dtype=dtype)
    pv = rand(kv_heads, start, d, dtype=dtype)
    if bits:
        for c, x in ((kc, pk), (vc, pv)):
            codes, params = ref_quantize(x, bits)
            c.codes[slot, :, :start] = codes.to(device)
            c.params[slot, :, :start] = params.to(device)
    else:
        kc[slot, :, :start] = pk.to(device)
        vc[slot, :, :start] = pv.to(device)
    out = ops.attention_prefill(q, k, v, kc, vc, slot, start)
    # Then one decode step at the last position.
    qd = rand(1, kv_heads * group, d, dtype=dtype, device=device)
    kd = rand(1, kv_heads, d, dtype=dtype, device=device)
    vd = rand(1, kv_heads, d, dtype=dtype, device=device)
    last = start + tokens
    outd = ops.attention_decode(
        qd,
        kd,
        vd,
        kc,
        vc,
        torch.tensor([slot], dtype=torch.int32, device=device),
        torch.tensor([last], dtype=torch.int32, device=device),
    )

    def rows(c):
        if bits:
            part = QuantizedKV(c.codes[slot : slot + 1, :, : last + 1], c.params[slot : slot + 1, :, : last + 1], bits)
            return part.dequantize(torch.float64)[0]
        return c[slot, :, : last + 1].to("cpu", torch.float64)

    kr, vr = rows(kc), rows(vc)
    if bits:
        codes, params = ref_quantize(k.transpose(0, 1), bits)
        assert torch.equal(kc.codes[slot, :, start:last].cpu(), codes.cpu())
        assert torch.equal(kc.params[slot, :, start:last].cpu(), params.cpu())
    else:
        assert torch.equal(kr[:, start:last], k.transpose(0, 1).cpu().double())
    if device.type == "cuda" and bits:
        kr, vr = kr.float().to(dtype).double(), vr.float().to(dtype).double()
    scale = 1 / math.sqrt(d)
    expected, smax = reference(q, kr[None], vr[None], [0] * tokens, [start + t for t in range(tokens)], scale)
    spread = prob_rounding_spread(q, kr[None], vr[None], 0, start, scale)
    assert_close(out, expected, dtype, prefill_roundings(device, roundings(dtype, last, d, smax), expected, spread))
    kr, vr = rows(kc), rows(vc)
    expected, smax = reference(qd, kr[None], vr[None], [0], [last], scale)
    assert_close(outd, expected, dtype, roundings(dtype, last + 1, d, smax))


# ---------------------------------------------------------------------------------------


def test_quantized_cache_bad_input(device):
    dtype = torch.float16
    q = rand(3, 4, 64, dtype=dtype, device=device)
    k = rand(3, 2, 64, dtype=dtype, device=device)
    kc = QuantizedKV.empty(1, 2, 8, 64, 8, device, dtype=dtype)
    vc = QuantizedKV.empty(1, 2, 8, 64, 8, device, dtype=dtype)
    t = torch.empty(1, 2, 8, 64, dtype=dtype, device=device)
    with pytest.raises(TypeError, match="v_cache must be a QuantizedKV"):
        ops.attention_prefill(q, k, k, kc, t, 0, 0)
    with pytest.raises(TypeError, match="k_cache must be a QuantizedKV"):
        ops.attention_prefill(q, k, k, t, vc, 0, 0)
    with pytest.raises(ValueError, match="v_cache must be int8 like k_cache, got int4"):
        ops.attention_prefill(q, k, k, kc, QuantizedKV.empty(1, 2, 8, 64, 4, device, dtype=dtype), 0, 0)
    with pytest.raises(ValueError, match=r"v_cache must have shape \(1, 2, 8, 64\)"):
        ops.attention_prefill(q, k, k, kc, QuantizedKV.empty(1, 2, 9, 64, 8, device, dtype=dtype), 0, 0)
    with pytest.raises(ValueError, match="k_cache.params must have shape"):
        ops.attention_prefill(q, k, k, QuantizedKV(kc.codes, kc.params[:, :, :4], 8), vc, 0, 0)
    with pytest.raises(TypeError, match="k_cache.codes must have dtype uint8"):
        ops.attention_prefill(q, k, k, QuantizedKV(kc.codes.to(torch.int32), kc.params, 8), vc, 0, 0)
    with pytest.raises(ValueError, match="k_cache.bits must be 8 or 4, got 2"):
        ops.attention_prefill(q, k, k, QuantizedKV(kc.codes, kc.params, 2), vc, 0, 0)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantizedKV.empty(1, 2, 8, 64, 16, dtype=dtype)
    with pytest.raises(TypeError, match="dtype must be torch.float16, torch.bfloat16 or torch.float32, got torch.int8"):
        QuantizedKV.empty(1, 2, 8, 64, 8, dtype=torch.int8)
    # The params dtype follows the activations (format v3): float32 pairs with float16
    # activations, or float16 pairs with bfloat16 ones, are refused by name, not misread.
    with pytest.raises(
        TypeError, match=r"k_cache.params must have dtype float16 for float16 activations .*got float32"
    ):
        ops.attention_prefill(q, k, k, QuantizedKV(kc.codes, kc.params.float(), 8), vc, 0, 0)
    with pytest.raises(TypeError, match=r"v_cache.params must have dtype float16 .*got float32"):
        ops.attention_prefill(q, k, k, kc, QuantizedKV(vc.codes, vc.params.float(), 8), 0, 0)
    if device.type == "cpu" or torch.cuda.is_bf16_supported():
        qb, kb = q.bfloat16(), k.bfloat16()
        with pytest.raises(
            TypeError, match=r"k_cache.params must have dtype float32 for bfloat16 activations .*got float16"
        ):
            ops.attention_prefill(qb, kb, kb, kc, vc, 0, 0)
    with pytest.raises(TypeError, match=r"k_cache.params must have dtype float16 or float32, got float64"):
        ops.attention_prefill(q, k, k, QuantizedKV(kc.codes, kc.params.double(), 8), vc, 0, 0)
    with pytest.raises(ValueError, match="start \\+ tokens must be <= max_seq"):
        ops.attention_prefill(q, k, k, kc, vc, 0, 6)
    # head_dim from the codes: 64 int4 values are 32 bytes.
    kc4, vc4 = (QuantizedKV.empty(1, 2, 8, 64, 4, device, dtype=dtype) for _ in range(2))
    assert kc4.shape == (1, 2, 8, 64) and kc4.codes.shape[-1] == 32
    ops.attention_prefill(q, k, k, kc4, vc4, 0, 0)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="k_cache.params must be on cpu like k_cache.codes"):
            ops.attention_prefill(q, k, k, QuantizedKV(kc.codes, kc.params.to("meta"), 8), vc, 0, 0)


def test_quantized_workspace_bytes_match_the_float_cache(device):
    # The split sizing depends on the shape only: a quantized cache needs the workspace an
    # activation-dtype cache of its shape needs.
    t = torch.empty(3, 2, 4097, 128, dtype=torch.float16, device=device)
    for dtype in (torch.float16, torch.bfloat16):
        kc = QuantizedKV.empty(3, 2, 4097, 128, 4, device, dtype=dtype)
        assert ops.attention_decode_workspace_bytes(3, 8, kc) == ops.attention_decode_workspace_bytes(3, 8, t)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_float16_params_bytes(bits, head_dim):
    # Format v3's rows: codes plus 4 bytes per (scale, zero) pair for float16 activations, 8
    # for bfloat16 and float32.
    groups = head_dim // (head_dim if bits == 8 else 16)
    for dtype, pair in ((torch.float16, 4), (torch.bfloat16, 8), (torch.float32, 8)):
        c = QuantizedKV.empty(2, 3, 5, head_dim, bits, dtype=dtype)
        assert c.params.dtype == ops.kv_params_dtype(dtype)
        assert c.nbytes() == 2 * 3 * 5 * (head_dim * bits // 8 + pair * groups)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("magnitude", [1.0, 2.0**13, 2.0**-12, 3e-7])
def test_float16_params_round_scale_up(device, bits, magnitude):
    # Float16 parameters, checked from first principles rather than against ref_quantize:
    # zero is the group's minimum exactly; the scale is the least float16 >= the float32
    # (max - min) / qmax (0 only for a constant group); and every value comes back within
    # half of the stored step. Magnitudes from near float16's top (ranges up to ~2^16: scales
    # up to ~2^16 / qmax) to its subnormals (scales below 2^-14, where a float16 ulp is 2^-24
    # and rounding up widens the step by a large fraction of itself).
    dtype, tokens, kv_heads, d = torch.float16, 37, 3, 128
    k = (rand(tokens, kv_heads, d, dtype=torch.float64, device=device) * magnitude).to(dtype)
    v = (rand(tokens, kv_heads, d, dtype=torch.float64, device=device) * magnitude).to(dtype)
    q = rand(tokens, kv_heads * 2, d, dtype=dtype, device=device)
    kc, vc = (poisoned_cache(1, kv_heads, tokens + 3, d, bits, device, dtype) for _ in range(2))
    assert kc.params.dtype == torch.float16
    out = ops.attention_prefill(q, k, v, kc, vc, 0, 0)
    assert bool(torch.isfinite(out).all())
    g, qmax = ops.kv_quant_group(bits, d), 2**bits - 1
    for c, x in ((kc, k), (vc, v)):
        xg = x.transpose(0, 1).to("cpu", torch.float64).reshape(kv_heads, tokens, d // g, g)
        p = c.params[0, :, :tokens].cpu()
        scale, zero = p[..., 0].double(), p[..., 1].double()
        assert torch.equal(zero, xg.amin(-1))
        s32 = f32(f32(xg.amax(-1) - xg.amin(-1)) / qmax)
        below = torch.nextafter(p[..., 0], torch.zeros_like(p[..., 0])).double()
        assert torch.equal(scale == 0, s32 == 0)
        assert bool((scale >= s32).all()) and bool((below < s32)[s32 > 0].all())
        back = c.dequantize(torch.float64)[0, :, :tokens].cpu().reshape(xg.shape)
        if magnitude >= 1:  # normal float16 scales, at most 2^-10 wider: the maximum's code is qmax
            top = xg.argmax(-1, keepdim=True)
            code = torch.round((back.gather(-1, top)[..., 0] - zero) / scale.clamp(min=1e-30))
            assert bool((code[s32 > 0] == qmax).all())
        assert_within_half_step(c, 0, slice(0, tokens), x.transpose(0, 1), "cache")
