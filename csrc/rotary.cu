// Rotary embedding on CUDA: one thread block per token.
//
// The block first evaluates cos/sin for the token's D/2 frequencies into shared memory
// (rope.cuh), then
// every (head, pair) of q and k reuses them, so the transcendental work is per token,
// not per head. The base is read per token, which is what makes a per-sequence
// dynamic-NTK base cost nothing. 16-byte accesses where the head allows.
#include "cuda_common.cuh"
#include "kernels_cuda.h"
#include "rope.cuh"

namespace fastinternlm {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxHalf = 128;  // head_dim <= 256

template <typename T, int VEC>
__device__ __forceinline__ void rotate(T* row, int half, int i, const float* cos_t, const float* sin_t) {
  struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
  Pack a = *reinterpret_cast<Pack*>(row + i);
  Pack b = *reinterpret_cast<Pack*>(row + i + half);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float x1 = to_float(a.v[j]), x2 = to_float(b.v[j]);
    const float c = cos_t[i + j], s = sin_t[i + j];
    // Rounded like HF's (x * cos) + (rotate_half(x) * sin) in the activation dtype.
    a.v[j] = from_float<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
    b.v[j] = from_float<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
  }
  *reinterpret_cast<Pack*>(row + i) = a;
  *reinterpret_cast<Pack*>(row + i + half) = b;
}

template <typename T, typename P, int VEC>
__global__ void __launch_bounds__(kThreads)
rotary_kernel(T* __restrict__ q, T* __restrict__ k, const P* __restrict__ positions,
              const float* __restrict__ bases, float base, int q_heads, int kv_heads, int head_dim) {
  __shared__ float cos_t[kMaxHalf];
  __shared__ float sin_t[kMaxHalf];
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const float b = bases ? bases[t] : base;
  const float pos = static_cast<float>(positions[t]);
  for (int i = threadIdx.x; i < half; i += kThreads) {
    // D/2 double pows per token (rope.cuh) is negligible work.
    float s, c;
    rope_cos_sin(b, pos, i, head_dim, &c, &s);
    cos_t[i] = round_to<T>(c);
    sin_t[i] = round_to<T>(s);
  }
  __syncthreads();

  const int packs_per_head = half / VEC;
  const int total = (q_heads + kv_heads) * packs_per_head;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int head = idx / packs_per_head;
    const int i = (idx % packs_per_head) * VEC;
    T* row = head < q_heads ? q + (t * q_heads + head) * head_dim
                            : k + (t * kv_heads + (head - q_heads)) * head_dim;
    rotate<T, VEC>(row, half, i, cos_t, sin_t);
  }
}

template <typename T, typename P>
Status launch(const Context& ctx, T* q, T* k, const P* positions, const float* bases, float base,
              int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
  const bool vec = (head_dim / 2) % 8 == 0 && reinterpret_cast<uintptr_t>(q) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(k) % 16 == 0;
  auto kernel = vec ? rotary_kernel<T, P, 8> : rotary_kernel<T, P, 1>;
  kernel<<<tokens, kThreads, 0, stream_of(ctx)>>>(q, k, positions, bases, base, static_cast<int>(q_heads),
                                                  static_cast<int>(kv_heads), static_cast<int>(head_dim));
  return launch_status("rotary_embedding");
}

}  // namespace

Status rotary_embedding(const Context& ctx, DType dtype, void* q, void* k, const void* positions,
                        DType positions_dtype, const float* bases, float base, int64_t tokens,
                        int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
  FIL_RETURN_IF_ERROR(set_device(ctx));
  if (tokens > 0x7fffffff) return invalid_value("tokens must be < 2^31 on CUDA, got ", tokens);
  if ((q_heads + kv_heads) * head_dim > 0x7fffffff)
    return invalid_value("(q_heads + kv_heads) * head_dim must be < 2^31 on CUDA");
  return dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (positions_dtype == DType::kInt32)
      return launch(ctx, static_cast<T*>(q), static_cast<T*>(k), static_cast<const int32_t*>(positions),
                    bases, base, tokens, q_heads, kv_heads, head_dim);
    return launch(ctx, static_cast<T*>(q), static_cast<T*>(k), static_cast<const int64_t*>(positions),
                  bases, base, tokens, q_heads, kv_heads, head_dim);
  });
}

}  // namespace cuda
}  // namespace fastinternlm
