// Int4 weight-only quantization, dequantization and GEMM on CUDA (packed format v1, see
// include/fastinternlm/int4_gemm.h).
//
// int4_gemm has two paths, each in its own file:
//  - M <= 16 (decode): int4_gemm_small_m.cu, a tensor-core GEMV that streams the weights
//    once for all M rows of x and factors each group's scale and offset out of the dot
//    product.
//  - M > 16 (prefill): int4_gemm_large_m.cu, a tensor-core GEMM that dequantizes each
//    weight in float32 as fmaf(q, s, m) and rounds it to the activation dtype once, as its
//    operands must be (see int4_gemm in int4_gemm.h).
// This file keeps quantization, dequantization and the dispatch between the two.
#include <cstdint>

#include "cuda_common.cuh"
#include "kernels_cuda.h"

namespace fastinternlm {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// q as a float without I2F: 0x4B000000 | q is the float 2^23 + q (q lands in the low
// mantissa bits) and subtracting 2^23 is exact. The integer-to-float conversion runs at a
// quarter of the FMA rate on sm_80/sm_90; this is one LOP3 and one FADD.
__device__ __forceinline__ float nibble(uint32_t word, int i) {
  return __uint_as_float(0x4B000000u | ((word >> (4 * i)) & 15u)) - 8388608.0f;
}

__device__ __forceinline__ float dequant(uint32_t word, int i, float s, float m) {
  return fmaf(nibble(word, i), s, m);
}

// Quantize and dequantize also take float32 weights on CUDA (checkpoints may be float32).
template <typename F>
Status dispatch_weight(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: return Status(StatusCode::kInvalidType, "weights must be float32, float16 or bfloat16");
  }
}

// A grid-stride loop over `items` with at most this many blocks: enough to fill any GPU,
// and the count fits gridDim.x whatever the size.
constexpr int64_t kMaxGridBlocks = 1 << 16;

unsigned grid_for(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(blocks < kMaxGridBlocks ? blocks : kMaxGridBlocks);
}

// ---- quantize -----------------------------------------------------------------------------
// One thread per packed word (8 input channels). A group is group_size / 8 = 4, 8 or 16
// consecutive threads, aligned inside a warp (groups never straddle rows because k is a
// multiple of group_size, and words are numbered row-major), so its min and max take an
// xor-shuffle reduction over that many lanes. Load-time work: simple beats fast here.

constexpr int kQuantThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
quantize_int4_kernel(const T* __restrict__ w, int64_t words, int words_per_group,
                     int32_t* __restrict__ qweight, __half* __restrict__ scales,
                     __half* __restrict__ offsets, unsigned long long* __restrict__ bad_group) {
  // The trip count depends only on blockIdx, so whole warps stay together for the shuffles
  // (blockDim is a multiple of 32, and a group never spans the valid/invalid boundary
  // because `words` is a multiple of words_per_group).
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < words;
       base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t word = base + threadIdx.x;
    const bool valid = word < words;
    float v[8];
    float lo = INFINITY, hi = -INFINITY;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      v[i] = valid ? to_float(w[word * 8 + i]) : 0.0f;
      bad |= !(fabsf(v[i]) <= 65504.0f);  // also true for NaN
      lo = fminf(lo, v[i]);
      hi = fmaxf(hi, v[i]);
    }
    for (int offset = 1; offset < words_per_group; offset <<= 1) {
      lo = fminf(lo, __shfl_xor_sync(kFullMask, lo, offset));
      hi = fmaxf(hi, __shfl_xor_sync(kFullMask, hi, offset));
    }
    if (!valid) continue;
    const int64_t group = word / words_per_group;
    if (bad) atomicMin(bad_group, static_cast<unsigned long long>(group));
    // The same directed roundings and float64 arithmetic as the CPU reference, so both
    // produce identical bits: m = min rounded down, s = (max - m) / 15 rounded up (to float32
    // first, which keeps it a ceiling), q = rint((w - m) / s).
    const __half m16 = __float2half_rd(lo);
    const double m = __half2float(m16);
    const __half s16 = __float2half_ru(__double2float_ru((static_cast<double>(hi) - m) / 15.0));
    const double s = __half2float(s16);
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      double q = s > 0.0 ? rint((static_cast<double>(v[i]) - m) / s) : 0.0;
      q = fmin(fmax(q, 0.0), 15.0);
      packed |= static_cast<uint32_t>(q) << (4 * i);
    }
    qweight[word] = static_cast<int32_t>(packed);
    if (word % words_per_group == 0) {
      scales[group] = s16;
      offsets[group] = m16;
    }
  }
}

// ---- dequantize ---------------------------------------------------------------------------

constexpr int kDequantThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
dequantize_int4_kernel(T* __restrict__ out, const int32_t* __restrict__ qweight,
                       const __half* __restrict__ scales, const __half* __restrict__ offsets,
                       int64_t words, int words_per_group) {
  for (int64_t word = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; word < words;
       word += int64_t(gridDim.x) * blockDim.x) {
    const int64_t group = word / words_per_group;
    const float s = __half2float(scales[group]), m = __half2float(offsets[group]);
    const uint32_t q = static_cast<uint32_t>(qweight[word]);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[word * 8 + i] = from_float<T>(dequant(q, i, s, m));
  }
}

}  // namespace

Status quantize_int4(const Context& ctx, DType dtype, const void* w, int64_t n, int64_t k,
                     int64_t group_size, int32_t* qweight, void* scales, void* offsets) {
  FIL_RETURN_IF_ERROR(set_device(ctx));
  cudaStream_t stream = stream_of(ctx);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  FIL_RETURN_IF_ERROR(cuda_status(cudaStreamIsCapturing(stream, &capture), "quantize_int4"));
  if (capture != cudaStreamCaptureStatusNone)
    return invalid_value("quantize_int4 reads its range check back to the host and cannot run "
                         "while the stream is being captured");
  // The kernel records the lowest offending group here; reading it back is what lets the
  // op return an error instead of silently storing inf scales.
  unsigned long long* bad_group = nullptr;
  FIL_RETURN_IF_ERROR(cuda_status(cudaMallocAsync(&bad_group, sizeof *bad_group, stream),
                                  "quantize_int4: cudaMallocAsync"));
  const int64_t words = n * k / 8;
  const int words_per_group = static_cast<int>(group_size / 8);
  Status status = cuda_status(cudaMemsetAsync(bad_group, 0xff, sizeof *bad_group, stream),
                              "quantize_int4: cudaMemsetAsync");
  if (status.ok()) {
    status = dispatch_weight(dtype, [&](auto tag) {
      using T = decltype(tag);
      quantize_int4_kernel<T><<<grid_for(words, kQuantThreads), kQuantThreads, 0, stream>>>(
          static_cast<const T*>(w), words, words_per_group, qweight, static_cast<__half*>(scales),
          static_cast<__half*>(offsets), bad_group);
      return launch_status("quantize_int4");
    });
  }
  unsigned long long first_bad = ~0ull;
  if (status.ok())
    status = cuda_status(cudaMemcpyAsync(&first_bad, bad_group, sizeof first_bad,
                                         cudaMemcpyDeviceToHost, stream),
                         "quantize_int4: cudaMemcpyAsync");
  const Status freed = cuda_status(cudaFreeAsync(bad_group, stream), "quantize_int4: cudaFreeAsync");
  const Status synced = cuda_status(cudaStreamSynchronize(stream), "quantize_int4");
  FIL_RETURN_IF_ERROR(status);
  FIL_RETURN_IF_ERROR(freed);
  FIL_RETURN_IF_ERROR(synced);
  if (first_bad != ~0ull) {
    const int64_t groups = k / group_size;
    const int64_t row = static_cast<int64_t>(first_bad) / groups;
    const int64_t g = static_cast<int64_t>(first_bad) % groups;
    return invalid_value("w must be finite and within the float16 range (|w| <= 65504) for "
                         "int4 scales and offsets, got a value outside it in row ", row,
                         ", group ", g, " (input channels ", g * group_size, "..",
                         (g + 1) * group_size - 1, ")");
  }
  return Status::Ok();
}

Status dequantize_int4(const Context& ctx, DType dtype, void* out, const Int4Weight& w) {
  FIL_RETURN_IF_ERROR(set_device(ctx));
  const int64_t words = w.n * w.k / 8;
  return dispatch_weight(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_int4_kernel<T><<<grid_for(words, kDequantThreads), kDequantThreads, 0,
                                stream_of(ctx)>>>(
        static_cast<T*>(out), w.qweight, static_cast<const __half*>(w.scales),
        static_cast<const __half*>(w.offsets), words, static_cast<int>(w.group_size / 8));
    return launch_status("dequantize_int4");
  });
}

Status int4_gemm(const Context& ctx, DType dtype, void* out, const void* x, int64_t m,
                 const Int4Weight& w) {
  if (m <= 16) return int4_gemm_small_m(ctx, dtype, out, x, m, w);  // int4_gemm_small_m.cu
  return int4_gemm_large_m(ctx, dtype, out, x, m, w);                // int4_gemm_large_m.cu
}

}  // namespace cuda
}  // namespace fastinternlm
