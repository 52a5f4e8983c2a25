// Rotary embedding and the dynamic-NTK base: argument checks, dispatch, CPU reference.
#include "fastinternlm/rotary.h"

#include <cmath>
#include <vector>

#include "check.h"
#include "half.h"
#include "kernels_cuda.h"

namespace fastinternlm {
namespace {

// HF rotates in the activation dtype: cos/sin are rounded to T, each product is rounded,
// then the sum. Doing the same keeps our output bit-identical to HF's wherever float32
// cos/sin agree, which is what lets the end-to-end tests compare greedy tokens.
template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t head_dim, const float* cos_t, const float* sin_t) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    T* row = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_float(row[i]), x2 = to_float(row[i + half]);
      const float c = cos_t[i], s = sin_t[i];
      row[i] = from_float<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
      row[i + half] = from_float<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
    }
  }
}

template <typename T, typename P>
void rotary_cpu(T* q, T* k, const P* positions, const float* bases, float base, int64_t tokens,
                int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  std::vector<float> cos_t(half), sin_t(half);
  for (int64_t t = 0; t < tokens; ++t) {
    const float b = bases ? bases[t] : base;
    const float pos = static_cast<float>(positions[t]);
    for (int64_t i = 0; i < half; ++i) {
      // HF's float32 steps: inv_freq = 1 / base^(2i/D), angle = pos * inv_freq. The power
      // is evaluated in double and rounded once (the correctly rounded float32 power that
      // torch's CPU pow also gives, nearly always): one ulp of inv_freq moves the angle
      // by 1e-3 rad at 32K positions, so "close" is not enough here.
      const float power = static_cast<float>(
          std::pow(static_cast<double>(b), static_cast<double>(2 * i) / static_cast<double>(head_dim)));
      const float inv_freq = 1.0f / power;
      const float angle = pos * inv_freq;
      cos_t[i] = round_to<T>(std::cos(angle));
      sin_t[i] = round_to<T>(std::sin(angle));
    }
    rotate_heads(q + t * q_heads * head_dim, q_heads, head_dim, cos_t.data(), sin_t.data());
    rotate_heads(k + t * kv_heads * head_dim, kv_heads, head_dim, cos_t.data(), sin_t.data());
  }
}

Status check_base_value(const char* name, float b) {
  if (!(b > 0.0f) || !std::isfinite(b)) return invalid_value(name, " must be a finite number > 0, got ", b);
  return Status::Ok();
}

}  // namespace

Status rotary_embedding(const Context& ctx, DType dtype, void* q, void* k, const void* positions,
                        DType positions_dtype, const float* bases, float base, int64_t tokens,
                        int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_activation_dtype(ctx, "q", dtype));
  if (positions_dtype != DType::kInt32 && positions_dtype != DType::kInt64)
    return invalid_type("positions must be int32 or int64, got ", dtype_name(positions_dtype));
  FIL_RETURN_IF_ERROR(check_not_null("q", q));
  FIL_RETURN_IF_ERROR(check_not_null("k", k));
  FIL_RETURN_IF_ERROR(check_not_null("positions", positions));
  FIL_RETURN_IF_ERROR(check_positive("tokens", tokens));
  FIL_RETURN_IF_ERROR(check_positive("q_heads", q_heads));
  FIL_RETURN_IF_ERROR(check_positive("kv_heads", kv_heads));
  FIL_RETURN_IF_ERROR(check_positive("head_dim", head_dim));
  if (head_dim % 2 != 0 || head_dim > 256)
    return invalid_value("head_dim must be even and at most 256, got ", head_dim);
  if (q == k) return invalid_value("q and k must not alias");
  if (bases == nullptr) FIL_RETURN_IF_ERROR(check_base_value("base", base));
  if (ctx.device == Device::kCPU && bases != nullptr) {
    for (int64_t t = 0; t < tokens; ++t) FIL_RETURN_IF_ERROR(check_base_value("bases[t]", bases[t]));
  }
  FIL_DISPATCH_CUDA(ctx, "rotary_embedding",
                    cuda::rotary_embedding(ctx, dtype, q, k, positions, positions_dtype, bases, base,
                                           tokens, q_heads, kv_heads, head_dim));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (positions_dtype == DType::kInt32)
      rotary_cpu(static_cast<T*>(q), static_cast<T*>(k), static_cast<const int32_t*>(positions), bases,
                 base, tokens, q_heads, kv_heads, head_dim);
    else
      rotary_cpu(static_cast<T*>(q), static_cast<T*>(k), static_cast<const int64_t*>(positions), bases,
                 base, tokens, q_heads, kv_heads, head_dim);
    return Status::Ok();
  });
}

Status ntk_base(double theta, double factor, int64_t max_position_embeddings, int64_t length,
                int64_t head_dim, double* out) {
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
  if (!(theta > 0.0) || !std::isfinite(theta)) return invalid_value("theta must be a finite number > 0, got ", theta);
  if (!(factor >= 1.0) || !std::isfinite(factor))
    return invalid_value("factor must be a finite number >= 1, got ", factor);
  FIL_RETURN_IF_ERROR(check_positive("max_position_embeddings", max_position_embeddings));
  FIL_RETURN_IF_ERROR(check_positive("length", length));
  if (head_dim <= 2 || head_dim % 2 != 0) return invalid_value("head_dim must be even and > 2, got ", head_dim);
  if (length <= max_position_embeddings) {
    *out = theta;
    return Status::Ok();
  }
  // HF's DynamicNTK formula, in double as the Python code computes it.
  const double ratio = factor * static_cast<double>(length) / static_cast<double>(max_position_embeddings) -
                       (factor - 1.0);
  *out = theta * std::pow(ratio, static_cast<double>(head_dim) / static_cast<double>(head_dim - 2));
  return Status::Ok();
}

}  // namespace fastinternlm
