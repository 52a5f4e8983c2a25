// Rotary embedding and the dynamic-NTK base: argument checks, dispatch, CPU reference.
#include "fastinternlm/rotary.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "check.h"
#include "cpu_tiers.h"
#include "half.h"
#include "kernels_cuda.h"
#include "parallel.h"

namespace fastinternlm {
namespace {

// HF's float32 steps: inv_freq = 1 / base^(2i/D), angle = pos * inv_freq. The power is
// evaluated in double and rounded once (the correctly rounded float32 power that torch's
// CPU pow also gives, nearly always): one ulp of inv_freq moves the angle by 1e-3 rad at
// 32K positions, so "close" is not enough here.
void inverse_frequencies(float base, int64_t head_dim, float* inv_freq) {
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    const float power = static_cast<float>(
        std::pow(static_cast<double>(base), static_cast<double>(2 * i) / static_cast<double>(head_dim)));
    inv_freq[i] = 1.0f / power;
  }
}

}  // namespace
}  // namespace fastinternlm

#define FIL_TIER_KERNELS "rotary_cpu.inc"
#include "cpu_tiers.inc"
#undef FIL_TIER_KERNELS

namespace fastinternlm {
namespace {

// Per token: angle_i = float(position) * inv_freq_i; cos/sin in float32 (libm), rounded to
// T as HF casts them to the activation dtype. Per pair (x1, x2) = (x[i], x[i + D/2]) of
// every head: x1' = dtype(dtype(x1 c) - dtype(x2 s)), x2' = dtype(dtype(x2 c) + dtype(x1 s)):
// HF rotates in the activation dtype, each product rounded, then the sum, which keeps our
// output bit-identical to HF's wherever float32 cos/sin agree (what lets the end-to-end
// tests compare greedy tokens). Tokens are spread over threads.
template <typename T, typename P>
Status rotary_cpu(T* q, T* k, const P* positions, const float* bases, float base, int64_t tokens,
                  int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
  const int slots = get_num_threads();
  Scratch<float> inv_freq, scratch;
  const int64_t per_slot = 5 * head_dim;  // per-token frequencies, cos/sin, rotation buffers
  if (!inv_freq.allocate(head_dim / 2) || !scratch.allocate(slots * per_slot))
    return invalid_value("rotary_embedding: cannot allocate CPU scratch");
  if (bases == nullptr) inverse_frequencies(base, head_dim, inv_freq.data());
  const auto kernel = FIL_TIER_SELECT(rotary_tokens<T, P>);
  parallel_for_slots(tokens, (q_heads + kv_heads) * head_dim * 8 + head_dim * 20, slots,
                     [&](int64_t t0, int64_t t1, int slot) {
    float* scr = scratch.data() + slot * per_slot;
    kernel(q, k, positions, bases, inv_freq.data(), t0, t1, q_heads, kv_heads, head_dim, scr,
           scr + head_dim);
  });
  return Status::Ok();
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
  // Sizes first: a zero size is the cause of a null pointer, and its message says which.
  FIL_RETURN_IF_ERROR(check_positive("tokens", tokens));
  FIL_RETURN_IF_ERROR(check_positive("q_heads", q_heads));
  FIL_RETURN_IF_ERROR(check_positive("kv_heads", kv_heads));
  FIL_RETURN_IF_ERROR(check_positive("head_dim", head_dim));
  if (head_dim % 2 != 0 || head_dim > 256)
    return invalid_value("head_dim must be even and at most 256, got ", head_dim);
  // Byte counts below stay in int64: heads times head_dim times 2 bytes per element.
  if (q_heads > (int64_t{1} << 40) || kv_heads > (int64_t{1} << 40) ||
      tokens > std::numeric_limits<int64_t>::max() / ((q_heads + kv_heads) * head_dim * 8))
    return invalid_value("tokens * (q_heads + kv_heads) * head_dim must fit in int64 bytes, got ", tokens,
                         " * (", q_heads, " + ", kv_heads, ") * ", head_dim);
  FIL_RETURN_IF_ERROR(check_not_null("q", q));
  FIL_RETURN_IF_ERROR(check_not_null("k", k));
  FIL_RETURN_IF_ERROR(check_not_null("positions", positions));
  // Both are rotated in place: a byte they share would be rotated twice.
  const int64_t es = dtype_size(dtype);
  FIL_RETURN_IF_ERROR(check_disjoint("q", q, tokens * q_heads * head_dim * es, "k", k, tokens * kv_heads * head_dim * es));
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
      return rotary_cpu(static_cast<T*>(q), static_cast<T*>(k), static_cast<const int32_t*>(positions),
                        bases, base, tokens, q_heads, kv_heads, head_dim);
    return rotary_cpu(static_cast<T*>(q), static_cast<T*>(k), static_cast<const int64_t*>(positions),
                      bases, base, tokens, q_heads, kv_heads, head_dim);
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
  const double base = theta * std::pow(ratio, static_cast<double>(head_dim) / static_cast<double>(head_dim - 2));
  // The rotary kernels take the base as float32: a larger one (or inf) rotates nothing
  // meaningful, so it is refused with the numbers that produced it.
  if (!(base <= static_cast<double>(std::numeric_limits<float>::max())))
    return invalid_value("ntk_base: theta * (factor * length / max_position_embeddings - (factor - 1)) ^ "
                         "(head_dim / (head_dim - 2)) must be a finite float32 (<= 3.4e38), got ", theta, " * (",
                         factor, " * ", length, " / ", max_position_embeddings, " - ", factor - 1.0, ") ^ (",
                         head_dim, " / ", head_dim - 2, ") = ", base);
  *out = base;
  return Status::Ok();
}

}  // namespace fastinternlm
