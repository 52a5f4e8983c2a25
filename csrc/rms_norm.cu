// RMSNorm (optionally fused with the residual add) on CUDA: one thread block per row.
//
// A row is a few KB (4096 x 2 B for 7B), far too little to keep a block busy twice over,
// so each block makes two passes: the first finishes the residual update and the sum of
// squares, the second re-reads the row (now in L1/L2) and writes the output.
// Vector path: 8 elements (16 bytes) per access when the row allows it, because a 16-byte
// load per thread is what reaches full DRAM bandwidth; a scalar path covers any other size.
#include "cuda_common.cuh"
#include "kernels_cuda.h"

namespace fastinternlm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? scratch[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// VEC elements per access; VEC = 8 needs hidden % 8 == 0 and 16-byte aligned rows.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
rms_norm_kernel(T* out, T* __restrict__ residual, const T* x,
                const T* __restrict__ weight, int64_t hidden, float eps) {
  struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
  __shared__ float scratch[kThreads / 32];
  // The next kernel (an int4 GEMV at decode) may launch now and start streaming its
  // weights; it waits for this grid before reading our output (cuda_common.cuh, PDL).
  pdl_trigger();
  const int64_t row = blockIdx.x;
  const Pack* x_row = reinterpret_cast<const Pack*>(x + row * hidden);
  Pack* res_row = residual ? reinterpret_cast<Pack*>(residual + row * hidden) : nullptr;
  const int64_t packs = hidden / VEC;

  float sum = 0.0f;
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    Pack a = x_row[p];
    if (res_row) {
      Pack r = res_row[p];
#pragma unroll
      for (int i = 0; i < VEC; ++i) r.v[i] = from_float<T>(to_float(r.v[i]) + to_float(a.v[i]));
      res_row[p] = r;
      a = r;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float f = to_float(a.v[i]);
      sum += f * f;
    }
  }
  const float inv_rms = rsqrtf(block_sum(sum, scratch) / static_cast<float>(hidden) + eps);

  // Every thread re-reads what it wrote in pass 1 (its own packs), so no barrier is needed
  // for residual; block_sum's barriers order the rest.
  const Pack* src = res_row ? res_row : x_row;
  const Pack* w = reinterpret_cast<const Pack*>(weight);
  Pack* out_row = reinterpret_cast<Pack*>(out + row * hidden);
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    const Pack a = src[p];
    const Pack g = w[p];
    Pack o;
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      o.v[i] = from_float<T>(round_to<T>(to_float(a.v[i]) * inv_rms) * to_float(g.v[i]));
    out_row[p] = o;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

Status rms_norm(const Context& ctx, DType dtype, void* out, void* residual, const void* x,
                const void* weight, int64_t rows, int64_t hidden, float eps) {
  FIL_RETURN_IF_ERROR(set_device(ctx));
  if (rows > 0x7fffffff) return invalid_value("rows must be < 2^31 on CUDA, got ", rows);
  const bool vec = hidden % 8 == 0 && aligned16(out) && aligned16(x) && aligned16(weight) &&
                   (residual == nullptr || aligned16(residual));
  return dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* o = static_cast<T*>(out);
    auto* r = static_cast<T*>(residual);
    auto* xi = static_cast<const T*>(x);
    auto* w = static_cast<const T*>(weight);
    if (vec)
      rms_norm_kernel<T, 8><<<rows, kThreads, 0, stream_of(ctx)>>>(o, r, xi, w, hidden, eps);
    else
      rms_norm_kernel<T, 1><<<rows, kThreads, 0, stream_of(ctx)>>>(o, r, xi, w, hidden, eps);
    return launch_status("rms_norm");
  });
}

}  // namespace cuda
}  // namespace fastinternlm
