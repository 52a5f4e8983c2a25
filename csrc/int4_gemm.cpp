// Int4 weight-only quantization and GEMM: argument checks, dispatch, and the CPU reference
// implementation.
#include "fastinternlm/int4_gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cpu_tiers.h"
#include "half.h"
#include "kernels_cuda.h"
#include "parallel.h"

// The buffered path (many rows of x) also has an AVX-512 tier; the fused one keeps v3.
#define FIL_TIER_KERNELS "int4_gemm_cpu.inc"
#define FIL_TIER_WITH_V4 1
#include "cpu_tiers.inc"
#undef FIL_TIER_WITH_V4
#undef FIL_TIER_KERNELS

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

// The first (lowest row, then group) value outside the float16 range, if any.
struct QuantizeError {
  int64_t row = -1, group = -1;
  float value = 0.0f;
};

// Rows [r0, r1); returns at the first bad value, which is that range's lowest.
template <typename T>
void quantize_rows(const T* w, int64_t r0, int64_t r1, int64_t k, int64_t group_size,
                   int32_t* qweight, uint16_t* scales, uint16_t* offsets, QuantizeError* error) {
  const int64_t groups = k / group_size;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* src = w + r * k + g * group_size;
      float lo = to_float(src[0]), hi = lo;
      for (int64_t i = 0; i < group_size; ++i) {
        const float v = to_float(src[i]);
        // !(|v| <= max) also catches NaN.
        if (!(std::fabs(v) <= kHalfMax)) {
          *error = QuantizeError{r, g, v};
          return;
        }
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
}

template <typename T>
Status quantize_int4_cpu(const T* w, int64_t n, int64_t k, int64_t group_size, int32_t* qweight,
                         uint16_t* scales, uint16_t* offsets) {
  const int slots = get_num_threads();
  std::vector<QuantizeError> errors;
  try {
    errors.resize(static_cast<size_t>(slots));
  } catch (const std::exception&) {
    return invalid_value("quantize_int4: cannot allocate CPU scratch");
  }
  // Rows are independent; each slot keeps the first error of the rows it ran, and the
  // lowest row among them is the one reported, as a sequential pass would.
  parallel_for_slots(n, 8 * k, slots, [&](int64_t r0, int64_t r1, int slot) {
    QuantizeError& e = errors[static_cast<size_t>(slot)];
    QuantizeError local;
    quantize_rows(w, r0, r1, k, group_size, qweight, scales, offsets, &local);
    if (local.row >= 0 && (e.row < 0 || local.row < e.row)) e = local;
  });
  const QuantizeError* first = nullptr;
  for (const QuantizeError& e : errors)
    if (e.row >= 0 && (first == nullptr || e.row < first->row)) first = &e;
  if (first != nullptr) {
    const int64_t g = first->group;
    return invalid_value("w must be finite and within the float16 range (|w| <= 65504) for "
                         "int4 scales and offsets, got ", first->value, " in row ", first->row,
                         ", group ", g, " (input channels ", g * group_size, "..",
                         (g + 1) * group_size - 1, ")");
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
  const int slots = get_num_threads();
  Scratch<float> rows;
  if (!rows.allocate(slots * w.k))
    return invalid_value("dequantize_int4: cannot allocate ", slots * w.k * 4, " bytes of CPU scratch");
  parallel_for_slots(w.n, 2 * w.k, slots, [&](int64_t r0, int64_t r1, int slot) {
    float* row = rows.data() + slot * w.k;
    for (int64_t r = r0; r < r1; ++r) {
      dequantize_row(w.qweight + r * (w.k / 8), s + r * groups, m + r * groups, w.k, w.group_size, row);
      for (int64_t i = 0; i < w.k; ++i) out[r * w.k + i] = from_float<T>(row[i]);
    }
  });
  return Status::Ok();
}

// The CPU GEMM. Lane layout and order of the float32 arithmetic, fixed so that every
// output has the same bits whatever the thread count or the number of rows of x (and the
// CPU tier, see cpu_tiers.h):
//   - Lane l of an 8-lane accumulator takes the input channels c with c % 8 = l, i.e.
//     nibble l of every packed word.
//   - Each weight is w = fma(q, s, m), which equals q * s + m rounded once (q * s is
//     exact), the dequantize_int4 value.
//   - Each lane accumulates acc = fma(w, x, acc) over the words in order, from +0 (a
//     rounded product, then a rounded sum, in the generic tier on x86, which has no FMA).
//   - out = dtype(((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))).
// Few rows of x stream the nibbles and dequantize in registers; many rows dequantize a
// panel of W rows once into float32 and reuse it for every row of x. Work is split over
// output channels.
constexpr int64_t kPanelCols = 16;    // rows of W (output channels) per work item
constexpr int64_t kBufferedRows = 4;  // rows of x from which dequantizing once pays off

template <typename T>
Status int4_gemm_cpu(T* out, const T* x, int64_t m, const Int4Weight& w) {
  const int64_t n = w.n, k = w.k, groups = k / w.group_size;
  const bool buffered = m >= kBufferedRows;
  const int slots = get_num_threads();
  const int64_t per_slot = kPanelCols * (2 * groups + (buffered ? k : 0));
  constexpr bool kConvert = !std::is_same<T, float>::value;
  Scratch<float> xf, scratch;
  if ((kConvert && !xf.allocate(m * k)) || !scratch.allocate(slots * per_slot))
    return invalid_value("int4_gemm: cannot allocate ", ((kConvert ? m * k : 0) + slots * per_slot) * 4,
                         " bytes of CPU scratch");
  const float* xs = reinterpret_cast<const float*>(x);
  if (kConvert) {
    const auto convert = FIL_TIER_SELECT(convert_rows<T>);
    parallel_for(m, 2 * k, [&](int64_t r0, int64_t r1) {
      convert(x + r0 * k, (r1 - r0) * k, xf.data() + r0 * k);
    });
    xs = xf.data();
  }
  // Only the buffered path has 16-lane kernels (two outputs per register); the fused
  // path stays on the v3 code.
  const auto columns = buffered ? FIL_TIER_SELECT_V4(gemm_columns<T>) : FIL_TIER_SELECT(gemm_columns<T>);
  const auto* s = static_cast<const uint16_t*>(w.scales);
  const auto* o = static_cast<const uint16_t*>(w.offsets);
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
  parallel_for_slots(panels, kPanelCols * m * k, slots, [&](int64_t p0, int64_t p1, int slot) {
    float* scr = scratch.data() + slot * per_slot;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanelCols, n1 = std::min(n, n0 + kPanelCols);
      columns(out, xs, m, w.qweight, s, o, n, k, w.group_size, n0, n1, buffered, scr);
    }
  });
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

Status check_weight(const Context& ctx, const Int4Weight& w) {
  // Sizes first: a zero size is the cause of a null pointer, and its message says which.
  FIL_RETURN_IF_ERROR(check_sizes(w.n, w.k, w.group_size));
  FIL_RETURN_IF_ERROR(check_not_null("qweight", w.qweight));
  FIL_RETURN_IF_ERROR(check_not_null("scales", w.scales));
  FIL_RETURN_IF_ERROR(check_not_null("offsets", w.offsets));
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

namespace {
// Relaxed atomic: only a benchmark changes it, between calls; a call sees the old or the
// new value, both valid.
std::atomic<int> g_small_m_variant{0};
}  // namespace

Status set_int4_gemm_small_m_variant(int variant) {
  if (variant < 0 || variant >= kInt4SmallMVariants)
    return invalid_value("set_int4_gemm_small_m_variant: variant must be in [0, ",
                         kInt4SmallMVariants, "), got ", variant);
  g_small_m_variant.store(variant, std::memory_order_relaxed);
  return Status();
}

int int4_gemm_small_m_variant() { return g_small_m_variant.load(std::memory_order_relaxed); }

Status quantize_int4(const Context& ctx, DType dtype, const void* w, int64_t n, int64_t k,
                     int64_t group_size, int32_t* qweight, void* scales, void* offsets) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_weight_dtype("w", dtype));
  FIL_RETURN_IF_ERROR(check_sizes(n, k, group_size));
  FIL_RETURN_IF_ERROR(check_not_null("w", w));
  FIL_RETURN_IF_ERROR(check_not_null("qweight", qweight));
  FIL_RETURN_IF_ERROR(check_not_null("scales", scales));
  FIL_RETURN_IF_ERROR(check_not_null("offsets", offsets));
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
  FIL_RETURN_IF_ERROR(check_weight(ctx, w));
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
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
  FIL_RETURN_IF_ERROR(check_range("m", m, 1, kMaxDim + 1));
  FIL_RETURN_IF_ERROR(check_weight(ctx, w));
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
  FIL_RETURN_IF_ERROR(check_not_null("x", x));
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
