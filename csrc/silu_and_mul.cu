// SiLU-and-mul on CUDA: an elementwise grid-stride kernel. Purely memory-bound (read 2F,
// write F per row), so the only things that matter are 16-byte accesses and enough
// blocks in flight; expf (not __expf) keeps the result equal to torch's.
#include <algorithm>

#include "cuda_common.cuh"
#include "kernels_cuda.h"

namespace fastinternlm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t rows, int64_t ffn) {
  struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
  pdl_trigger();  // the w2 GEMV may launch and start on its weights (cuda_common.cuh, PDL)
  const int64_t packs_per_row = ffn / VEC;
  const int64_t total = rows * packs_per_row;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t r = idx / packs_per_row;
    const int64_t i = (idx % packs_per_row) * VEC;
    const Pack g = *reinterpret_cast<const Pack*>(x + r * 2 * ffn + i);
    const Pack u = *reinterpret_cast<const Pack*>(x + r * 2 * ffn + ffn + i);
    Pack o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float gf = to_float(g.v[j]);
      o.v[j] = from_float<T>(round_to<T>(gf / (1.0f + expf(-gf))) * to_float(u.v[j]));
    }
    *reinterpret_cast<Pack*>(out + r * ffn + i) = o;
  }
}

}  // namespace

Status silu_and_mul(const Context& ctx, DType dtype, void* out, const void* x, int64_t rows,
                    int64_t ffn) {
  FIL_RETURN_IF_ERROR(set_device(ctx));
  int sms = 0;
  FIL_RETURN_IF_ERROR(cuda_status(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ctx.device_index),
                                  "cudaDeviceGetAttribute"));
  const bool vec = ffn % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const int64_t work = rows * (vec ? ffn / 8 : ffn);
  // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(work, kThreads), int64_t(sms) * 8));
  return dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = vec ? silu_and_mul_kernel<T, 8> : silu_and_mul_kernel<T, 1>;
    kernel<<<blocks, kThreads, 0, stream_of(ctx)>>>(static_cast<T*>(out), static_cast<const T*>(x), rows, ffn);
    return launch_status("silu_and_mul");
  });
}

}  // namespace cuda
}  // namespace fastinternlm
