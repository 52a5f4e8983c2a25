import random

import pytest
import torch

from conftest import UNIT_ROUNDOFF, assert_close, rand
from fastinternlm import _C, ops
from fastinternlm.ops.int4_gemm import Int4Weight

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
GROUP_SIZES = [32, 64, 128]
U32 = UNIT_ROUNDOFF[torch.float32]


# ---- independent float64 references ------------------------------------------------------


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [n, k/8] -> int64 [n, k]: nibble i (bits 4i..4i+3) of word j is channel 8j+i."""
    shifts = torch.arange(0, 32, 4, device=qweight.device)
    q = (qweight.to(torch.int64).unsqueeze(-1) >> shifts) & 15
    return q.reshape(qweight.shape[0], -1).cpu()


def reconstruct(qweight, scales, offsets, group_size) -> torch.Tensor:
    """float64 q * s + m, exact (q * s needs 15 significant bits, + m fits float64)."""
    s = scales.cpu().double().repeat_interleave(group_size, dim=1)
    m = offsets.cpu().double().repeat_interleave(group_size, dim=1)
    return unpack(qweight).double() * s + m


def half_down(v: torch.Tensor) -> torch.Tensor:
    """float64 -> the largest float16 <= v."""
    h = v.to(torch.float16)
    return torch.where(h.double() > v, torch.nextafter(h, torch.full_like(h, -float("inf"))), h)


def half_up(v: torch.Tensor) -> torch.Tensor:
    """float64 -> the smallest float16 >= v."""
    h = v.to(torch.float16)
    return torch.where(h.double() < v, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def reference_quantize(w: torch.Tensor, group_size: int):
    """The rule of the issue: m = min rounded down to float16, s = (max - m) / 15 rounded
    up, q = round-half-even((w - m) / s) (q = 0 where s = 0), all decided in float64."""
    n, k = w.shape
    g = w.cpu().double().reshape(n, k // group_size, group_size)
    m = half_down(g.amin(-1))
    s = half_up((g.amax(-1) - m.double()) / 15)
    t = (g - m.double().unsqueeze(-1)) / s.double().unsqueeze(-1)
    q = torch.where(s.unsqueeze(-1) > 0, torch.round(t), torch.zeros_like(t)).clamp(0, 15)
    return q.reshape(n, k).to(torch.int64), s, m


def random_weight(n, k, group_size, device) -> Int4Weight:
    """Packed tensors drawn directly (every nibble value, both signs of int32 words, scales
    and offsets of realistic size), independent of quantize_int4."""
    qweight = torch.randint(-(2**31), 2**31, (n, k // 8), dtype=torch.int32)
    scales = (torch.rand(n, k // group_size, dtype=torch.float64) * 0.05 + 0.005).half()
    offsets = (torch.randn(n, k // group_size, dtype=torch.float64) * 0.2 - 0.2).half()
    return Int4Weight.from_tensors(qweight.to(device), scales.to(device), offsets.to(device), group_size)


def random_sizes(group_size):
    """Fresh odd n (one above 128 at times, to cross a CUDA tile edge) and k of 2..5 groups."""
    n = 2 * random.randint(3, 90) + 1
    k = group_size * random.randint(2, 5)
    return n, k


def small_m_roundings(k, group_size):
    """Float32 roundings a product can meet in the CUDA M <= 16 kernel (int4_gemm_small_m.cu),
    which computes per group s * sum(x q) + m * sum(x) on the tensor cores:
    - sum(x q) and sum(x) each take group_size / 16 mma steps. A step adds 16 exact
      products to the float32 accumulator by aligning every term to the largest one and
      truncating (Fasi et al. 2021; the hardware may split the 16 into blocks, at most 4
      assumed here): each of the 16 products and each block's accumulator loses < 1 ulp
      of the largest term, each block's normalisation < 1 ulp more, so <= 24 ulp <= 48 u32
      relative to the sum of the step's magnitudes (truncation: ulp <= 2 u32 |value|);
    - the fold out = fma(s, acc, fma(m, xsum, out)) rounds the running sum twice per group,
      at most 2 k / group_size times for the first group;
    - the sum of the 8 warps' partial results, 7 additions (8 counted).
    The error is relative to sum |x| (q |s| + |m|), not sum |x| |q s + m| (see
    assert_gemm_close)."""
    return 48 * (group_size // 16) + 2 * (k // group_size) + 8


def gemm_bound_terms(qw, x, device):
    """(w64, magnitude, roundings) for assert_gemm_close on the path int4_gemm takes."""
    w64 = reconstruct(qw.qweight, qw.scales, qw.offsets, qw.group_size)
    rows = x.numel() // x.shape[-1]
    if device.type == "cuda" and rows <= 16:
        s = qw.scales.cpu().double().repeat_interleave(qw.group_size, dim=1)
        m = qw.offsets.cpu().double().repeat_interleave(qw.group_size, dim=1)
        return w64, unpack(qw.qweight).double() * s.abs() + m.abs(), small_m_roundings(qw.k, qw.group_size)
    return w64, w64.abs(), qw.k + 1


def assert_gemm_close(out, x, w64, dtype, w_abs=None, roundings=None, acc_unit=U32):
    """Bound derived for float32 accumulation (Higham, any summation order): each product
    x_i * w_i carries at most K + 1 roundings of acc_unit (one dequantizing w, one in the
    product or FMA, at most K - 1 in additions), so |acc - ref| <= gamma_{K+1} * sum|x||w|.
    Then one rounding to dtype (u_dtype |acc|), plus, for float16, half its smallest
    subnormal where the result underflows. acc_unit is u32 for IEEE float32 arithmetic (2 u32
    for the tensor cores' truncating adders). A path that factors the group affine out of the
    dot product (CUDA, M <= 16) rounds sum x q and sum x separately, so its error is
    relative to sum |x| (q |s| + |m|) instead, with its own rounding count: pass them as
    w_abs and roundings (gemm_bound_terms)."""
    x64 = x.cpu().double().reshape(-1, x.shape[-1])
    ref = x64 @ w64.T
    k = x64.shape[1]
    w_abs = w64.abs() if w_abs is None else w_abs
    roundings = k + 1 if roundings is None else roundings
    gamma = roundings * acc_unit / (1 - roundings * acc_unit)
    acc_err = gamma * (x64.abs() @ w_abs.T)
    if dtype == torch.float32:
        bound = acc_err
    else:
        tiny = 2.0**-25 if dtype == torch.float16 else 0.0
        bound = UNIT_ROUNDOFF[dtype] * (ref.abs() + acc_err) + acc_err + tiny
    a = out.cpu().double().reshape(ref.shape)
    assert torch.isfinite(a).all(), "non-finite output"
    err = (a - ref).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"error {err.flatten()[worst]:.3e} exceeds bound {bound.flatten()[worst]:.3e} at flat index "
        f"{worst} (actual {a.flatten()[worst]:.6g}, expected {ref.flatten()[worst]:.6g})"
    )


def tensor_core_path(device, m) -> bool:
    """CUDA computes m > 16 rows on tensor cores (int4_gemm in int4_gemm.h)."""
    return device.type == "cuda" and m > 16


def rounded_weight(qw, dtype) -> torch.Tensor:
    """float64 copy of dequantize_int4(W, dtype): q * s + m (exact in float64) rounded to
    float32, which is what fmaf(q, s, m) gives, then once to dtype."""
    w = reconstruct(qw.qweight, qw.scales, qw.offsets, qw.group_size)
    return w.to(torch.float32).to(dtype).double()


def assert_gemm_matches(out, x, qw, device):
    """Compare with the reference of the path that ran.

    CPU: the exact q * s + m weights, the float32 bound of assert_gemm_close.
    CUDA m <= 16: the exact weights too, with the factored path's bound (gemm_bound_terms).
    CUDA m > 16: the tensor cores take dtype operands, so the contract is dequantize_int4
    (W, dtype) then a float32-accumulated matmul: the reference multiplies the weights
    rounded exactly that way, so the only errors left are accumulation and the output
    rounding. The products are exact (11 x 11 or 8 x 8 significant bits fit float32), but
    the tensor cores' float32 adders are not IEEE round-to-nearest (measured to truncate
    the aligned significands, Fasi et al., "Numerical behavior of NVIDIA tensor cores",
    2021): each addition may err by a full ulp, 2 u32, hence acc_unit = 2 u32. The K + 1
    rounding count of the bound is kept (one more than the K - 1 additions need)."""
    m = x.numel() // x.shape[-1]
    if tensor_core_path(device, m):
        assert_gemm_close(out, x, rounded_weight(qw, x.dtype), x.dtype, acc_unit=2 * U32)
    else:
        w64, w_abs, roundings = gemm_bound_terms(qw, x, device)
        assert_gemm_close(out, x, w64, x.dtype, w_abs, roundings)


def check_gemm(out, x, qw, dtype, device):
    assert dtype == x.dtype
    assert_gemm_matches(out, x, qw, device)


def skip_float32_on_cuda(device, dtype):
    if device.type == "cuda" and dtype == torch.float32:
        pytest.skip("float32 is a CPU-only activation dtype")


# ---- quantize / dequantize ---------------------------------------------------------------


def special_groups(w: torch.Tensor, group_size: int) -> None:
    """Overwrite a few groups with the edge cases of the rule, in place."""
    dtype = w.dtype
    g = group_size
    w[0, :g] = 0.75  # constant, a float16 number: s = 0
    if w.shape[1] >= 2 * g:
        # constant, not a float16 number (not possible in float16 input): smallest s
        w[0, g : 2 * g] = {torch.float32: 1.0 + 2.0**-20, torch.bfloat16: 1.0e-6, torch.float16: -3.5}[dtype]
    w[1, :g] = rand(g, dtype=torch.float64).mul(20000).clamp(-60000, 60000).to(dtype)  # wide range
    w[2, :g] = rand(g, dtype=torch.float64).mul(1e-6).to(dtype)  # tiny: subnormal float16 s and m
    w[3, :g] = rand(g, dtype=torch.float64).abs().add(100).to(dtype)  # all positive, m far from 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantize_int4(device, dtype, group_size):
    n, k = random_sizes(group_size)
    w = rand(n, k, dtype=dtype, scale=2.0)
    special_groups(w, group_size)
    qw = ops.quantize_int4(w.to(device), group_size)
    assert (qw.n, qw.k, qw.group_size, qw.device) == (n, k, group_size, device)
    q_ref, s_ref, m_ref = reference_quantize(w, group_size)
    # The rule fixes every bit: same scales, offsets and nibbles.
    assert torch.equal(qw.scales.cpu(), s_ref)
    assert torch.equal(qw.offsets.cpu(), m_ref)
    assert torch.equal(unpack(qw.qweight), q_ref)
    # The guarantee: every value within s/2 of its reconstruction. The float64 division
    # before rounding can only misplace a value within 2^-49 of a tie.
    half_s = qw.scales.cpu().double().repeat_interleave(group_size, dim=1) / 2
    err = (reconstruct(qw.qweight, qw.scales, qw.offsets, group_size) - w.double()).abs()
    assert bool((err <= half_s * (1 + 2.0**-40)).all()), f"max error/s {(err / (2 * half_s)).max()}"
    # Constant groups: a float16 value reconstructs exactly with s = 0.
    assert qw.scales[0, 0].item() == 0 and err[0, :group_size].max().item() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_round_trip(device, dtype, group_size):
    n, k = random_sizes(group_size)
    w = rand(n, k, dtype=dtype, device=device, scale=0.5)
    qw = ops.quantize_int4(w, group_size)
    out = ops.dequantize_int4(qw, torch.float32)
    half_s = qw.scales.cpu().double().repeat_interleave(group_size, dim=1) / 2
    # s/2 from quantization (2^-40 as above), plus the one float32 rounding of q * s + m.
    bound = half_s * (1 + 2.0**-40) + U32 * out.cpu().double().abs()
    err = (out.cpu().double() - w.cpu().double()).abs()
    assert bool((err <= bound).all()), f"max error/s {(err / (2 * half_s)).max()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_dequantize_int4(device, dtype, group_size):
    n, k = random_sizes(group_size)
    qw = random_weight(n, k, group_size, device)
    out = ops.dequantize_int4(qw, dtype)
    assert out.dtype == dtype and out.shape == (n, k) and out.device == device
    ref = reconstruct(qw.qweight, qw.scales, qw.offsets, group_size)
    # One float32 rounding of q * s + m, then one to dtype: the first is worth
    # u32 / u_dtype of the second (none extra for float32 itself).
    assert_close(out, ref, dtype, roundings=1 + 2 * U32 / UNIT_ROUNDOFF[dtype])


def test_quantize_int4_out_of_range(device):
    w = rand(5, 256, dtype=torch.float32, device=device)
    for bad in (float("inf"), float("nan"), 70000.0, -65520.0):
        w_bad = w.clone()
        w_bad[3, 64 + 17] = bad
        with pytest.raises(ValueError, match=r"float16 range .* row 3, group 1 \(input channels 64..127\)"):
            ops.quantize_int4(w_bad, 64)
    # bfloat16 reaches far beyond float16 too.
    w_bf = w.to(torch.bfloat16)
    w_bf[0, 200] = 1e6
    with pytest.raises(ValueError, match=r"row 0, group 1 "):
        ops.quantize_int4(w_bf, 128)
    # The edge of the range itself is fine.
    w_edge = w.clone()
    w_edge[0, :32] = 65504.0
    w_edge[1, :32] = -65504.0
    qw = ops.quantize_int4(w_edge, 32)
    assert ops.dequantize_int4(qw, torch.float32)[1, 0].item() == -65504.0


# ---- int4_gemm ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 100])
def test_int4_gemm(device, dtype, group_size, m):
    skip_float32_on_cuda(device, dtype)
    n, k = random_sizes(group_size)
    m = m if m != 100 else random.randint(90, 110)  # "~100": a fresh tail past 64 rows
    qw = random_weight(n, k, group_size, device)
    x = rand(m, k, dtype=dtype, device=device)
    out = ops.int4_gemm(x, qw)
    assert out.shape == (m, n) and out.dtype == dtype and out.device == device
    assert_gemm_matches(out, x, qw, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 5, 16, 40])
def test_int4_gemm_long_k(device, dtype, m):
    # k = 4224 is 33 groups: the CUDA decode kernel's 8 warps get 4 or 5 groups each, so
    # several pipeline steps and a partial last one; n = 67 ends inside a block of 16 rows.
    group_size = 128
    k, n = 33 * group_size, 67
    qw = random_weight(n, k, group_size, device)
    x = rand(m, k, dtype=dtype, device=device)
    assert_gemm_matches(ops.int4_gemm(x, qw), x, qw, device)


def affine_weight(n, k, group_size, device) -> Int4Weight:
    """Scales of both signs and offsets large next to them (|m| ~ 20 |s|), so that the
    m * sum(x) part of the CUDA M <= 16 kernel's fold carries most of the result."""
    qweight = torch.randint(-(2**31), 2**31, (n, k // 8), dtype=torch.int32)
    scales = (torch.randn(n, k // group_size, dtype=torch.float64) * 0.03).half()
    offsets = (torch.randn(n, k // group_size, dtype=torch.float64) * 0.5).half()
    return Int4Weight.from_tensors(qweight.to(device), scales.to(device), offsets.to(device), group_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("groups", ["one", "odd"])
@pytest.mark.parametrize("m", list(range(1, 17)))
def test_int4_gemm_small_m(device, dtype, group_size, groups, m):
    # Every M of the CUDA decode kernel (A has 16 token rows; those past m are never
    # stored), n ending 5 or 13 rows into its last block of 16 rows (inside the first or
    # second n-block of 8), k one group (only the last of the 8 warps has work) or an odd number of groups
    # (the warps' ranges differ in length and end inside a pipeline step).
    n = 16 * random.randint(0, 4) + random.choice([5, 13])
    k = group_size * (1 if groups == "one" else 2 * random.randint(4, 20) + 1)
    qw = affine_weight(n, k, group_size, device)
    x = rand(m, k, dtype=dtype, device=device)
    # Called through the core with out inside a NaN-poisoned buffer: every output must be
    # written, and nothing past it.
    from fastinternlm.ops._checks import context, dtype_code

    guard = 67
    buf = torch.full((m * n + guard,), float("nan"), dtype=dtype, device=device)
    _C.int4_gemm(
        *context(device),
        dtype_code(dtype),
        buf.data_ptr(),
        x.data_ptr(),
        m,
        qw.qweight.data_ptr(),
        qw.scales.data_ptr(),
        qw.offsets.data_ptr(),
        n,
        k,
        group_size,
    )
    assert torch.isnan(buf[m * n :].cpu()).all(), "int4_gemm wrote past the end of out"
    check_gemm(buf[: m * n].view(m, n), x, qw, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("m", [1, 7, 16])
def test_int4_gemm_small_m_wide(device, dtype, group_size, m):
    # From 16384 rows on, the CUDA decode kernel takes 3 n-blocks of 8 rows per block
    # (24 rows) instead of 2: n ends 5, 13 or 21 rows into its last block (inside each of
    # its n-blocks), k is 3 or 5 groups (fewer than the 8 warps of a block).
    n = 24 * random.randint(683, 690) + random.choice([5, 13, 21])
    k = group_size * random.choice([3, 5])
    qw = affine_weight(n, k, group_size, device)
    x = rand(m, k, dtype=dtype, device=device)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    from fastinternlm.ops._checks import context, dtype_code

    _C.int4_gemm(
        *context(device),
        dtype_code(dtype),
        out.data_ptr(),
        x.data_ptr(),
        m,
        qw.qweight.data_ptr(),
        qw.scales.data_ptr(),
        qw.offsets.data_ptr(),
        n,
        k,
        group_size,
    )
    check_gemm(out, x, qw, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gemm_tiles(device, dtype):
    # Several 128 x 128 output tiles of the CUDA prefill kernel in both directions, each
    # direction ending in a partial tile.
    skip_float32_on_cuda(device, dtype)
    m, n, k = random.randint(129, 300), 2 * random.randint(129, 200) + 1, 96
    qw = random_weight(n, k, 32, device)
    x = rand(m, k, dtype=dtype, device=device)
    assert_gemm_matches(ops.int4_gemm(x, qw), x, qw, device)


def mixed_sign_weight(n, k, group_size, device) -> Int4Weight:
    """random_weight with about half of the scales negated (the format allows any float16
    scale), so q * s runs both ways from the offset."""
    qw = random_weight(n, k, group_size, "cpu")
    sign = torch.where(torch.rand(qw.scales.shape) < 0.5, -1.0, 1.0).half()
    return Int4Weight.from_tensors(
        qw.qweight.to(device), (qw.scales * sign).to(device), qw.offsets.to(device), group_size
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("groups", ["one", "three", "many"])
@pytest.mark.parametrize("m, n", [(17, 136 + 5), (33, 300 + 3), (130, 256 + 2), (257, 300 + 3)])
def test_int4_gemm_large_m(device, dtype, group_size, groups, m, n):
    # The CUDA tensor-core path (m > 16): one tile row just past the GEMV limit, partial
    # and multiple 128-row and 128-column tiles; n odd (element stores, the last column a
    # lone element of an output pair) and even (paired stores, a partial last tile); k of
    # one group, three groups (an odd count: for group 32 the last 64-channel step is half
    # empty) and many (an odd count again, past several pipeline stages). The output starts
    # as NaN, so an element the kernel fails to write shows.
    count = {"one": 1, "three": 3, "many": 2 * random.randint(8, 16) + 1}[groups]
    k = group_size * count
    qw = mixed_sign_weight(n, k, group_size, device)
    x = rand(m, k, dtype=dtype, device=device)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    from fastinternlm.ops._checks import context, dtype_code

    _C.int4_gemm(
        *context(device),
        dtype_code(dtype),
        out.data_ptr(),
        x.data_ptr(),
        m,
        qw.qweight.data_ptr(),
        qw.scales.data_ptr(),
        qw.offsets.data_ptr(),
        n,
        k,
        group_size,
    )
    assert_gemm_matches(out, x, qw, device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gemm_quantized_weight(device, dtype):
    # The whole path: quantize a dense weight, multiply, compare with the reconstruction.
    skip_float32_on_cuda(device, dtype)
    n, k = random_sizes(64)
    w = rand(n, k, dtype=dtype, device=device, scale=0.05)
    qw = ops.quantize_int4(w, 64)
    x = rand(7, k, dtype=dtype, device=device)
    assert_gemm_matches(ops.int4_gemm(x, qw), x, qw, device)


def test_int4_gemm_leading_dims(device):
    qw = random_weight(9, 96, 32, device)
    x = rand(2, 3, 96, dtype=torch.float16, device=device)
    out = ops.int4_gemm(x, qw)
    assert out.shape == (2, 3, 9)
    assert_gemm_matches(out, x, qw, device)
    empty = ops.int4_gemm(torch.empty(0, 96, dtype=torch.float16, device=device), qw)
    assert empty.shape == (0, 9)


def test_int4_gemm_alignment(device):
    # x starting 2 bytes into its storage: the CUDA kernels' 16-byte loads cannot take it
    # and the core says so; the CPU reference can.
    qw = random_weight(5, 64, 32, device)
    buf = rand(3 * 64 + 1, dtype=torch.float16, device=device)
    x = buf[1:].view(3, 64)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    if device.type == "cuda":
        with pytest.raises(ValueError, match="x must be 16-byte aligned"):
            ops.int4_gemm(x, qw)
    else:
        check_gemm(ops.int4_gemm(x, qw), x, qw, torch.float16, device)


# ---- Int4Weight ---------------------------------------------------------------------------


def test_int4_weight_object(device, tmp_path):
    qw = random_weight(11, 256, 64, device)
    assert (qw.n, qw.k, qw.group_size, qw.format_version) == (11, 256, 64, ops.INT4_FORMAT_VERSION)
    assert qw.shape == (11, 256) and qw.device == device
    assert qw.nbytes == 11 * 256 // 2 + 2 * 11 * (256 // 64) * 2
    assert qw.to(device) is qw
    on_cpu = qw.to("cpu")
    assert on_cpu.device.type == "cpu" and torch.equal(on_cpu.qweight, qw.qweight.cpu())

    # state_dict -> safetensors -> from_state_dict gives the same weight.
    from safetensors.torch import load_file, save_file

    state = on_cpu.state_dict(prefix="layers.0.wo.")
    assert set(state) == {f"layers.0.wo.{key}" for key in ("qweight", "scales", "offsets", "int4_format")}
    save_file(state, str(tmp_path / "w.safetensors"))
    back = Int4Weight.from_state_dict(load_file(str(tmp_path / "w.safetensors")), prefix="layers.0.wo.", device=device)
    assert (back.n, back.k, back.group_size, back.device) == (11, 256, 64, device)
    for name in ("qweight", "scales", "offsets"):
        assert torch.equal(getattr(back, name).cpu(), getattr(qw, name).cpu())

    state = on_cpu.state_dict()
    state["int4_format"] = torch.tensor([2, 11, 256, 64])
    with pytest.raises(ValueError, match="format_version must be 1"):
        Int4Weight.from_state_dict(state)
    state["int4_format"] = torch.tensor([1, 11, 512, 64])
    with pytest.raises(ValueError, match="records n, k = 11, 512"):
        Int4Weight.from_state_dict(state)
    with pytest.raises(ValueError, match="state is missing scales"):
        Int4Weight.from_state_dict({"qweight": qw.qweight})
    assert _C.int4_format_version == ops.INT4_FORMAT_VERSION


def test_int4_weight_bad_tensors(device):
    q = torch.zeros(7, 16, dtype=torch.int32, device=device)  # k = 128
    s = torch.ones(7, 4, dtype=torch.float16, device=device)  # group 32
    with pytest.raises(TypeError, match="qweight must have dtype int32, got float32"):
        Int4Weight.from_tensors(q.float(), s, s, 32)
    with pytest.raises(TypeError, match="scales must have dtype float16, got bfloat16"):
        Int4Weight.from_tensors(q, s.bfloat16(), s, 32)
    with pytest.raises(ValueError, match=r"offsets must have shape \(7, 4\), got \(7, 2\)"):
        Int4Weight.from_tensors(q, s, s[:, :2].contiguous(), 32)
    with pytest.raises(ValueError, match=r"scales must have shape \(7, 2\)"):
        Int4Weight.from_tensors(q, s, s, 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Weight.from_tensors(q, s, s, 16)
    with pytest.raises(ValueError, match="must be a multiple of group_size"):
        Int4Weight.from_tensors(q[:, :12].contiguous(), s[:, :3].contiguous(), s[:, :3].contiguous(), 64)
    with pytest.raises(ValueError, match="qweight must be contiguous"):
        Int4Weight.from_tensors(torch.zeros(16, 7, dtype=torch.int32, device=device).t(), s, s, 32)
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        Int4Weight.from_tensors(q.flatten(), s, s, 32)


# ---- bad input ----------------------------------------------------------------------------


def test_int4_bad_input(device):
    w = rand(6, 128, dtype=torch.float16, device=device)
    with pytest.raises(TypeError, match="w must have dtype float16 or bfloat16 or float32, got int32"):
        ops.quantize_int4(w.to(torch.int32), 32)
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\), got 48"):
        ops.quantize_int4(w, 48)
    with pytest.raises(TypeError, match="group_size must be an int"):
        ops.quantize_int4(w, 32.0)
    with pytest.raises(ValueError, match=r"k = 96\) must be a multiple of group_size \(64\)"):
        ops.quantize_int4(w[:, :96].contiguous(), 64)
    with pytest.raises(ValueError, match="w must be contiguous"):
        ops.quantize_int4(rand(128, 6, dtype=torch.float16, device=device).t(), 32)
    with pytest.raises(ValueError, match="w must be 2-D"):
        ops.quantize_int4(w.flatten(), 32)

    qw = ops.quantize_int4(w, 32)
    x = rand(3, 128, dtype=torch.float16, device=device)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.int4_gemm(x.to(torch.int32), qw)
    if device.type == "cuda":
        with pytest.raises(TypeError, match="x must have dtype float16 or bfloat16 on cuda, got float32"):
            ops.int4_gemm(x.float(), qw)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 128\)"):
        ops.int4_gemm(rand(3, 96, dtype=torch.float16, device=device), qw)
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.int4_gemm(rand(256, 3, dtype=torch.float16, device=device).t()[:, :128], qw)
    with pytest.raises(TypeError, match="qw must be an Int4Weight, got Tensor"):
        ops.int4_gemm(x, w)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.int4_gemm([1.0] * 128, qw)
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
        ops.dequantize_int4(qw, torch.int32)
    with pytest.raises(TypeError, match="qw must be an Int4Weight"):
        ops.dequantize_int4(w)


def test_int4_device_mix(device):
    # The meta device stands in for "another device" where no second one exists.
    other = "meta"
    qw = random_weight(5, 64, 32, device)
    with pytest.raises(ValueError, match=f"x must be on {device.type}"):
        ops.int4_gemm(torch.empty(2, 64, dtype=torch.float16, device=other), qw)
    with pytest.raises(ValueError, match=f"scales must be on {device.type}"):
        Int4Weight.from_tensors(qw.qweight, qw.scales.to(other), qw.offsets, 32)
    with pytest.raises(ValueError, match="w must be on the CPU or a CUDA device, got meta"):
        ops.quantize_int4(torch.empty(4, 64, dtype=torch.float16, device=other), 32)


def test_int4_core_checks(device):
    # The C++ entry points validate on their own (a C++ caller has no Python checks):
    # call them directly with sizes that do not fit the tensors.
    from fastinternlm.ops._checks import context, dtype_code

    ctx = context(device)
    fp16 = dtype_code(torch.float16)
    qw = random_weight(5, 64, 32, device)
    x = rand(3, 64, dtype=torch.float16, device=device)
    out = torch.empty(3, 5, dtype=torch.float16, device=device)
    p = (qw.qweight.data_ptr(), qw.scales.data_ptr(), qw.offsets.data_ptr())

    def gemm(m=3, n=5, k=64, g=32, out_ptr=out.data_ptr(), x_ptr=x.data_ptr(), dtype=fp16, ptrs=p):
        _C.int4_gemm(*ctx, dtype, out_ptr, x_ptr, m, *ptrs, n, k, g)

    gemm()  # the valid call works
    with pytest.raises(ValueError, match=r"group_size must be one of \{32, 64, 128\}, got 48"):
        gemm(g=48)
    with pytest.raises(ValueError, match=r"k \(96\) must be a multiple of group_size \(64\)"):
        gemm(k=96, g=64)
    with pytest.raises(ValueError, match=r"m must be in \[1, "):
        gemm(m=0)
    with pytest.raises(ValueError, match=r"n must be in \[1, "):
        gemm(n=0)
    with pytest.raises(ValueError, match="x must not be a null pointer"):
        gemm(x_ptr=0)
    with pytest.raises(ValueError, match="scales must not be a null pointer"):
        gemm(ptrs=(p[0], 0, p[2]))
    with pytest.raises(ValueError, match="out must not overlap x"):
        gemm(out_ptr=x.data_ptr())
    with pytest.raises(ValueError, match="out must not overlap qweight"):
        gemm(out_ptr=p[0])
    with pytest.raises(TypeError, match="x must be float16 or bfloat16"):
        gemm(dtype=dtype_code(torch.int32))
    with pytest.raises(ValueError, match="scales must be 2-byte aligned"):
        gemm(ptrs=(p[0], p[1] + 1, p[2]))
    with pytest.raises(ValueError, match="must be below 2"):
        gemm(m=2**31 - 1, n=2**31 - 1)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="qweight must be 16-byte aligned"):
            gemm(ptrs=(p[0] + 4, p[1], p[2]))
    with pytest.raises(ValueError, match=r"group_size must be one of \{32, 64, 128\}, got 16"):
        _C.quantize_int4(*ctx, fp16, x.data_ptr(), 3, 64, 16, *p)
    with pytest.raises(ValueError, match="qweight must not overlap w"):
        _C.quantize_int4(*ctx, fp16, x.data_ptr(), 3, 64, 32, x.data_ptr(), p[1], p[2])
    with pytest.raises(TypeError, match="out must be float32, float16 or bfloat16, got int64"):
        _C.dequantize_int4(*ctx, dtype_code(torch.int64), out.data_ptr(), *p, 5, 64, 32)


# ---- benchmarking variants of the CUDA M <= 16 kernel ---------------------------------------
# int4_gemm_small_m.cu builds alternative configurations (variant 1 .. N-1, group 128 only)
# next to the default (0), selected process-wide by _C._set_small_m_variant for
# python -m fastinternlm.bench.int4_gemm_sweep. Each must compute the same function.

SMALL_M_VARIANTS = [(v, g) for v in range(_C.int4_small_m_variants) for g in (GROUP_SIZES if v == 0 else [128])]


def test_small_m_variant_hook(device):
    assert _C._small_m_variant() == 0
    for bad in (-1, _C.int4_small_m_variants):
        with pytest.raises(ValueError, match=rf"variant must be in \[0, {_C.int4_small_m_variants}\), got {bad}"):
            _C._set_small_m_variant(bad)
        assert _C._small_m_variant() == 0, "a refused variant must leave the current one"
    qw = affine_weight(21, 64 * 3, 64, device)
    x = rand(2, 64 * 3, dtype=torch.float16, device=device)
    try:
        _C._set_small_m_variant(1)
        assert _C._small_m_variant() == 1
        if device.type == "cuda":
            with pytest.raises(ValueError, match="variant 1 is built for group_size 128 only, got 64"):
                ops.int4_gemm(x, qw)
        else:
            # The CPU path ignores the variant.
            check_gemm(ops.int4_gemm(x, qw), x, qw, torch.float16, device)
    finally:
        _C._set_small_m_variant(0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant, group_size", SMALL_M_VARIANTS)
@pytest.mark.parametrize("groups", ["one", "odd", "long"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_int4_gemm_small_m_variants(device, dtype, variant, group_size, groups, m):
    if device.type != "cuda":
        pytest.skip("the variants are builds of the CUDA kernel; the CPU path ignores them")
    # n ends 5, 13, 21 or 29 rows into a block of 32 rows, so inside every n-block of 8 of
    # the widest variant (NB = 4) and past the end of the narrower ones' last block; k one
    # group (most warps idle), an odd number (ranges of unequal length ending inside a
    # pipeline step), or many (several trips round a 3-stage ring per warp).
    n = 32 * random.randint(0, 4) + random.choice([5, 13, 21, 29])
    k = group_size * {"one": 1, "odd": 2 * random.randint(4, 20) + 1, "long": 8 * 13 + 3}[groups]
    qw = affine_weight(n, k, group_size, device)
    x = rand(m, k, dtype=dtype, device=device)
    from fastinternlm.ops._checks import context, dtype_code

    guard = 67
    buf = torch.full((m * n + guard,), float("nan"), dtype=dtype, device=device)
    try:
        _C._set_small_m_variant(variant)
        _C.int4_gemm(
            *context(device),
            dtype_code(dtype),
            buf.data_ptr(),
            x.data_ptr(),
            m,
            qw.qweight.data_ptr(),
            qw.scales.data_ptr(),
            qw.offsets.data_ptr(),
            n,
            k,
            group_size,
        )
    finally:
        _C._set_small_m_variant(0)
    assert torch.isnan(buf[m * n :].cpu()).all(), "int4_gemm wrote past the end of out"
    check_gemm(buf[: m * n].view(m, n), x, qw, dtype, device)
