// RMSNorm: argument checks, dispatch, and the CPU reference implementation.
#include "fastinternlm/rms_norm.h"

#include <cmath>

#include "check.h"
#include "half.h"
#include "kernels_cuda.h"

namespace fastinternlm {
namespace {

template <typename T>
void rms_norm_cpu(T* out, T* residual, const T* x, const T* weight, int64_t rows, int64_t hidden,
                  float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * hidden;
    T* rr = residual ? residual + r * hidden : nullptr;
    T* out_r = out + r * hidden;
    // Pass 1 finishes the residual update and the sum of squares before pass 2 writes
    // `out`, which may alias x.
    double sum = 0.0;
    for (int64_t i = 0; i < hidden; ++i) {
      float v = to_float(xr[i]);
      if (rr) {
        v = round_to<T>(to_float(rr[i]) + v);
        rr[i] = from_float<T>(v);
      }
      sum += static_cast<double>(v) * v;
    }
    const float inv_rms = 1.0f / std::sqrt(static_cast<float>(sum / hidden) + eps);
    const T* src = rr ? rr : xr;
    for (int64_t i = 0; i < hidden; ++i) {
      const float normed = round_to<T>(to_float(src[i]) * inv_rms);
      out_r[i] = from_float<T>(normed * to_float(weight[i]));
    }
  }
}

Status check_rms_norm(const Context& ctx, DType dtype, const void* out, const void* residual,
                      bool fused, const void* x, const void* weight, int64_t rows, int64_t hidden,
                      float eps) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_activation_dtype(ctx, "x", dtype));
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
  FIL_RETURN_IF_ERROR(check_not_null("x", x));
  FIL_RETURN_IF_ERROR(check_not_null("weight", weight));
  if (fused) FIL_RETURN_IF_ERROR(check_not_null("residual", residual));
  FIL_RETURN_IF_ERROR(check_positive("rows", rows));
  FIL_RETURN_IF_ERROR(check_positive("hidden", hidden));
  if (!(eps >= 0.0f) || !std::isfinite(eps))
    return invalid_value("eps must be a finite number >= 0, got ", eps);
  if (fused && residual == x) return invalid_value("residual must not alias x");
  if (fused && residual == out) return invalid_value("out must not alias residual");
  return Status::Ok();
}

Status run(const Context& ctx, DType dtype, void* out, void* residual, const void* x,
           const void* weight, int64_t rows, int64_t hidden, float eps) {
  FIL_DISPATCH_CUDA(ctx, "rms_norm",
                    cuda::rms_norm(ctx, dtype, out, residual, x, weight, rows, hidden, eps));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_cpu(static_cast<T*>(out), static_cast<T*>(residual), static_cast<const T*>(x),
                 static_cast<const T*>(weight), rows, hidden, eps);
    return Status::Ok();
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
