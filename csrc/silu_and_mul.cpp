// SiLU-and-mul: argument checks, dispatch, CPU reference.
#include "fastinternlm/silu_and_mul.h"

#include <cmath>

#include "check.h"
#include "half.h"
#include "kernels_cuda.h"

namespace fastinternlm {
namespace {

template <typename T>
void silu_and_mul_cpu(T* out, const T* x, int64_t rows, int64_t ffn) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = x + r * 2 * ffn;
    const T* up = gate + ffn;
    T* o = out + r * ffn;
    for (int64_t i = 0; i < ffn; ++i) {
      const float g = to_float(gate[i]);
      // silu rounded to T first, as HF's act_fn(gate) * up stores silu's result in T.
      const float silu = round_to<T>(g / (1.0f + std::exp(-g)));
      o[i] = from_float<T>(silu * to_float(up[i]));
    }
  }
}

}  // namespace

Status silu_and_mul(const Context& ctx, DType dtype, void* out, const void* x, int64_t rows,
                    int64_t ffn) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_activation_dtype(ctx, "x", dtype));
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
  FIL_RETURN_IF_ERROR(check_not_null("x", x));
  FIL_RETURN_IF_ERROR(check_positive("rows", rows));
  FIL_RETURN_IF_ERROR(check_positive("ffn", ffn));
  FIL_DISPATCH_CUDA(ctx, "silu_and_mul", cuda::silu_and_mul(ctx, dtype, out, x, rows, ffn));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_cpu(static_cast<T*>(out), static_cast<const T*>(x), rows, ffn);
    return Status::Ok();
  });
}

}  // namespace fastinternlm
