// Int4 weight-only quantization and GEMM: argument checks, dispatch, and the CPU reference
// implementation.
#include "fastinternlm/int4_gemm.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <vector>

#include "check.h"
#include "half.h"
#include "kernels_cuda.h"

namespace fastinternlm {
namespace {

// Kernels index with 32-bit row and column counts; their products use 64-bit arithmetic,
// and byte counts of whole tensors must not overflow it either.
constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxElements = int64_t{1} << 56;
constexpr float kHalfMax = 65504.0f;

// ---- float16 rounding toward -inf / +inf --------------------------------------------------
// float_to_half_bits rounds to nearest; one step along the float16 grid then gives the
// directed rounding. Monotonic rounding lands on one of the two float16 neighbours of v,
// so a single step always suffices.

uint16_t half_next_up(uint16_t h) {
  if (h == 0x8000u) return 0x0001u;                                   // -0 -> smallest subnormal
  return (h & 0x8000u) ? static_cast<uint16_t>(h - 1) : static_cast<uint16_t>(h + 1);
}

uint16_t half_next_down(uint16_t h) {
  if (h == 0x0000u) return 0x8001u;
  return (h & 0x8000u) ? static_cast<uint16_t>(h + 1) : static_cast<uint16_t>(h - 1);
}

uint16_t half_round_down(float v) {
  uint16_t h = float_to_half_bits(v);
  if (half_bits_to_float(h) > v) h = half_next_down(h);
  return h;
}

// v is a float64 here because the scale (max - m) / 15 is formed in float64: rounding it
// up first to float32 and then to float16 gives the float16 ceiling, since every float16
// is a float32.
uint16_t half_round_up(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  uint16_t h = float_to_half_bits(f);
  if (half_bits_to_float(h) < f) h = half_next_up(h);
  return h;
}

// ---- CPU reference ------------------------------------------------------------------------

template <typename T>
Status quantize_int4_cpu(const T* w, int64_t n, int64_t k, int64_t group_size, int32_t* qweight,
                         uint16_t* scales, uint16_t* offsets) {
  const int64_t groups = k / group_size;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* src = w + r * k + g * group_size;
      float lo = to_float(src[0]), hi = lo;
      for (int64_t i = 0; i < group_size; ++i) {
        const float v = to_float(src[i]);
        // !(|v| <= max) also catches NaN.
        if (!(std::fabs(v) <= kHalfMax))
          return invalid_value("w must be finite and within the float16 range (|w| <= 65504) for "
                               "int4 scales and offsets, got ", v, " in row ", r, ", group ", g,
                               " (input channels ", g * group_size, "..", (g + 1) * group_size - 1,
                               ")");
        lo = std::fmin(lo, v);
        hi = std::fmax(hi, v);
      }
      const uint16_t m_bits = half_round_down(lo);
      const double m = half_bits_to_float(m_bits);
      const uint16_t s_bits = half_round_up((static_cast<double>(hi) - m) / 15.0);
      const double s = half_bits_to_float(s_bits);
      scales[r * groups + g] = s_bits;
      offsets[r * groups + g] = m_bits;
      int32_t* dst = qweight + (r * k + g * group_size) / 8;
      for (int64_t j = 0; j < group_size / 8; ++j) {
        uint32_t word = 0;
        for (int i = 0; i < 8; ++i) {
          // s == 0 only when max == m, i.e. every value of the group is m exactly.
          double q = s > 0.0 ? std::nearbyint((to_float(src[8 * j + i]) - m) / s) : 0.0;
          q = std::fmin(std::fmax(q, 0.0), 15.0);
          word |= static_cast<uint32_t>(q) << (4 * i);
        }
        dst[j] = static_cast<int32_t>(word);
      }
    }
  }
  return Status::Ok();
}

// One row of dequantized weights in float32: q * s + m. q * s is exact in float32 (4-bit
// times 11-bit significands), so this is one rounding, the same on every path.
void dequantize_row(const int32_t* qrow, const uint16_t* srow, const uint16_t* mrow, int64_t k,
                    int64_t group_size, float* dst) {
  for (int64_t j = 0; j < k / 8; ++j) {
    const uint32_t word = static_cast<uint32_t>(qrow[j]);
    const int64_t g = 8 * j / group_size;
    const float s = half_bits_to_float(srow[g]);
    const float m = half_bits_to_float(mrow[g]);
    for (int i = 0; i < 8; ++i) dst[8 * j + i] = static_cast<float>((word >> (4 * i)) & 15u) * s + m;
  }
}

template <typename T>
Status dequantize_int4_cpu(T* out, const Int4Weight& w) {
  const int64_t groups = w.k / w.group_size;
  const auto* s = static_cast<const uint16_t*>(w.scales);
  const auto* m = static_cast<const uint16_t*>(w.offsets);
  std::vector<float> row;
  try {
    row.resize(static_cast<size_t>(w.k));
  } catch (const std::exception&) {
    return invalid_value("dequantize_int4: cannot allocate ", w.k * 4, " bytes of CPU scratch");
  }
  for (int64_t r = 0; r < w.n; ++r) {
    dequantize_row(w.qweight + r * (w.k / 8), s + r * groups, m + r * groups, w.k, w.group_size,
                   row.data());
    for (int64_t i = 0; i < w.k; ++i) out[r * w.k + i] = from_float<T>(row[i]);
  }
  return Status::Ok();
}

// Rows of W dequantized together, so each row of x is read once per block of them.
constexpr int64_t kCpuRowBlock = 8;
// Independent partial sums per row: lets the compiler vectorise the float32 dot product
// without reassociating a single sum (which it may not do without fast-math).
constexpr int64_t kCpuLanes = 8;

template <typename T>
Status int4_gemm_cpu(T* out, const T* x, int64_t m, const Int4Weight& w) {
  const int64_t n = w.n, k = w.k, groups = k / w.group_size;
  const auto* s = static_cast<const uint16_t*>(w.scales);
  const auto* o = static_cast<const uint16_t*>(w.offsets);
  std::vector<float> xf, wf;
  try {
    xf.resize(static_cast<size_t>(m * k));
    wf.resize(static_cast<size_t>(kCpuRowBlock * k));
  } catch (const std::exception&) {
    return invalid_value("int4_gemm: cannot allocate ", (m + kCpuRowBlock) * k * 4,
                         " bytes of CPU scratch");
  }
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_float(x[i]);
  for (int64_t r0 = 0; r0 < n; r0 += kCpuRowBlock) {
    const int64_t rows = std::min(kCpuRowBlock, n - r0);
    for (int64_t r = 0; r < rows; ++r)
      dequantize_row(w.qweight + (r0 + r) * (k / 8), s + (r0 + r) * groups, o + (r0 + r) * groups,
                     k, w.group_size, wf.data() + r * k);
    for (int64_t i = 0; i < m; ++i) {
      const float* xr = xf.data() + i * k;
      for (int64_t r = 0; r < rows; ++r) {
        const float* wr = wf.data() + r * k;
        float acc[kCpuLanes] = {};
        // k is a multiple of 32, so of kCpuLanes.
        for (int64_t c = 0; c < k; c += kCpuLanes)
          for (int64_t l = 0; l < kCpuLanes; ++l) acc[l] += xr[c + l] * wr[c + l];
        float sum = 0.0f;
        for (int64_t l = 0; l < kCpuLanes; ++l) sum += acc[l];
        out[i * n + r0 + r] = from_float<T>(sum);
      }
    }
  }
  return Status::Ok();
}

// ---- argument checks ----------------------------------------------------------------------

Status check_weight_dtype(const char* name, DType dtype) {
  if (dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16)
    return Status::Ok();
  return invalid_type(name, " must be float32, float16 or bfloat16, got ", dtype_name(dtype));
}

Status check_elements(const char* what, int64_t a, int64_t b) {
  if (a > kMaxElements / b)
    return invalid_value(what, " must be below 2^56 elements, got ", a, " * ", b);
  return Status::Ok();
}

Status check_sizes(int64_t n, int64_t k, int64_t group_size) {
  FIL_RETURN_IF_ERROR(check_one_of("group_size", group_size, {32, 64, 128}));
  FIL_RETURN_IF_ERROR(check_range("n", n, 1, kMaxDim + 1));
  FIL_RETURN_IF_ERROR(check_range("k", k, 1, kMaxDim + 1));
  FIL_RETURN_IF_ERROR(check_multiple("k", k, group_size, "group_size"));
  return check_elements("n * k", n, k);
}

// [a, a + a_bytes) and [b, b + b_bytes) share no byte.
Status check_disjoint(const char* a_name, const void* a, int64_t a_bytes, const char* b_name,
                      const void* b, int64_t b_bytes) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  if (pa < pb + static_cast<uintptr_t>(b_bytes) && pb < pa + static_cast<uintptr_t>(a_bytes))
    return invalid_value(a_name, " must not overlap ", b_name);
  return Status::Ok();
}

Status check_weight(const Context& ctx, const Int4Weight& w) {
  FIL_RETURN_IF_ERROR(check_not_null("qweight", w.qweight));
  FIL_RETURN_IF_ERROR(check_not_null("scales", w.scales));
  FIL_RETURN_IF_ERROR(check_not_null("offsets", w.offsets));
  FIL_RETURN_IF_ERROR(check_sizes(w.n, w.k, w.group_size));
  // 16-byte loads of qweight rows on CUDA; rows stay aligned because k / 2 bytes is a
  // multiple of 16.
  FIL_RETURN_IF_ERROR(check_aligned("qweight", w.qweight, ctx.device == Device::kCUDA ? 16 : 4));
  FIL_RETURN_IF_ERROR(check_aligned("scales", w.scales, 2));
  FIL_RETURN_IF_ERROR(check_aligned("offsets", w.offsets, 2));
  return Status::Ok();
}

// out must share no byte with the packed weight.
Status check_out_vs_weight(const void* out, int64_t out_bytes, const Int4Weight& w) {
  const int64_t groups_bytes = w.n * (w.k / w.group_size) * 2;
  FIL_RETURN_IF_ERROR(check_disjoint("out", out, out_bytes, "qweight", w.qweight, w.n * w.k / 2));
  FIL_RETURN_IF_ERROR(check_disjoint("out", out, out_bytes, "scales", w.scales, groups_bytes));
  return check_disjoint("out", out, out_bytes, "offsets", w.offsets, groups_bytes);
}

}  // namespace

Status quantize_int4(const Context& ctx, DType dtype, const void* w, int64_t n, int64_t k,
                     int64_t group_size, int32_t* qweight, void* scales, void* offsets) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_weight_dtype("w", dtype));
  FIL_RETURN_IF_ERROR(check_not_null("w", w));
  FIL_RETURN_IF_ERROR(check_not_null("qweight", qweight));
  FIL_RETURN_IF_ERROR(check_not_null("scales", scales));
  FIL_RETURN_IF_ERROR(check_not_null("offsets", offsets));
  FIL_RETURN_IF_ERROR(check_sizes(n, k, group_size));
  FIL_RETURN_IF_ERROR(check_aligned("w", w, dtype_size(dtype)));
  FIL_RETURN_IF_ERROR(check_aligned("qweight", qweight, 4));
  FIL_RETURN_IF_ERROR(check_aligned("scales", scales, 2));
  FIL_RETURN_IF_ERROR(check_aligned("offsets", offsets, 2));
  const int64_t w_bytes = n * k * dtype_size(dtype), g_bytes = n * (k / group_size) * 2;
  FIL_RETURN_IF_ERROR(check_disjoint("qweight", qweight, n * k / 2, "w", w, w_bytes));
  FIL_RETURN_IF_ERROR(check_disjoint("scales", scales, g_bytes, "w", w, w_bytes));
  FIL_RETURN_IF_ERROR(check_disjoint("offsets", offsets, g_bytes, "w", w, w_bytes));
  FIL_RETURN_IF_ERROR(check_disjoint("scales", scales, g_bytes, "qweight", qweight, n * k / 2));
  FIL_RETURN_IF_ERROR(check_disjoint("offsets", offsets, g_bytes, "qweight", qweight, n * k / 2));
  FIL_RETURN_IF_ERROR(check_disjoint("offsets", offsets, g_bytes, "scales", scales, g_bytes));
  FIL_DISPATCH_CUDA(ctx, "quantize_int4",
                    cuda::quantize_int4(ctx, dtype, w, n, k, group_size, qweight, scales, offsets));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    return quantize_int4_cpu(static_cast<const T*>(w), n, k, group_size, qweight,
                             static_cast<uint16_t*>(scales), static_cast<uint16_t*>(offsets));
  });
}

Status dequantize_int4(const Context& ctx, DType dtype, void* out, const Int4Weight& w) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_weight_dtype("out", dtype));
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
  FIL_RETURN_IF_ERROR(check_weight(ctx, w));
  FIL_RETURN_IF_ERROR(check_aligned("out", out, dtype_size(dtype)));
  FIL_RETURN_IF_ERROR(check_out_vs_weight(out, w.n * w.k * dtype_size(dtype), w));
  FIL_DISPATCH_CUDA(ctx, "dequantize_int4", cuda::dequantize_int4(ctx, dtype, out, w));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dequantize_int4_cpu(static_cast<T*>(out), w);
  });
}

Status int4_gemm(const Context& ctx, DType dtype, void* out, const void* x, int64_t m,
                 const Int4Weight& w) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_activation_dtype(ctx, "x", dtype));
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
  FIL_RETURN_IF_ERROR(check_not_null("x", x));
  FIL_RETURN_IF_ERROR(check_weight(ctx, w));
  FIL_RETURN_IF_ERROR(check_range("m", m, 1, kMaxDim + 1));
  FIL_RETURN_IF_ERROR(check_elements("m * k", m, w.k));
  FIL_RETURN_IF_ERROR(check_elements("m * n", m, w.n));
  const int64_t es = dtype_size(dtype);
  // 16-byte loads of x rows on CUDA (k * 2 bytes is a multiple of 64, so rows stay aligned).
  FIL_RETURN_IF_ERROR(check_aligned("x", x, ctx.device == Device::kCUDA ? 16 : es));
  FIL_RETURN_IF_ERROR(check_aligned("out", out, es));
  FIL_RETURN_IF_ERROR(check_disjoint("out", out, m * w.n * es, "x", x, m * w.k * es));
  FIL_RETURN_IF_ERROR(check_out_vs_weight(out, m * w.n * es, w));
  FIL_DISPATCH_CUDA(ctx, "int4_gemm", cuda::int4_gemm(ctx, dtype, out, x, m, w));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    return int4_gemm_cpu(static_cast<T*>(out), static_cast<const T*>(x), m, w);
  });
}

}  // namespace fastinternlm
