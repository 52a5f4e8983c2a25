// Attention over the KV cache: argument checks, dispatch, and the CPU reference.
//
// The CPU path is the oracle the CUDA kernels are tested against and what runs small
// models without a GPU, so it is plain and exact-ish: per KV head, the needed cache rows
// are converted to float32 once and shared by the group's query heads; scores go into a
// buffer, the softmax subtracts the exact maximum (no running maximum is needed when all
// scores are at hand), and the weighted sum runs over contiguous head_dim vectors that
// the compiler can vectorise.
#include "fastinternlm/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "half.h"
#include "kernels_cuda.h"

namespace fastinternlm {
namespace {

constexpr int64_t kMaxGroup = 8;

// Eight independent partial sums: a single running sum would serialise on the add
// latency and cannot be vectorised without reassociation, which the compiler will not do
// for floats on its own. head_dim is a multiple of 8.
inline float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; i += 8)
    for (int e = 0; e < 8; ++e) s[e] += a[i + e] * b[i + e];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename T>
void to_float_rows(float* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// One query row q[d] attends over keys/values kf, vf [len, d] (float32): out = softmax(scale *
// q.k) . v, rounded once to T.
template <typename T>
void attend_row(T* out, const T* q, const float* kf, const float* vf, int64_t len, int64_t d,
                float scale, std::vector<float>& qf, std::vector<float>& scores,
                std::vector<float>& acc) {
  for (int64_t i = 0; i < d; ++i) qf[i] = to_float(q[i]) * scale;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < len; ++j) {
    scores[j] = dot(qf.data(), kf + j * d, d);
    m = std::max(m, scores[j]);
  }
  std::fill(acc.begin(), acc.begin() + d, 0.0f);
  float sum = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    const float p = std::exp(scores[j] - m);
    sum += p;
    const float* vj = vf + j * d;
    for (int64_t i = 0; i < d; ++i) acc[i] += p * vj[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < d; ++i) out[i] = from_float<T>(acc[i] * inv);
}

template <typename T>
T* cache_row(void* base, const KVCache& c, int64_t slot, int64_t head, int64_t pos) {
  return static_cast<T*>(base) + ((slot * c.kv_heads + head) * c.max_seq + pos) * c.head_dim;
}

template <typename T>
void prefill_cpu(T* out, const T* q, const T* k, const T* v, const KVCache& c, int64_t tokens,
                 int64_t q_heads, int64_t slot, int64_t start, float scale) {
  const int64_t d = c.head_dim, hkv = c.kv_heads, group = q_heads / hkv;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < hkv; ++h) {
      std::copy(k + (t * hkv + h) * d, k + (t * hkv + h + 1) * d,
                cache_row<T>(c.k, c, slot, h, start + t));
      std::copy(v + (t * hkv + h) * d, v + (t * hkv + h + 1) * d,
                cache_row<T>(c.v, c, slot, h, start + t));
    }
  const int64_t len = start + tokens;
  std::vector<float> kf(len * d), vf(len * d), qf(d), scores(len), acc(d);
  for (int64_t h = 0; h < hkv; ++h) {
    to_float_rows(kf.data(), cache_row<T>(c.k, c, slot, h, 0), len * d);
    to_float_rows(vf.data(), cache_row<T>(c.v, c, slot, h, 0), len * d);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t g = 0; g < group; ++g) {
        const int64_t row = t * q_heads + h * group + g;
        attend_row(out + row * d, q + row * d, kf.data(), vf.data(), start + t + 1, d, scale, qf,
                   scores, acc);
      }
  }
}

template <typename T>
void decode_cpu(T* out, const T* q, const T* k, const T* v, const KVCache& c, int64_t batch,
                int64_t q_heads, const int32_t* slots, const int32_t* positions, float scale) {
  const int64_t d = c.head_dim, hkv = c.kv_heads, group = q_heads / hkv;
  std::vector<float> kf, vf, qf(d), scores, acc(d);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t slot = slots[b], pos = positions[b], len = pos + 1;
    kf.resize(len * d);
    vf.resize(len * d);
    scores.resize(len);
    for (int64_t h = 0; h < hkv; ++h) {
      std::copy(k + (b * hkv + h) * d, k + (b * hkv + h + 1) * d, cache_row<T>(c.k, c, slot, h, pos));
      std::copy(v + (b * hkv + h) * d, v + (b * hkv + h + 1) * d, cache_row<T>(c.v, c, slot, h, pos));
      to_float_rows(kf.data(), cache_row<T>(c.k, c, slot, h, 0), len * d);
      to_float_rows(vf.data(), cache_row<T>(c.v, c, slot, h, 0), len * d);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t row = b * q_heads + h * group + g;
        attend_row(out + row * d, q + row * d, kf.data(), vf.data(), len, d, scale, qf, scores, acc);
      }
    }
  }
}

// What prefill and decode share: the context, dtype, cache geometry, head counts, scale
// and pointers.
Status check_common(const Context& ctx, DType dtype, const void* out, const void* q, const void* k,
                    const void* v, const KVCache& cache, int64_t rows, const char* rows_name,
                    int64_t q_heads, float scale) {
  FIL_RETURN_IF_ERROR(check_context(ctx));
  FIL_RETURN_IF_ERROR(check_activation_dtype(ctx, "q", dtype));
  FIL_RETURN_IF_ERROR(check_not_null("out", out));
  FIL_RETURN_IF_ERROR(check_not_null("q", q));
  FIL_RETURN_IF_ERROR(check_not_null("k", k));
  FIL_RETURN_IF_ERROR(check_not_null("v", v));
  FIL_RETURN_IF_ERROR(check_not_null("k_cache", cache.k));
  FIL_RETURN_IF_ERROR(check_not_null("v_cache", cache.v));
  FIL_RETURN_IF_ERROR(check_positive(rows_name, rows));
  FIL_RETURN_IF_ERROR(check_positive("num_slots", cache.num_slots));
  FIL_RETURN_IF_ERROR(check_positive("kv_heads", cache.kv_heads));
  FIL_RETURN_IF_ERROR(check_positive("max_seq", cache.max_seq));
  FIL_RETURN_IF_ERROR(check_one_of("head_dim", cache.head_dim, {64, 128}));
  FIL_RETURN_IF_ERROR(check_positive("q_heads", q_heads));
  FIL_RETURN_IF_ERROR(check_multiple("q_heads", q_heads, cache.kv_heads, "kv_heads"));
  const int64_t group = q_heads / cache.kv_heads;
  if (group > kMaxGroup)
    return invalid_value("q_heads / kv_heads (the group size) must be in [1, ", kMaxGroup,
                         "], got ", q_heads, " / ", cache.kv_heads, " = ", group);
  if (!(scale > 0.0f) || !std::isfinite(scale))
    return invalid_value("scale must be a finite number > 0, got ", scale);
  if (ctx.device == Device::kCUDA) {
    // Positions are int32 on the device and the grid spans kv_heads and rows.
    if (cache.max_seq > std::numeric_limits<int32_t>::max())
      return invalid_value("max_seq must be < 2^31 on CUDA, got ", cache.max_seq);
    if (cache.kv_heads > 65535) return invalid_value("kv_heads must be <= 65535 on CUDA, got ", cache.kv_heads);
    const int64_t max_rows = std::string(rows_name) == "batch" ? 65535 : std::numeric_limits<int32_t>::max();
    if (rows > max_rows) return invalid_value(rows_name, " must be <= ", max_rows, " on CUDA, got ", rows);
    FIL_RETURN_IF_ERROR(check_aligned("out", out, 16));
    FIL_RETURN_IF_ERROR(check_aligned("q", q, 16));
    FIL_RETURN_IF_ERROR(check_aligned("k", k, 16));
    FIL_RETURN_IF_ERROR(check_aligned("v", v, 16));
    FIL_RETURN_IF_ERROR(check_aligned("k_cache", cache.k, 16));
    FIL_RETURN_IF_ERROR(check_aligned("v_cache", cache.v, 16));
  }
  return Status::Ok();
}

}  // namespace

Status attention_prefill(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                         const void* v, const KVCache& cache, int64_t tokens, int64_t q_heads,
                         int64_t slot, int64_t start, float scale) {
  FIL_RETURN_IF_ERROR(check_common(ctx, dtype, out, q, k, v, cache, tokens, "tokens", q_heads, scale));
  FIL_RETURN_IF_ERROR(check_range("slot", slot, 0, cache.num_slots));
  if (start < 0) return invalid_value("start must be >= 0, got ", start);
  if (start > cache.max_seq - tokens)
    return invalid_value("start + tokens must be <= max_seq (", cache.max_seq, "), got ", start,
                         " + ", tokens, " = ", start + tokens);
  FIL_DISPATCH_CUDA(ctx, "attention_prefill",
                    cuda::attention_prefill(ctx, dtype, out, q, k, v, cache, tokens, q_heads, slot,
                                            start, scale));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    prefill_cpu(static_cast<T*>(out), static_cast<const T*>(q), static_cast<const T*>(k),
                static_cast<const T*>(v), cache, tokens, q_heads, slot, start, scale);
    return Status::Ok();
  });
}

int64_t attention_decode_workspace_bytes(const Context& ctx, int64_t batch, int64_t q_heads,
                                         const KVCache& cache) {
#if FASTINTERNLM_WITH_CUDA
  if (ctx.device == Device::kCUDA && batch > 0 && q_heads > 0 && cache.kv_heads > 0 &&
      cache.max_seq > 0 && cache.head_dim > 0)
    return cuda::attention_decode_workspace_bytes(batch, q_heads, cache);
#else
  (void)ctx, (void)batch, (void)q_heads, (void)cache;
#endif
  return 0;
}

Status attention_decode(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                        const void* v, const KVCache& cache, int64_t batch, int64_t q_heads,
                        const int32_t* slots, const int32_t* positions, float scale,
                        void* workspace, int64_t workspace_bytes) {
  FIL_RETURN_IF_ERROR(check_common(ctx, dtype, out, q, k, v, cache, batch, "batch", q_heads, scale));
  FIL_RETURN_IF_ERROR(check_not_null("slots", slots));
  FIL_RETURN_IF_ERROR(check_not_null("positions", positions));
  if (ctx.device == Device::kCUDA) {
    const int64_t need = attention_decode_workspace_bytes(ctx, batch, q_heads, cache);
    if (workspace_bytes < need)
      return invalid_value("workspace must have at least ", need, " bytes, got ", workspace_bytes);
    if (need > 0) {
      FIL_RETURN_IF_ERROR(check_not_null("workspace", workspace));
      FIL_RETURN_IF_ERROR(check_aligned("workspace", workspace, 16));
    }
  } else {
    // Host memory: the values themselves can be checked before anything is written.
    for (int64_t b = 0; b < batch; ++b) {
      if (slots[b] < 0 || slots[b] >= cache.num_slots)
        return invalid_value("slots must be in [0, ", cache.num_slots, "), got ", slots[b],
                             " at index ", b);
      if (positions[b] < 0 || positions[b] >= cache.max_seq)
        return invalid_value("positions must be in [0, ", cache.max_seq, "), got ", positions[b],
                             " at index ", b);
    }
    std::vector<int32_t> sorted(slots, slots + batch);
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) return invalid_value("slots must be distinct, got slot ", *dup, " twice");
  }
  FIL_DISPATCH_CUDA(ctx, "attention_decode",
                    cuda::attention_decode(ctx, dtype, out, q, k, v, cache, batch, q_heads, slots,
                                           positions, scale, workspace, workspace_bytes));
  return dispatch_activation(dtype, [&](auto tag) {
    using T = decltype(tag);
    decode_cpu(static_cast<T*>(out), static_cast<const T*>(q), static_cast<const T*>(k),
               static_cast<const T*>(v), cache, batch, q_heads, slots, positions, scale);
    return Status::Ok();
  });
}

}  // namespace fastinternlm
