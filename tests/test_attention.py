import math

import pytest
import torch

import fastinternlm
from conftest import UNIT_ROUNDOFF, assert_close, rand
from fastinternlm import ops
from fastinternlm.ops._checks import _C, DEVICE_CODES, context, dtype_code

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
GROUPS = [1, 2, 3, 4, 6, 8]
HEAD_DIMS = [64, 128]


def skip_cuda_float32(device, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 is a CPU-only activation dtype")


def make_cache(num_slots, kv_heads, max_seq, head_dim, dtype, device):
    """Random "poison": whatever the op must not touch keeps these values; positions an
    earlier chunk would have written hold them as data."""
    k = rand(num_slots, kv_heads, max_seq, head_dim, dtype=dtype, device=device, scale=1.5)
    v = rand(num_slots, kv_heads, max_seq, head_dim, dtype=dtype, device=device, scale=1.5)
    return k, v


def reference(q, k_cache, v_cache, slots, last, scale):
    """float64 attention: row n of q [N, Hq, D] attends to positions [0, last[n]] of
    slot slots[n]; query head h reads KV head h // (Hq / Hkv). Also returns the largest
    |score| seen (it sets the float32 error of the scores, see `roundings`)."""
    n, q_heads, d = q.shape
    group = q_heads // k_cache.shape[1]
    out = torch.empty(n, q_heads, d, dtype=torch.float64)
    smax = 0.0
    # Rows that share a slot are done together with a causal mask.
    for slot in sorted(set(slots)):
        rows = [i for i in range(n) if slots[i] == slot]
        length = max(last[i] for i in rows) + 1
        kk = k_cache[slot, :, :length].to("cpu", torch.float64).repeat_interleave(group, 0)
        vv = v_cache[slot, :, :length].to("cpu", torch.float64).repeat_interleave(group, 0)
        qq = q[rows].to("cpu", torch.float64)
        s = torch.einsum("nhd,hld->nhl", qq, kk) * scale
        masked = torch.arange(length)[None, :] > torch.tensor([last[i] for i in rows])[:, None]
        s = s.masked_fill(masked[:, None, :], float("-inf"))
        smax = max(smax, float(s.masked_fill(masked[:, None, :], 0).abs().max()))
        out[rows] = torch.einsum("nhl,hld->nhd", torch.softmax(s, dim=-1), vv)
    return out, smax


def roundings(dtype, length, head_dim, smax):
    """Error budget in units of dtype's roundoff. The output is rounded once to dtype (1);
    the rest is float32 arithmetic, the same in absolute terms for every dtype: a sum over
    `length` terms drifts like sqrt(length) roundings, and a score of magnitude smax from a
    head_dim-term dot product carries ~sqrt(head_dim) * smax float32 roundings, which exp
    turns into the same relative error of its weight (x2: the score and the maximum). For
    float16/bfloat16 that float32 part is far below one rounding; for float32 it dominates."""
    float32_part = 2 * (math.sqrt(length) + math.sqrt(head_dim) * smax)
    return 2 + float32_part * UNIT_ROUNDOFF[torch.float32] / UNIT_ROUNDOFF[dtype]


# The CUDA prefill kernel rounds the probabilities to the activation dtype to feed them to
# the tensor cores for P V (as flash-attention and SDPA do); the CPU keeps them float32.
P_ROUNDING_SIGMAS = 7.0
# Half the spacing of float16 subnormals: below 2^-14 rounding errs by up to this absolute
# amount rather than by u relative. bfloat16 has float32's exponent range: none.
SUBNORMAL_HALF_SPACING = {torch.float16: 2.0**-25, torch.bfloat16: 0.0, torch.float32: 0.0}


def prob_rounding_spread(q, k_cache, v_cache, slot, start, scale):
    """float64 sqrt(sum_j (p_j + eta / u)^2 v_j^2) for each output element of a prefill of q
    at `start` in `slot` (row t attends to [0, start + t]); see `prefill_roundings`."""
    dtype = q.dtype
    n, q_heads, d = q.shape
    group = q_heads // k_cache.shape[1]
    length = start + n
    kk = k_cache[slot, :, :length].to("cpu", torch.float64).repeat_interleave(group, 0)
    vv = v_cache[slot, :, :length].to("cpu", torch.float64).repeat_interleave(group, 0)
    s = torch.einsum("nhd,hld->nhl", q.to("cpu", torch.float64), kk) * scale
    visible = (torch.arange(length)[None, :] <= start + torch.arange(n)[:, None])[:, None, :]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    w = (p + visible * (SUBNORMAL_HALF_SPACING[dtype] / UNIT_ROUNDOFF[dtype])) ** 2
    return torch.einsum("nhl,hld->nhd", w, vv * vv).sqrt()


def prefill_roundings(device, base, expected, spread, outputs=1):
    """`base` roundings plus, on CUDA, the rounding of the probabilities in each of `outputs`
    prefill results being compared, as a per-element tensor (assert_close scales it by
    |expected| + mean|expected|).

    The kernel rounds p~_j = exp(s_j - m), m the running maximum, to dtype: an error of at
    most u p~_j + eta (eta: SUBNORMAL_HALF_SPACING). Divided by the normaliser (>= 1, the
    maximum contributes exactly 1) and rescaled by the later factors exp(m - m_final) <= 1,
    which numerator and normaliser share, weight j errs by delta_j with |delta_j| <= u p_j +
    eta, p_j the exact softmax weight; the output then errs by sum_j delta_j v_j. Taking the
    roundings as independent and zero-mean, Hoeffding's inequality bounds
    P(|sum_j delta_j v_j| >= k u spread) by 2 exp(-k^2 / 2), spread = sqrt(sum_j (p_j +
    eta / u)^2 v_j^2): k = 7 leaves a false alarm below 5e-11 per element. A worst-case
    bound (all errors of one sign) would be ~sqrt(length) times looser, useless at 32K."""
    if device.type != "cuda":
        return base
    e = expected.detach().to("cpu", torch.float64).abs()  # spread is computed on the CPU
    return base + outputs * P_ROUNDING_SIGMAS * spread / (e + e.mean())


def expected_prefill_cache(cache, k, slot, start):
    e = cache.clone()
    e[slot, :, start : start + k.shape[0]] = k.transpose(0, 1)
    return e


def run_prefill_and_check(q, k, v, k_cache, v_cache, slot, start, scale=None):
    dtype = q.dtype
    ek = expected_prefill_cache(k_cache, k, slot, start)
    ev = expected_prefill_cache(v_cache, v, slot, start)
    out = ops.attention_prefill(q, k, v, k_cache, v_cache, slot, start, scale)
    # The cache must hold exactly the new rows where they belong and nothing else changed.
    assert torch.equal(k_cache, ek), "k_cache differs from the expected contents"
    assert torch.equal(v_cache, ev), "v_cache differs from the expected contents"
    tokens, head_dim = q.shape[0], q.shape[2]
    s = 1.0 / math.sqrt(head_dim) if scale is None else scale
    expected, smax = reference(q, ek, ev, [slot] * tokens, [start + t for t in range(tokens)], s)
    assert out.dtype == dtype and out.device == q.device and out.shape == q.shape
    spread = prob_rounding_spread(q, ek, ev, slot, start, s)
    assert_close(
        out,
        expected,
        dtype,
        prefill_roundings(q.device, roundings(dtype, start + tokens, head_dim, smax), expected, spread),
    )
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
# Odd token counts around the CUDA tile of 128 (token, head) rows and 64 keys: a single
# token, a partial tile, several tiles, and starts that are not multiples of 64.
@pytest.mark.parametrize("tokens,start", [(37, 0), (70, 29), (1, 0), (1, 100), (17, 5), (129, 0), (300, 131)])
def test_attention_prefill(device, dtype, group, head_dim, tokens, start):
    skip_cuda_float32(device, dtype)
    kv_heads, num_slots, slot = 2, 3, 1
    max_seq = start + tokens + 13
    q = rand(tokens, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(num_slots, kv_heads, max_seq, head_dim, dtype, device)
    run_prefill_and_check(q, k, v, k_cache, v_cache, slot, start)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_prefill_fills_cache_to_the_end(device, dtype):
    # start + tokens == max_seq, an explicit scale, one KV head, slot 0 of a single slot.
    skip_cuda_float32(device, dtype)
    tokens, start, max_seq, head_dim = 19, 45, 64, 128
    q = rand(tokens, 3, head_dim, dtype=dtype, device=device)
    k = rand(tokens, 1, head_dim, dtype=dtype, device=device)
    v = rand(tokens, 1, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(1, 1, max_seq, head_dim, dtype, device)
    run_prefill_and_check(q, k, v, k_cache, v_cache, 0, start, scale=0.37)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 6])
def test_attention_prefill_chunked_equals_one_shot(device, dtype, group):
    skip_cuda_float32(device, dtype)
    kv_heads, head_dim, tokens, max_seq = 2, 64, 151, 167
    q = rand(tokens, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    k_one, v_one = make_cache(2, kv_heads, max_seq, head_dim, dtype, device)
    k_chunked, v_chunked = k_one.clone(), v_one.clone()
    one_shot = run_prefill_and_check(q, k, v, k_one, v_one, 1, 0)
    pieces, start = [], 0
    for size in (64, 1, 50, 36):
        end = start + size
        pieces.append(
            ops.attention_prefill(
                q[start:end].contiguous(),
                k[start:end].contiguous(),
                v[start:end].contiguous(),
                k_chunked,
                v_chunked,
                1,
                start,
            )
        )
        start = end
    assert start == tokens
    chunked = torch.cat(pieces)
    assert torch.equal(k_chunked, k_one) and torch.equal(v_chunked, v_one)
    # Both compute each query over the same positions in float32; they may differ by the
    # order of float32 operations only, so well within one rounding of each other's output;
    # on CUDA each also rounds its probabilities, relative to maxima that depend on the
    # chunking, so both results' probability roundings count.
    scale = 1 / math.sqrt(head_dim)
    _, smax = reference(q, k_one, v_one, [1] * tokens, list(range(tokens)), scale)
    spread = prob_rounding_spread(q, k_one, v_one, 1, 0, scale)
    base = roundings(dtype, tokens, head_dim, smax)
    assert_close(
        chunked, one_shot.double(), dtype, prefill_roundings(q.device, base, one_shot.double(), spread, outputs=2)
    )


@pytest.mark.parametrize("kv_cache", ["activation", "int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
# Sizes around the CPU kernel's blocking: token blocks of ceil(24 / group) tokens, tiles of
# 3 and 4 rows, keys in blocks of 8 or 16 and values in blocks of 32 or 64, causal lengths
# that end inside and across those blocks, two tokens; and the single-row path (one token,
# or 32 positions or fewer).
@pytest.mark.parametrize(
    "group,head_dim,tokens,start",
    [
        (3, 64, 37, 517),
        (1, 64, 29, 70),
        (4, 128, 23, 301),
        (8, 128, 11, 45),
        (5, 64, 50, 0),
        (2, 64, 20, 15),
        (2, 128, 2, 999),
        (7, 64, 1, 33),
        (3, 64, 9, 13),
    ],
)
def test_attention_prefill_rows_equal_decode_bitwise(device, dtype, kv_cache, group, head_dim, tokens, start):
    # On the CPU every query row of a prefill performs exactly the operations a decode step
    # at that position performs (csrc/attention.cpp), though the prefill kernel computes a
    # block of rows together and the decode kernel one row at a time: the results must be
    # the same bits, with every cache format.
    if device.type != "cpu":
        pytest.skip("the CUDA prefill and decode kernels round differently (tests above bound both)")
    kv_heads, slot = 2, 1
    k_cache, v_cache = ops.empty_kv_cache(kv_cache, 2, kv_heads, start + tokens + 5, head_dim, dtype)
    if start > 0:  # the history, written the way the engine writes it
        ops.attention_prefill(
            rand(start, kv_heads * group, head_dim, dtype=dtype),
            rand(start, kv_heads, head_dim, dtype=dtype, scale=1.5),
            rand(start, kv_heads, head_dim, dtype=dtype, scale=1.5),
            k_cache,
            v_cache,
            slot,
            0,
        )
    q = rand(tokens, kv_heads * group, head_dim, dtype=dtype, scale=1.5)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, scale=1.5)
    v = rand(tokens, kv_heads, head_dim, dtype=dtype)
    out = ops.attention_prefill(q, k, v, k_cache, v_cache, slot, start)
    slots = torch.tensor([slot], dtype=torch.int32)
    for t in range(tokens):
        # Decoding token t rewrites its own K/V row with the same values, then attends to
        # positions [0, start + t] like prefill row t.
        step = ops.attention_decode(
            q[t : t + 1],
            k[t : t + 1],
            v[t : t + 1],
            k_cache,
            v_cache,
            slots,
            torch.tensor([start + t], dtype=torch.int32),
        )
        int_type = torch.int16 if dtype != torch.float32 else torch.int32
        differ = (step[0].view(int_type) != out[t].view(int_type)).nonzero()
        assert differ.numel() == 0, (
            f"token {t}: prefill and decode differ at (head, channel) {differ[0].tolist()}: "
            f"{out[t][tuple(differ[0])]} vs {step[0][tuple(differ[0])]}"
        )


def run_decode_and_check(q, k, v, k_cache, v_cache, slots, positions, scale=None, **kwargs):
    dtype, head_dim = q.dtype, q.shape[2]
    ek, ev = k_cache.clone(), v_cache.clone()
    for b, (s, p) in enumerate(zip(slots, positions)):
        ek[s, :, p] = k[b]
        ev[s, :, p] = v[b]
    dev = q.device
    out = ops.attention_decode(
        q,
        k,
        v,
        k_cache,
        v_cache,
        torch.tensor(slots, dtype=torch.int32, device=dev),
        torch.tensor(positions, dtype=torch.int32, device=dev),
        scale,
        **kwargs,
    )
    assert torch.equal(k_cache, ek), "k_cache differs from the expected contents"
    assert torch.equal(v_cache, ev), "v_cache differs from the expected contents"
    s = 1.0 / math.sqrt(head_dim) if scale is None else scale
    expected, smax = reference(q, ek, ev, slots, positions, s)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype, roundings(dtype, max(positions) + 1, head_dim, smax))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_decode(device, dtype, group, head_dim):
    skip_cuda_float32(device, dtype)
    kv_heads, num_slots, max_seq, batch = 2, 7, 203, 6
    slots = torch.randperm(num_slots)[:batch].tolist()  # one slot stays untouched
    # First and last position, both sides of a 64-token boundary, and random ones.
    positions = [0, max_seq - 1, 63, 64, *torch.randint(1, max_seq, (batch - 4,)).tolist()]
    q = rand(batch, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(batch, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(batch, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(num_slots, kv_heads, max_seq, head_dim, dtype, device)
    run_decode_and_check(q, k, v, k_cache, v_cache, slots, positions)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [3, 8])
def test_attention_decode_short_cache(device, dtype, group):
    # A cache shorter than one decode chunk (on CUDA: a single split, no merge pass), an
    # explicit scale and a caller-provided workspace.
    skip_cuda_float32(device, dtype)
    kv_heads, num_slots, max_seq, head_dim = 3, 4, 45, 64
    slots, positions = [2, 0, 3], [44, 0, 17]
    q = rand(3, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(3, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(3, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(num_slots, kv_heads, max_seq, head_dim, dtype, device)
    nbytes = ops.attention_decode_workspace_bytes(3, kv_heads * group, k_cache)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=device)
    run_decode_and_check(q, k, v, k_cache, v_cache, slots, positions, scale=0.21, workspace=workspace)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_decode_long_context(device, dtype):
    # ~32K positions, with one sequence near the end of the cache and one in the middle.
    skip_cuda_float32(device, dtype)
    kv_heads, group, head_dim, max_seq = 1, 4, 128, 32771
    slots, positions = [1, 0], [32770, 20001]
    q = rand(2, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(2, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(2, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(2, kv_heads, max_seq, head_dim, dtype, device)
    run_decode_and_check(q, k, v, k_cache, v_cache, slots, positions)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_decode_large_scores(device, dtype):
    # scale = 1 with |q| ~ 3 |k| gives scores of a few hundred over 32K positions: exp of
    # the raw scores overflows float32 (> 88), so this fails unless the maximum is
    # subtracted; it also puts the maximum far from the first positions.
    kv_heads, group, head_dim, max_seq = 2, 2, 64, 32003
    q = rand(1, kv_heads * group, head_dim, dtype=dtype, device=device, scale=3.0)
    k = rand(1, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(1, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(1, kv_heads, max_seq, head_dim, dtype, device)
    run_decode_and_check(q, k, v, k_cache, v_cache, [0], [max_seq - 1], scale=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_prefill_long_context(device, dtype):
    # A late chunk of a ~32K prompt: its queries attend over 32K earlier positions.
    skip_cuda_float32(device, dtype)
    kv_heads, group, head_dim, start, tokens = 1, 2, 128, 32700, 23
    max_seq = start + tokens + 5
    q = rand(tokens, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(1, kv_heads, max_seq, head_dim, dtype, device)
    run_prefill_and_check(q, k, v, k_cache, v_cache, 0, start)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_prefill_long_prompt(device, dtype):
    # A 1500-token chunk after 1300 earlier positions: 44 key tiles of 64 for the last rows,
    # so the online softmax rescales its running sums many times, across both K/V buffers.
    skip_cuda_float32(device, dtype)
    kv_heads, group, head_dim, start, tokens = 1, 2, 128, 1300, 1500
    q = rand(tokens, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(1, kv_heads, start + tokens + 3, head_dim, dtype, device)
    run_prefill_and_check(q, k, v, k_cache, v_cache, 0, start)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_prefill_large_scores(device, dtype):
    # scale = 1 with |q| ~ 3 |k| gives scores of ~100 over 2K positions: exp of the raw
    # scores overflows float32 (> 88), so this fails unless the maximum is subtracted.
    skip_cuda_float32(device, dtype)
    kv_heads, group, head_dim, start, tokens = 2, 2, 64, 2000, 70
    q = rand(tokens, kv_heads * group, head_dim, dtype=dtype, device=device, scale=3.0)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(1, kv_heads, start + tokens, head_dim, dtype, device)
    run_prefill_and_check(q, k, v, k_cache, v_cache, 0, start, scale=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,group,head_dim", [(129, 3, 64), (300, 8, 128), (5, 1, 128)])
def test_attention_prefill_writes_every_output(device, dtype, tokens, group, head_dim):
    # The op allocates its output with torch.empty; here the C++ entry writes into a
    # NaN-filled buffer instead, so a row the kernel skips (a tile edge, a padded row of a
    # group that does not divide the tile) shows up as NaN.
    skip_cuda_float32(device, dtype)
    kv_heads, start, slot = 2, 45, 1
    q = rand(tokens, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(2, kv_heads, start + tokens + 7, head_dim, dtype, device)
    ek = expected_prefill_cache(k_cache, k, slot, start)
    ev = expected_prefill_cache(v_cache, v, slot, start)
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(head_dim)
    _C.attention_prefill(
        *context(device),
        dtype_code(dtype),
        out.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        *k_cache.shape,
        tokens,
        q.shape[1],
        slot,
        start,
        scale,
        0,
        0,
        0,
    )
    assert torch.equal(k_cache, ek) and torch.equal(v_cache, ev)
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} output elements never written"
    expected, smax = reference(q, ek, ev, [slot] * tokens, [start + t for t in range(tokens)], scale)
    spread = prob_rounding_spread(q, ek, ev, slot, start, scale)
    assert_close(
        out,
        expected,
        dtype,
        prefill_roundings(device, roundings(dtype, start + tokens, head_dim, smax), expected, spread),
    )


def test_attention_decode_then_prefill_agree(device):
    # Decoding token by token after a prefill gives what prefilling the whole text gives.
    dtype, kv_heads, group, head_dim, tokens = torch.bfloat16, 2, 3, 128, 40
    q = rand(tokens, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    kc1, vc1 = make_cache(1, kv_heads, 47, head_dim, dtype, device)
    kc2, vc2 = kc1.clone(), vc1.clone()
    full = ops.attention_prefill(q, k, v, kc1, vc1, 0, 0)
    ops.attention_prefill(q[:30].contiguous(), k[:30].contiguous(), v[:30].contiguous(), kc2, vc2, 0, 0)
    slot = torch.zeros(1, dtype=torch.int32, device=device)
    # Each output rounded once (2); on CUDA the prefill also rounds its probabilities.
    spread = prob_rounding_spread(q, kc1, vc1, 0, 0, 1 / math.sqrt(head_dim))
    for t in range(30, tokens):
        pos = torch.full((1,), t, dtype=torch.int32, device=device)
        out = ops.attention_decode(q[t : t + 1], k[t : t + 1], v[t : t + 1], kc2, vc2, slot, pos)
        expected = full[t : t + 1].double()
        assert_close(out, expected, dtype, prefill_roundings(q.device, 2, expected, spread[t : t + 1]))
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


def test_attention_decode_out_of_range_unchecked(device):
    """check_indices=False: on the CPU the C++ entry still refuses; on CUDA the bad
    sequence writes nothing and gets NaN rows, the good ones are unaffected."""
    dtype, kv_heads, group, head_dim, max_seq = torch.float16, 2, 2, 64, 300
    q = rand(3, kv_heads * group, head_dim, dtype=dtype, device=device)
    k = rand(3, kv_heads, head_dim, dtype=dtype, device=device)
    v = rand(3, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(3, kv_heads, max_seq, head_dim, dtype, device)
    slots = torch.tensor([0, 5, 2], dtype=torch.int32, device=device)
    positions = torch.tensor([10, 3, max_seq], dtype=torch.int32, device=device)
    if device.type == "cpu":
        with pytest.raises(ValueError, match=r"slots must be in \[0, 3\), got 5 at index 1"):
            ops.attention_decode(q, k, v, k_cache, v_cache, slots, positions, check_indices=False)
        return
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = ops.attention_decode(q, k, v, k_cache, v_cache, slots, positions, check_indices=False)
    torch.cuda.synchronize()
    assert torch.isnan(out[1:]).all(), "out-of-range sequences must produce NaN"
    ek, ev = k_before.clone(), v_before.clone()
    ek[0, :, 10], ev[0, :, 10] = k[0], v[0]
    assert torch.equal(k_cache, ek) and torch.equal(v_cache, ev)
    expected, smax = reference(q[:1], ek, ev, [0], [10], 1 / math.sqrt(head_dim))
    assert_close(out[:1], expected, dtype, roundings(dtype, 11, head_dim, smax))


def test_attention_misaligned(device):
    # A view one element into a buffer: fine for the CPU path, refused by the CUDA kernels'
    # 16-byte vector loads.
    dtype, head_dim = torch.float16, 64
    buf = rand(5 * 2 * head_dim + 1, dtype=dtype, device=device)
    q = buf[1:].view(5, 2, head_dim)
    k = rand(5, 1, head_dim, dtype=dtype, device=device)
    v = rand(5, 1, head_dim, dtype=dtype, device=device)
    k_cache, v_cache = make_cache(1, 1, 8, head_dim, dtype, device)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="q must be 16-byte aligned"):
            ops.attention_prefill(q, k, v, k_cache, v_cache, 0, 0)
    else:
        run_prefill_and_check(q, k, v, k_cache, v_cache, 0, 0)


def _prefill_inputs(device, dtype=torch.float16, tokens=5, q_heads=4, kv_heads=2, head_dim=64, max_seq=16):
    return dict(
        q=rand(tokens, q_heads, head_dim, dtype=dtype, device=device),
        k=rand(tokens, kv_heads, head_dim, dtype=dtype, device=device),
        v=rand(tokens, kv_heads, head_dim, dtype=dtype, device=device),
        k_cache=rand(3, kv_heads, max_seq, head_dim, dtype=dtype, device=device),
        v_cache=rand(3, kv_heads, max_seq, head_dim, dtype=dtype, device=device),
        slot=1,
        start=0,
    )


def _decode_inputs(device, dtype=torch.float16, batch=3, q_heads=4, kv_heads=2, head_dim=64, max_seq=16):
    return dict(
        q=rand(batch, q_heads, head_dim, dtype=dtype, device=device),
        k=rand(batch, kv_heads, head_dim, dtype=dtype, device=device),
        v=rand(batch, kv_heads, head_dim, dtype=dtype, device=device),
        k_cache=rand(4, kv_heads, max_seq, head_dim, dtype=dtype, device=device),
        v_cache=rand(4, kv_heads, max_seq, head_dim, dtype=dtype, device=device),
        slots=torch.tensor([3, 0, 1], dtype=torch.int32, device=device)[:batch],
        positions=torch.tensor([5, 0, 15], dtype=torch.int32, device=device)[:batch],
    )


def test_attention_prefill_bad_input(device):
    good = _prefill_inputs(device)
    k_before, v_before = good["k_cache"].clone(), good["v_cache"].clone()

    def call(**changes):
        args = dict(good, **changes)
        return ops.attention_prefill(**args)

    with pytest.raises(TypeError, match="q must have dtype float16 or bfloat16"):
        call(q=good["q"].to(torch.int32))
    with pytest.raises(TypeError, match="k must have dtype float16"):
        call(k=good["k"].to(torch.bfloat16))
    with pytest.raises(TypeError, match="v_cache must have dtype float16"):
        call(v_cache=good["v_cache"].float())
    if device.type == "cuda":
        with pytest.raises(TypeError, match="q must have dtype float16 or bfloat16 on cuda"):
            call(**{n: good[n].float() for n in ("q", "k", "v", "k_cache", "v_cache")})
    with pytest.raises(ValueError, match=r"k must have shape \(5, 2, 64\)"):
        call(k=rand(5, 3, 64, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"v must have shape \(5, 2, 64\)"):
        call(v=rand(4, 2, 64, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"q must have shape \(\*, \*, 64\)"):
        call(q=rand(5, 4, 128, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        call(k_cache=good["k_cache"][0])
    with pytest.raises(ValueError, match=r"v_cache must have shape \(3, 2, 16, 64\)"):
        call(v_cache=rand(3, 2, 17, 64, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="q must be contiguous"):
        call(q=rand(4, 5, 64, dtype=torch.float16, device=device).transpose(0, 1))
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        call(k_cache=rand(3, 16, 2, 64, dtype=torch.float16, device=device).transpose(1, 2))
    with pytest.raises(ValueError, match=r"slot must be in \[0, 3\), got 3"):
        call(slot=3)
    with pytest.raises(ValueError, match=r"slot must be in \[0, 3\), got -1"):
        call(slot=-1)
    with pytest.raises(ValueError, match="start must be >= 0, got -2"):
        call(start=-2)
    with pytest.raises(ValueError, match=r"start \+ tokens must be <= max_seq \(16\), got 12 \+ 5 = 17"):
        call(start=12)
    with pytest.raises(TypeError, match="slot must be an int"):
        call(slot=1.0)
    with pytest.raises(TypeError, match="start must be an int"):
        call(start=torch.tensor(0))
    with pytest.raises(ValueError, match=r"q_heads \(5\) must be a multiple of kv_heads \(2\)"):
        call(q=rand(5, 5, 64, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"group size\) must be in \[1, 8\], got 18 / 2 = 9"):
        call(q=rand(5, 18, 64, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"head_dim must be one of \{64, 128\}, got 96"):
        call(**_prefill_inputs(device, head_dim=96))
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        call(scale=0.0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        call(scale=float("nan"))
    with pytest.raises(TypeError, match="scale must be a float or None"):
        call(scale="0.1")
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        call(q=[[1.0]])
    # Nothing above may have touched the cache.
    assert torch.equal(good["k_cache"], k_before) and torch.equal(good["v_cache"], v_before)


def test_attention_decode_bad_input(device):
    good = _decode_inputs(device)
    k_before = good["k_cache"].clone()

    def call(**changes):
        args = dict(good, **changes)
        return ops.attention_decode(**args)

    with pytest.raises(TypeError, match="q must have dtype float16 or bfloat16"):
        call(q=good["q"].to(torch.int32))
    with pytest.raises(TypeError, match="k_cache must have dtype float16"):
        call(k_cache=good["k_cache"].to(torch.bfloat16))
    with pytest.raises(TypeError, match="slots must have dtype int32"):
        call(slots=good["slots"].long())
    with pytest.raises(TypeError, match="positions must have dtype int32"):
        call(positions=good["positions"].float())
    with pytest.raises(ValueError, match=r"k must have shape \(3, 2, 64\)"):
        call(k=rand(2, 2, 64, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"positions must have shape \(3,\)"):
        call(positions=good["positions"][:2])
    with pytest.raises(ValueError, match="v must be contiguous"):
        call(v=rand(3, 64, 2, dtype=torch.float16, device=device).transpose(1, 2))
    with pytest.raises(ValueError, match="slots must be contiguous"):
        call(slots=torch.tensor([3, 9, 0, 9, 1], dtype=torch.int32, device=device)[::2])
    with pytest.raises(ValueError, match=r"slots must be in \[0, 4\)"):
        call(slots=torch.tensor([3, 4, 1], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"slots must be in \[0, 4\)"):
        call(slots=torch.tensor([3, -1, 1], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"positions must be in \[0, 16\)"):
        call(positions=torch.tensor([5, 16, 1], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"positions must be in \[0, 16\)"):
        call(positions=torch.tensor([-3, 0, 1], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="slots must be distinct"):
        call(slots=torch.tensor([3, 1, 3], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"q_heads \(6\) must be a multiple of kv_heads \(4\)"):
        call(**_decode_inputs(device, q_heads=6, kv_heads=4))
    with pytest.raises(ValueError, match=r"head_dim must be one of \{64, 128\}, got 32"):
        call(**_decode_inputs(device, head_dim=32))
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        call(scale=-1.0)
    with pytest.raises(TypeError, match="workspace must have dtype uint8"):
        call(workspace=torch.empty(64, dtype=torch.float32, device=device))
    if device.type == "cuda":
        big = _decode_inputs(device, max_seq=1000)  # long enough to need a workspace
        need = ops.attention_decode_workspace_bytes(3, 4, big["k_cache"])
        assert need > 0
        with pytest.raises(ValueError, match=f"workspace must have at least {need} bytes, got {need - 16}"):
            ops.attention_decode(**big, workspace=torch.empty(need - 16, dtype=torch.uint8, device=device))
        with pytest.raises(TypeError, match="q must have dtype float16 or bfloat16 on cuda"):
            call(**{n: good[n].float() for n in ("q", "k", "v", "k_cache", "v_cache")})
    assert torch.equal(good["k_cache"], k_before), "a refused call wrote the cache"


def test_attention_device_mix(device):
    # The meta device stands in for "another device" where no second one exists.
    good = _decode_inputs(device)
    for name in ("k", "v_cache", "slots", "positions"):
        args = dict(good, **{name: torch.empty_like(good[name], device="meta")})
        with pytest.raises(ValueError, match=f"{name} must be on {device.type}"):
            ops.attention_decode(**args)
    goodp = _prefill_inputs(device)
    for name in ("v", "k_cache"):
        args = dict(goodp, **{name: torch.empty_like(goodp[name], device="meta")})
        with pytest.raises(ValueError, match=f"{name} must be on {device.type}"):
            ops.attention_prefill(**args)


def test_attention_decode_workspace_bytes(device):
    k_cache = torch.empty(1, 8, 4096, 128, dtype=torch.float16, device=device)
    nbytes = ops.attention_decode_workspace_bytes(1, 32, k_cache)
    if device.type == "cpu":
        assert nbytes == 0
    else:
        # float32 (max, sum, acc[D]) per query head and split: a whole number of splits,
        # more than one for a long cache at batch 1.
        per_split = 32 * (128 + 2) * 4
        assert nbytes % per_split == 0 and 2 <= nbytes // per_split <= 256
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        ops.attention_decode_workspace_bytes(1, 32, k_cache[0])


def test_decode_split_tuning_hook():
    """The benchmarking hook refuses bad settings with a message; a good one changes the
    CUDA workspace size (more, shorter splits need more partials) and is restored."""
    from fastinternlm import _C, build_info

    if not build_info()["cuda"]:
        with pytest.raises(RuntimeError, match="set_decode_split_tuning"):
            _C._set_decode_split_tuning(64, 1024)
        return
    with pytest.raises(ValueError, match=r"min_chunk must be a multiple of 16 in \[16, 65536\], got 40"):
        _C._set_decode_split_tuning(40, 1024)
    with pytest.raises(ValueError, match=r"target_blocks must be in \[1, 2\^20\], got 0"):
        _C._set_decode_split_tuning(64, 0)
    shape = (1, 8, 32768, 128)  # no memory needed: the size depends on the shape only
    try:
        _C._set_decode_split_tuning(512, 264)
        few = _C.attention_decode_workspace_bytes(1, 0, 1, 32, *shape)
        _C._set_decode_split_tuning(64, 1024)
        many = _C.attention_decode_workspace_bytes(1, 0, 1, 32, *shape)
    finally:
        _C._set_decode_split_tuning(*_C.decode_split_defaults)
    assert 0 < few < many


def test_cuda_refuses_a_max_seq_past_int32_positions_before_the_device():
    # Positions are int32 in the CUDA kernels, which step a key tile past the last one:
    # the bound leaves that headroom. Refused by the argument checks, before any device
    # call, so it runs without a GPU wherever the CUDA kernels are built. The pointers are
    # never dereferenced (1 TiB apart, so no range overlaps another at this max_seq).
    if not fastinternlm.build_info()["cuda"]:
        pytest.skip("this build has no CUDA kernels")
    cuda, fp16 = DEVICE_CODES["cuda"], dtype_code(torch.float16)
    p = [(i + 1) << 40 for i in range(9)]
    bound = 2**31 - 1 - 256
    for max_seq in (bound + 1, 2**31 - 1, 2**31):
        with pytest.raises(ValueError, match=f"max_seq must be <= {bound} on CUDA, got {max_seq}"):
            _C.attention_prefill(cuda, 0, 0, fp16, *p[:6], 1, 1, max_seq, 64, 1, 1, 0, 0, 0.125, 0, 0, 0)
        with pytest.raises(ValueError, match=f"max_seq must be <= {bound} on CUDA, got {max_seq}"):
            _C.attention_decode(
                cuda, 0, 0, fp16, *p[:6], 1, 1, max_seq, 64, 1, 1, p[6], p[7], 0.125, p[8], 1 << 30, 0, 0, 0
            )
