// RMSNorm: argument checks, dispatch, and the CPU reference implementation.
#include "fastinternlm/rms_norm.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "check.h"
#include "cpu_tiers.h"
#include "half.h"
#include "kernels_cuda.h"
#include "parallel.h"

#define FIL_TIER_KERNELS "rms_norm_cpu.inc"
#include "cpu_tiers.inc"
#undef FIL_TIER_KERNELS

namespace fastinternlm {
namespace {

// Per element, as HF's float32 code: v = x (or residual = dtype(residual + x), v = that);
// the row's sum of v^2 in double (eight partial sums, see rms_norm_cpu.inc; each square is
// exact, and the double sum is far below float32's rounding of the mean);
// inv_rms = 1 / sqrt(float(sum / hidden) + eps) in float32;
// out = dtype(dtype(v * inv_rms) * weight). Rows are spread over threads.
template <typename T>
Status rms_norm_cpu(T* out, T* residual, const T* x, const T* weight, int64_t rows, int64_t hidden,
                    float eps) {
  const int slots = get_num_threads();
  constexpr bool kConvert = !std::is_same<T, float>::value;
  Scratch<float> wf, buf;
  if (kConvert && (!wf.allocate(hidden) || !buf.allocate(slots * 2 * hidden)))
    return invalid_value("rms_norm: cannot allocate CPU scratch for hidden = ", hidden);
  const float* w = reinterpret_cast<const float*>(weight);
  if (kConvert) {
    FIL_TIER_SELECT(weight_to_floats<T>)(weight, hidden, wf.data());
    w = wf.data();
  }
  const auto kernel = FIL_TIER_SELECT(rms_norm_rows<T>);
  parallel_for_slots(rows, 16 * hidden, slots, [&](int64_t r0, int64_t r1, int slot) {
    kernel(out, residual, x, w, r0, r1, hidden, eps, kConvert ? buf.data() + slot * 2 * hidden : nullptr);
  });
  return Status::Ok();
}

Status check_rms_norm(const Context& ctx, DType dtype, const void* out, const void* residual,
                      bool fused, const void* x, const void* weight, int64_t rows, int64_t hidden,
                      float eps) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_activation_dtype(ctx, "x", dtype));
  // Sizes first: a zero size is the cause of a null pointer, and its message says which.
  FIL_RETURN_IF_ERROR(check_positive("rows", rows));
  FIL_RETURN_IF_ERROR(check_positive("hidden", hidden));
  if (rows > std::numeric_limits<int64_t>::max() / hidden / 8)
    return invalid_value("rows * hidden must fit in int64 bytes, got ", rows, " * ", hidden);
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
  FIL_RETURN_IF_ERROR(check_not_null("x", x));
  FIL_RETURN_IF_ERROR(check_not_null("weight", weight));
  if (fused) FIL_RETURN_IF_ERROR(check_not_null("residual", residual));
  if (!(eps >= 0.0f) || !std::isfinite(eps))
    return invalid_value("eps must be a finite number >= 0, got ", eps);
  // out may be x itself (each row is read whole before it is written) but not a shifted
  // view of it; residual is written in place, so it may share no byte with anything.
  const int64_t bytes = rows * hidden * dtype_size(dtype), w_bytes = hidden * dtype_size(dtype);
  if (out != x) FIL_RETURN_IF_ERROR(check_disjoint("out", out, bytes, "x", x, bytes));
  FIL_RETURN_IF_ERROR(check_disjoint("out", out, bytes, "weight", weight, w_bytes));
  if (fused) {
    FIL_RETURN_IF_ERROR(check_disjoint("residual", residual, bytes, "x", x, bytes));
    FIL_RETURN_IF_ERROR(check_disjoint("residual", residual, bytes, "out", out, bytes));
    FIL_RETURN_IF_ERROR(check_disjoint("residual", residual, bytes, "weight", weight, w_bytes));
  }
  return Status::Ok();
}

Status run(const Context& ctx, DType dtype, void* out, void* residual, const void* x,
           const void* weight, int64_t rows, int64_t hidden, float eps) {
  FIL_DISPATCH_CUDA(ctx, "rms_norm",
                    cuda::rms_norm(ctx, dtype, out, residual, x, weight, rows, hidden, eps));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    return rms_norm_cpu(static_cast<T*>(out), static_cast<T*>(residual), static_cast<const T*>(x),
                        static_cast<const T*>(weight), rows, hidden, eps);
  });
}

}  // namespace

Status rms_norm(const Context& ctx, DType dtype, void* out, const void* x, const void* weight,
                int64_t rows, int64_t hidden, float eps) {
  FIL_RETURN_IF_ERROR(check_rms_norm(ctx, dtype, out, nullptr, false, x, weight, rows, hidden, eps));
  return run(ctx, dtype, out, nullptr, x, weight, rows, hidden, eps);
}

Status add_rms_norm(const Context& ctx, DType dtype, void* out, void* residual, const void* x,
                    const void* weight, int64_t rows, int64_t hidden, float eps) {
  FIL_RETURN_IF_ERROR(check_rms_norm(ctx, dtype, out, residual, true, x, weight, rows, hidden, eps));
  return run(ctx, dtype, out, residual, x, weight, rows, hidden, eps);
}

}  // namespace fastinternlm
