// Int4 weight-only quantization, dequantization and GEMM on CUDA (packed format v1, see
// include/fastinternlm/int4_gemm.h).
//
// int4_gemm has two paths:
//  - M <= 16 (decode): a GEMV-like kernel that is bound by reading the weights. One warp
//    owns a few output rows and streams their nibbles with 16-byte loads, consecutive
//    lanes on consecutive 16 bytes, so a warp's load is 512 contiguous bytes of one row.
//    Every row of x is used in the same pass, so the weights cross DRAM exactly once for
//    all M. x is staged in shared memory as float32, chunk by chunk along k.
//  - M > 16 (prefill): a tensor-core GEMM in int4_gemm_large_m.cu.
// Both dequantize each weight as fmaf(q, s, m) in float32, which equals the CPU
// reference's q * s + m bit for bit (q * s is exact), accumulate in float32 and round to
// the output type once; the tensor-core path also rounds each weight to the activation
// dtype once, as its operands must be (see int4_gemm in int4_gemm.h).
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

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
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

// ---- GEMV path, M <= 16 -------------------------------------------------------------------

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = 32 * kGemvWarps;
constexpr int kLaneK = 32;               // input channels in one lane's 16-byte load
constexpr int kWarpK = 32 * kLaneK;      // 1024: one warp-wide load of a row
// A lane's 32 floats of x sit at a stride of 34 floats in shared memory, so lane l starts
// at bank 2l (mod 32): the lanes' 8-byte reads (and the staging writes) of a half-warp hit
// 32 distinct banks. Without the pad every lane would start at bank 0.
constexpr int kLaneStride = kLaneK + 2;

template <int MT>  // MT: rows of x the kernel is compiled for (1, 2, 4, 8, 16); m <= MT
struct GemvShape {
  // Rows of W per warp. Lanes own distinct channels, so x cannot be broadcast: each float
  // a lane reads from shared memory feeds kRows FMAs. An SM reads 128 bytes (32 floats) of
  // shared memory per clock and issues 128 FMAs, so with 8 or 16 rows of x (FMA-heavy)
  // 4 rows of W keep shared memory from being the limit; with few rows of x the weights'
  // DRAM traffic is the limit and 2 rows keep more, smaller blocks in flight.
  static constexpr int kRows = MT <= 4 ? 2 : 4;
  // 16-byte loads per lane per row per chunk: up to 4 in flight for few rows of x, to
  // cover DRAM latency; the chunk of x in shared memory shrinks as MT grows.
  static constexpr int kUnits = MT <= 2 ? 4 : MT == 4 ? 2 : 1;
  static constexpr int kChunk = kUnits * kWarpK;                  // input channels per chunk
  static constexpr int kRowFloats = kChunk / kLaneK * kLaneStride;  // one row of x, padded
  static constexpr int kSmemBytes = MT * kRowFloats * 4;            // 17 KB .. 68 KB
};

template <typename T, int MT>
__global__ void __launch_bounds__(kGemvThreads)
int4_gemv_kernel(T* __restrict__ out, const T* __restrict__ x, int m,
                 const int32_t* __restrict__ qweight, const __half* __restrict__ scales,
                 const __half* __restrict__ offsets, int n, int k, int group_size) {
  using S = GemvShape<MT>;
  constexpr int R = S::kRows, U = S::kUnits;
  extern __shared__ __align__(16) float xs[];  // [MT][kRowFloats]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = (int64_t(blockIdx.x) * kGemvWarps + warp) * R;
  const int64_t words_per_row = k / 8, groups = k / group_size;

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[r][i] = 0.0f;

  for (int64_t kc = 0; kc < k; kc += S::kChunk) {
    // Weights first: these loads are independent of shared memory, so they are in flight
    // while the block stages x. Rows past n and channels past k read nothing and count as
    // zero (their x is zero too).
    uint4 wq[R][U];
    float sc[R][U], of[R][U];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t kk = kc + u * kWarpK + lane * kLaneK;
        const int64_t row = row0 + r;
        wq[r][u] = make_uint4(0, 0, 0, 0);
        sc[r][u] = of[r][u] = 0.0f;
        if (row < n && kk < k) {
          // Streaming (evict-first) load: each weight is read once per call, and caching
          // it would only push x, scales and offsets out of L1/L2.
          wq[r][u] = __ldcs(reinterpret_cast<const uint4*>(qweight + row * words_per_row + kk / 8));
          // A lane's 32 channels lie in one group (groups are 32, 64 or 128 aligned).
          const int64_t g = row * groups + kk / group_size;
          sc[r][u] = __half2float(scales[g]);
          of[r][u] = __half2float(offsets[g]);
        }
      }
    }

    // Stage x[0..MT) [kc, kc + kChunk) as float32, zero past m and k: one 16-byte load
    // (8 elements) per thread and step, consecutive threads on consecutive bytes.
    constexpr int kVecs = S::kChunk / 8;
    for (int idx = threadIdx.x; idx < MT * kVecs; idx += kGemvThreads) {
      const int mi = idx / kVecs, c = (idx % kVecs) * 8;
      float v[8];
      if (mi < m && kc + c < k) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + mi * int64_t(k) + kc + c));
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = to_float(e[j]);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = 0.0f;
      }
      float2* dst = reinterpret_cast<float2*>(xs + mi * S::kRowFloats + (c / kLaneK) * kLaneStride +
                                              c % kLaneK);
#pragma unroll
      for (int j = 0; j < 4; ++j) dst[j] = make_float2(v[2 * j], v[2 * j + 1]);
    }
    __syncthreads();

#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float* xl = xs + (u * 32 + lane) * kLaneStride;
#pragma unroll
      for (int wd = 0; wd < 4; ++wd) {
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          float2 xv[MT];
#pragma unroll
          for (int i = 0; i < MT; ++i)
            xv[i] = *reinterpret_cast<const float2*>(xl + i * S::kRowFloats + wd * 8 + 2 * p);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint32_t word = word_of(wq[r][u], wd);
            const float w0 = dequant(word, 2 * p, sc[r][u], of[r][u]);
            const float w1 = dequant(word, 2 * p + 1, sc[r][u], of[r][u]);
#pragma unroll
            for (int i = 0; i < MT; ++i) {
              acc[r][i] = fmaf(xv[i].x, w0, acc[r][i]);
              acc[r][i] = fmaf(xv[i].y, w1, acc[r][i]);
            }
          }
        }
      }
    }
    __syncthreads();  // the next chunk overwrites xs
  }

  // Each lane holds a partial sum over its channels; the butterfly leaves the total in every
  // lane, and the stores are spread over lanes.
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      float v = acc[r][i];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
      const int64_t row = row0 + r;
      if (lane == (r * MT + i) % 32 && row < n && i < m) out[i * int64_t(n) + row] = from_float<T>(v);
    }
  }
}

template <typename T, int MT>
Status launch_gemv(const Context& ctx, T* out, const T* x, int m, const Int4Weight& w) {
  using S = GemvShape<MT>;
  auto kernel = int4_gemv_kernel<T, MT>;
  // Above 48 KB a kernel must opt in to dynamic shared memory (per device, so every call).
  if (S::kSmemBytes > 48 * 1024)
    FIL_RETURN_IF_ERROR(cuda_status(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes),
        "int4_gemm: cudaFuncSetAttribute"));
  const unsigned blocks = ceil_div(w.n, int64_t(kGemvWarps) * S::kRows);
  kernel<<<blocks, kGemvThreads, S::kSmemBytes, stream_of(ctx)>>>(
      out, x, m, w.qweight, static_cast<const __half*>(w.scales),
      static_cast<const __half*>(w.offsets), static_cast<int>(w.n), static_cast<int>(w.k),
      static_cast<int>(w.group_size));
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
  FIL_RETURN_IF_ERROR(set_device(ctx));
  const int mi = static_cast<int>(m);  // checked < 2^31 by the caller
  return dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* o = static_cast<T*>(out);
    const auto* xi = static_cast<const T*>(x);
    if (mi == 1) return launch_gemv<T, 1>(ctx, o, xi, mi, w);
    if (mi == 2) return launch_gemv<T, 2>(ctx, o, xi, mi, w);
    if (mi <= 4) return launch_gemv<T, 4>(ctx, o, xi, mi, w);
    if (mi <= 8) return launch_gemv<T, 8>(ctx, o, xi, mi, w);
    if (mi <= 16) return launch_gemv<T, 16>(ctx, o, xi, mi, w);
    return int4_gemm_large_m(ctx, dtype, out, x, m, w);  // int4_gemm_large_m.cu
  });
}

}  // namespace cuda
}  // namespace fastinternlm
