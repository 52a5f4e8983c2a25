// Int4 weight-only quantization, dequantization and GEMM on CUDA (packed format v1, see
// include/fastinternlm/int4_gemm.h).
//
// int4_gemm has two paths:
//  - M <= 16 (decode): int4_gemm_small_m in int4_gemm_small_m.cu, a tensor-core GEMV
//    that streams the weights once for all M rows of x and factors each group's scale
//    and offset out of the dot product.
//  - M > 16 (prefill): a shared-memory tiled SIMT GEMM below, 128 x 128 output tiles, each
//    thread an 8 x 8 register block. Weights are dequantized once per tile into shared
//    memory, so the dequantization cost is spread over 128 rows of x. (Tensor cores come
//    in a later version.) It dequantizes each weight as fmaf(q, s, m) in float32, which
//    equals the CPU reference's q * s + m bit for bit (q * s is exact), accumulates in
//    float32 and rounds to the output type once.
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

// ---- tiled path, M > 16 -------------------------------------------------------------------

constexpr int kTileM = 128, kTileN = 128;
// 32 input channels per step: one group of the smallest size, so a tile row needs one
// scale and offset; a row's 32 nibbles are 16 contiguous bytes.
constexpr int kTileK = 32;
constexpr int kTileThreads = 256;  // 16 x 16 threads, each 8 x 8 outputs

// Two blocks per SM (at most 128 registers a thread): one block's FMAs then cover the
// other's barriers and stores to shared memory. ptxas for sm_80 fits this without spilling;
// for sm_90a it keeps 24 bytes of the staging registers (live across the FMA loop) on the
// stack, i.e. a few L1-resident spill loads and stores per 2048 FMAs. The alternative,
// 145 registers and one block per SM, would leave the SM idle at every barrier.
template <typename T>
__global__ void __launch_bounds__(kTileThreads, 2)
int4_gemm_tiled_kernel(T* __restrict__ out, const T* __restrict__ x, int m,
                       const int32_t* __restrict__ qweight, const __half* __restrict__ scales,
                       const __half* __restrict__ offsets, int n, int k, int group_size,
                       int64_t tiles_n) {
  // Transposed so that the compute loop reads 4 consecutive rows of x (and 4 consecutive
  // rows of W) as one 16-byte load at each k.
  __shared__ __align__(16) float as[kTileK][kTileM];  // as[k][row of x]
  __shared__ __align__(16) float bs[kTileK][kTileN];  // bs[k][row of W], dequantized
  const int tid = threadIdx.x;
  // One flat grid (gridDim.y is capped at 65535); N varies fastest so the blocks running
  // together share rows of x and sweep W, which stays in L2 across M tiles.
  const int64_t m0 = (int64_t(blockIdx.x) / tiles_n) * kTileM;
  const int64_t n0 = (int64_t(blockIdx.x) % tiles_n) * kTileN;
  const int64_t words_per_row = k / 8, groups = k / group_size;

  // Global -> register staging. x: 128 rows x 4 vectors of 8 elements, two per thread, four
  // threads per row so a row's 64 bytes are read together. W: 128 rows x 4 words, two words
  // (8 bytes) per thread. The transposing stores to shared memory then conflict 4-way
  // (x) and 2-way (W); that is 24 stores per 2048 FMAs per thread, not worth a swizzle.
  const int x_row = tid / 4, x_vec = tid % 4;
  const int w_row = tid / 2, w_half = tid % 2;
  // Offsets of this thread's rows, fixed for the whole k loop (registers are tight: the
  // staging state lives across the FMA loop beside 64 accumulators).
  const bool x_valid0 = m0 + x_row < m, x_valid1 = m0 + x_row + 64 < m;
  const int64_t x_off = (m0 + x_row) * k + x_vec * 8;
  const bool w_valid = n0 + w_row < n;
  const int64_t w_off = (n0 + w_row) * words_per_row + w_half * 2;
  const int64_t g_off = (n0 + w_row) * groups;
  uint4 xr[2];
  uint2 wr;
  __half2 wsm;  // (scale, offset)

  auto load = [&](int64_t k0) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    xr[0] = x_valid0 ? __ldg(reinterpret_cast<const uint4*>(x + x_off + k0)) : zero;
    xr[1] = x_valid1 ? __ldg(reinterpret_cast<const uint4*>(x + x_off + 64 * int64_t(k) + k0)) : zero;
    wr = make_uint2(0, 0);
    wsm = __float2half2_rn(0.0f);
    if (w_valid) {
      wr = __ldg(reinterpret_cast<const uint2*>(qweight + w_off + k0 / 8));
      const int64_t g = g_off + k0 / group_size;
      wsm = __halves2half2(scales[g], offsets[g]);
    }
  };

  auto store = [&]() {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const T* e = reinterpret_cast<const T*>(&xr[i]);
#pragma unroll
      for (int j = 0; j < 8; ++j) as[x_vec * 8 + j][x_row + 64 * i] = to_float(e[j]);
    }
    const float ws = __low2float(wsm), wo = __high2float(wsm);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      bs[w_half * 16 + j][w_row] = dequant(wr.x, j, ws, wo);
      bs[w_half * 16 + 8 + j][w_row] = dequant(wr.y, j, ws, wo);
    }
  };

  // Rows ty*4 + {0..3} and 64 + ty*4 + {0..3}, columns likewise from tx: the two halves
  // 64 apart keep a warp's 16-byte reads of bs on distinct banks, and its reads of as are
  // broadcasts (two distinct addresses per warp).
  const int ty = tid / 16, tx = tid % 16;
  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

  load(0);
  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
    store();
    __syncthreads();
    // The next tile's global loads overlap this tile's FMAs (register double buffering).
    if (k0 + kTileK < k) load(k0 + kTileK);
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(&as[kk][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&as[kk][64 + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&bs[kk][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&bs[kk][64 + tx * 4]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the next store overwrites as and bs
  }

#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t row = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t col = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
      if (col < n) out[row * n + col] = from_float<T>(acc[i][j]);
    }
  }
}

template <typename T>
Status launch_tiled(const Context& ctx, T* out, const T* x, int m, const Int4Weight& w) {
  const int64_t tiles_n = (w.n + kTileN - 1) / kTileN;
  const int64_t tiles = tiles_n * ((m + kTileM - 1) / kTileM);
  if (tiles > 0x7fffffff)
    return invalid_value("int4_gemm: m * n is too large for one CUDA launch (", tiles,
                         " tiles of 128 x 128, at most 2^31 - 1)");
  int4_gemm_tiled_kernel<T><<<static_cast<unsigned>(tiles), kTileThreads, 0, stream_of(ctx)>>>(
      out, x, m, w.qweight, static_cast<const __half*>(w.scales),
      static_cast<const __half*>(w.offsets), static_cast<int>(w.n), static_cast<int>(w.k),
      static_cast<int>(w.group_size), tiles_n);
  return launch_status("int4_gemm");
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
  if (m <= 16) return int4_gemm_small_m(ctx, dtype, out, x, m, w);
  FIL_RETURN_IF_ERROR(set_device(ctx));
  const int mi = static_cast<int>(m);  // checked < 2^31 by the caller
  return dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* o = static_cast<T*>(out);
    const auto* xi = static_cast<const T*>(x);
    return launch_tiled<T>(ctx, o, xi, mi, w);
  });
}

}  // namespace cuda
}  // namespace fastinternlm
