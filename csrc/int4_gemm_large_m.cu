// int4_gemm for M > 16 (prefill) on tensor cores: mma.sync m16n8k16 with float32
// accumulation, sm_80 and newer. Packed format v1 (include/fastinternlm/int4_gemm.h).
// Design notes (tile shape, shared-memory swizzles, pipeline, raster order):
// docs/kernels/int4_gemm.md.
//
// Numerics (the contract documented at int4_gemm in int4_gemm.h). The tensor cores take
// float16/bfloat16 operands, so every weight is dequantized in float32 as fmaf(q, s, m) --
// bit for bit the value dequantize_int4 forms before its rounding -- and rounded ONCE to
// the activation dtype; x is used as is; the MMA multiplies exactly (11 x 11 or 8 x 8
// significant bits fit float32) and sums in float32; the result is rounded to dtype once.
// So this path computes dequantize_int4(W, dtype) followed by a float32-accumulated matmul.
// Rows of x past m, W rows past n and channels past k are zero-filled by cp.async
// (src-size 0) with s = m = 0, so they contribute exact zeros; stores are masked.
// Block tile 128 x 128 with 128 x 32 warp tiles: each warp dequantizes its own columns in
// registers (~4 ALU instructions a weight), and 8 m16 tiles per weight fragment keep that
// near 2 instructions per MMA, within what a sub-partition issues per HMMA.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_common.cuh"
#include "kernels_cuda.h"
#include "mma.cuh"

namespace fastinternlm {
namespace cuda {
namespace {

constexpr int kBlockM = 128, kBlockN = 128, kBlockK = 64;
constexpr int kWarps = 4;  // side by side along N
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpN = kBlockN / kWarps;  // 32
constexpr int kMTiles = kBlockM / 16;     // 8 m16 tiles per warp
constexpr int kNTiles = kWarpN / 8;       // 4 n8 tiles per warp
constexpr int kStages = 3;
constexpr int kGroupTilesM = 16;  // tile rows per raster group

constexpr int kARowBytes = kBlockK * 2;                 // 128: one row of x, 8 chunks
constexpr int kABytes = kBlockM * kARowBytes;           // 16 KiB
constexpr int kBRowBytes = kBlockK / 2;                 // 32: one W row's nibbles, 2 chunks
constexpr int kBBytes = kBlockN * kBRowBytes;           // 4 KiB
constexpr int kSBytes = 2 * kBlockN * 16;               // 4 KiB: Scale per half per row
constexpr int kStageBytes = kABytes + kBBytes + kSBytes;
constexpr int kSmemBytes = kStages * kStageBytes;       // 72 KiB

static_assert(kThreads == kBlockN, "one thread loads the scales of one W row");
static_assert(kBlockM * (kBlockK / 8) == 8 * kThreads, "eight 16-byte x chunks per thread");
static_assert(kBlockN * 2 == 2 * kThreads, "two 16-byte nibble chunks per thread");

// A group's scale and offset as float32 in shared memory, with s / 16 for the high nibble
// (see dequant_pair). 16 bytes: one LDS.128.
struct Scale {
  float s, s16, m, unused;
};

// The bits of `bits` selected by `mask` (a nibble at bit 0 or bit 4, i.e. q or 16 q) as a
// float without I2F (quarter rate on sm_80/sm_90): 0x4B000000 | v is the float 2^23 + v,
// and subtracting 2^23 is exact. One LOP3 and one FADD.
template <uint32_t kMask>
__device__ __forceinline__ float masked_float(uint32_t bits) {
  // (bits & mask) | 0x4B000000 as one LOP3: left to itself the compiler emits two, as a
  // LOP3 takes one immediate; the magic then lives in a register.
  uint32_t v;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(v) : "r"(bits), "n"(kMask), "r"(0x4B000000u));
  return __uint_as_float(v) - 8388608.0f;
}

// The two channels in the low byte of `bits` (low nibble first), each dequantized as
// fmaf(q, s, m) in float32 -- exactly dequantize_int4's value, since q * s is exact -- and
// rounded once to T, packed as the MMA wants them (lower channel in the low 16 bits).
// The high nibble is taken in place as 16 q and multiplied by s / 16: 16 q * (s / 16) is
// q * s exactly (s / 16 >= 2^-28 is still a normal float32, so dividing a float16 s by 16 is
// exact), so fmaf rounds the same value once, and the shift by 4 is saved.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t bits, const Scale& sc) {
  const float lo = fmaf(masked_float<0x0Fu>(bits), sc.s, sc.m);
  const float hi = fmaf(masked_float<0xF0u>(bits), sc.s16, sc.m);
  uint32_t packed;
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&packed, &h, sizeof packed);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&packed, &h, sizeof packed);
  }
  return packed;
}

// Two adjacent outputs of one row (columns col, col + 1), masked at the edges. pair_stores:
// n is even and out 4-byte aligned, so (row * n + col) * 2 bytes is 4-byte aligned.
template <typename T>
__device__ __forceinline__ void store_pair(T* out, int row, int col, int m, int n,
                                           bool pair_stores, float v0, float v1) {
  if (row >= m) return;
  T* p = out + int64_t(row) * n + col;
  if (pair_stores && col + 1 < n) {
    if constexpr (std::is_same<T, __half>::value)
      *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
    else
      *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
    return;
  }
  if (col < n) p[0] = from_float<T>(v0);
  if (col + 1 < n) p[1] = from_float<T>(v1);
}

// The block's output tile in the grouped raster (see the top of the file); the last group
// may have fewer tile rows. blockIdx.x is read through a volatile asm so that the compiler
// cannot reuse an earlier read: calling this again recomputes the origin.
__device__ __forceinline__ void tile_origin(int tiles_m, int tiles_n, int& m0, int& n0) {
  int block;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(block));
  const int per_group = kGroupTilesM * tiles_n;
  const int group = block / per_group, local = block % per_group;
  const int group_rows = min(kGroupTilesM, tiles_m - group * kGroupTilesM);
  m0 = (group * kGroupTilesM + local % group_rows) * kBlockM;
  n0 = (local / group_rows) * kBlockN;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
int4_gemm_large_m_kernel(T* __restrict__ out, const T* __restrict__ x, int m,
                         const int32_t* __restrict__ qweight, const __half* __restrict__ scales,
                         const __half* __restrict__ offsets, int n, int k, int group_size,
                         int tiles_m, int tiles_n, bool pair_stores) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // 32-bit tile origins and row lengths (m, n, k < 2^31), 64-bit products: fewer
  // registers live across the main loop.
  int m0, n0;
  tile_origin(tiles_m, tiles_n, m0, n0);
  const int words_per_row = k / 8, groups = k / group_size;
  const int group_shift = __ffs(group_size) - 1;  // a power of two: a shift, not a division

  // Loader roles, fixed for the whole K loop.
  // x: chunk a_chunk (8 channels) of rows a_row + 16 i, i = 0..7; 8 consecutive threads
  // read one row's 128 contiguous bytes.
  const int a_chunk = tid % 8, a_row = tid / 8;
  const int a_rows_left = m - m0 - a_row;
  const T* a_src = x + int64_t(m0 + a_row) * k + 8 * a_chunk;
  const uint32_t a_dst = a_row * kARowBytes + ((a_chunk ^ (a_row % 8)) * 16);
  // Nibbles: chunk b_half (32 channels) of W rows b_row and b_row + 64.
  const int b_half = tid % 2, b_row = tid / 2;
  const bool b_valid0 = n0 + b_row < n, b_valid1 = n0 + b_row + 64 < n;
  const int32_t* b_src = qweight + int64_t(n0 + b_row) * words_per_row + 4 * b_half;
  // (b_row + 64) / 4 has the parity of b_row / 4, so both rows share the swizzle.
  const uint32_t b_dst = b_row * kBRowBytes + ((b_half ^ ((b_row / 4) % 2)) * 16);
  // Scales/offsets of W row tid.
  const bool s_valid = n0 + tid < n;
  const int64_t s_base = int64_t(n0 + tid) * groups;

  const uint32_t smem_base = smem_address(smem);
  auto a_stage = [&](int stage) { return smem_base + stage * kStageBytes; };
  auto b_stage = [&](int stage) { return smem_base + stage * kStageBytes + kABytes; };
  auto s_stage = [&](int stage) {
    return reinterpret_cast<Scale*>(smem + stage * kStageBytes + kABytes + kBBytes);
  };

  auto load_tiles = [&](int stage, int step) {
    const int k0 = step * kBlockK;
    const bool a_k_valid = k0 + 8 * a_chunk < k;
#pragma unroll
    for (int i = 0; i < kBlockM / 16; ++i) {  // 16 rows apart: 128 threads / 8 chunks
      const bool valid = a_k_valid && 16 * i < a_rows_left;
      cp_async16(a_stage(stage) + a_dst + 16 * i * kARowBytes,
                 valid ? static_cast<const void*>(a_src + int64_t(16 * i) * k + k0) : x, valid);
    }
    const bool b_k_valid = k0 + 32 * b_half < k;
    const int32_t* src = b_src + k0 / 8;
    cp_async16(b_stage(stage) + b_dst, b_k_valid && b_valid0 ? static_cast<const void*>(src) : qweight,
               b_k_valid && b_valid0);
    cp_async16(b_stage(stage) + b_dst + 64 * kBRowBytes,
               b_k_valid && b_valid1 ? static_cast<const void*>(src + 64 * int64_t(words_per_row)) : qweight,
               b_k_valid && b_valid1);
  };

  // (s, m) of both 32-channel halves of a step; zero past n and k.
  __half2 sm_next[2];
  auto load_scales = [&](int step) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kk = step * kBlockK + 32 * h;
      sm_next[h] = __float2half2_rn(0.0f);
      if (s_valid && kk < k) {
        const int64_t g = s_base + (kk >> group_shift);
        sm_next[h] = __halves2half2(scales[g], offsets[g]);
      }
    }
  };
  auto store_scales = [&](int stage) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 v = __half22float2(sm_next[h]);
      s_stage(stage)[h * kBlockN + tid] = Scale{v.x, v.x * 0.0625f, v.y, 0.0f};
    }
  };

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const int c4 = lane % 4, g8 = lane / 4;
  auto compute = [&](int stage) {
    const uint8_t* b_tile = smem + stage * kStageBytes + kABytes;
    const Scale* s_tile = s_stage(stage);
#pragma unroll
    for (int ks = 0; ks < kBlockK / 16; ++ks) {
      // k16 slice ks lies in 32-channel half h = ks / 2 (one (s, m) per W row) and is
      // words 2 (ks % 2), 2 (ks % 2) + 1 of that half's 16-byte chunk (ptxas merges the
      // two slices' 8-byte loads into one 16-byte load per half).
      const int h = ks / 2;
      uint32_t b[kNTiles][2];
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
        const int col = warp * kWarpN + 8 * j + g8;
        const uint2 words = *reinterpret_cast<const uint2*>(
            b_tile + col * kBRowBytes + ((h ^ ((col / 4) % 2)) * 16) + (ks % 2) * 8);
        const Scale sc = s_tile[h * kBlockN + col];
        b[j][0] = dequant_pair<T>(words.x >> (8 * c4), sc);  // k = 2c, 2c+1
        b[j][1] = dequant_pair<T>(words.y >> (8 * c4), sc);  // k = 2c+8, 2c+9
      }
#pragma unroll
      for (int i = 0; i < kMTiles; ++i) {
        // ldmatrix.x4: lanes 0-15 address rows 0-15 at chunk 2ks, lanes 16-31 the same
        // rows at chunk 2ks + 1 -> a0..a3 of the m16n8k16 A fragment. row % 8 == lane % 8.
        const int row = 16 * i + (lane % 16);
        const int chunk = 2 * ks + lane / 16;
        uint32_t a[4];
        ldmatrix_x4(a, a_stage(stage) + row * kARowBytes + ((chunk ^ (lane % 8)) * 16));
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) mma_16816<T>(acc[i][j], a, b[j][0], b[j][1]);
      }
    }
  };

  // Multistage pipeline: slot s % kStages holds step s. One commit group per step (empty
  // ones past the end keep the count uniform), so waiting until kStages - 2 groups are
  // pending means this thread's copies for the current step have landed; the barrier
  // makes everyone's visible and also frees the slot of the previous step for reuse.
  const int steps = (k + kBlockK - 1) / kBlockK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) {
      load_tiles(s, s);
      load_scales(s);
      store_scales(s);
    }
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = step + kStages - 1;
    const bool has_next = next < steps;
    if (has_next) {
      load_tiles(next % kStages, next);
      load_scales(next);
    }
    cp_async_commit();
    compute(step % kStages);
    // The slot of `next` last served step - 1, which every thread finished before the
    // barrier above; it is read at step `next` >= step + 1, after the next barrier.
    if (has_next) store_scales(next % kStages);
  }
  cp_async_wait<0>();  // no copy may be outstanding when the block exits

  // Computed afresh rather than kept in registers through the main loop, which at ~250
  // registers would otherwise spill them on sm_80.
  tile_origin(tiles_m, tiles_n, m0, n0);
  // C fragment: c0, c1 at row g8, columns 2c, 2c+1 of the n8 tile; c2, c3 at row g8 + 8.
#pragma unroll
  for (int i = 0; i < kMTiles; ++i) {
    const int row = m0 + 16 * i + g8;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      const int col = n0 + warp * kWarpN + 8 * j + 2 * c4;
      store_pair(out, row, col, m, n, pair_stores, acc[i][j][0], acc[i][j][1]);
      store_pair(out, row + 8, col, m, n, pair_stores, acc[i][j][2], acc[i][j][3]);
    }
  }
#else
  // cp.async and bfloat16 MMA need sm_80; the launcher refuses older devices.
  __trap();
#endif
}

template <typename T>
Status launch(const Context& ctx, T* out, const T* x, int m, const Int4Weight& w) {
  int major = 0;
  FIL_RETURN_IF_ERROR(cuda_status(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, ctx.device_index),
      "int4_gemm: cudaDeviceGetAttribute"));
  if (major < 8)
    return Status(StatusCode::kCudaError, concat("int4_gemm with m > 16 needs a GPU of compute "
                                                 "capability 8.0 or newer, got ", major, ".x"));
  const int64_t tiles_m = (m + kBlockM - 1) / kBlockM;
  const int64_t tiles_n = (w.n + kBlockN - 1) / kBlockN;
  // The raster computes kGroupTilesM * tiles_n and block indices in int.
  if (tiles_m * tiles_n > 0x7fffffff || kGroupTilesM * tiles_n > 0x7fffffff)
    return invalid_value("int4_gemm: m * n is too large for one CUDA launch (", tiles_m * tiles_n,
                         " tiles of 128 x 128, at most 2^31 - 1)");
  auto kernel = int4_gemm_large_m_kernel<T>;
  // Above 48 KiB a kernel must opt in to dynamic shared memory (per device, so every call).
  FIL_RETURN_IF_ERROR(cuda_status(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
      "int4_gemm: cudaFuncSetAttribute"));
  const bool pair_stores = w.n % 2 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0;
  kernel<<<static_cast<unsigned>(tiles_m * tiles_n), kThreads, kSmemBytes, stream_of(ctx)>>>(
      out, x, m, w.qweight, static_cast<const __half*>(w.scales),
      static_cast<const __half*>(w.offsets), static_cast<int>(w.n), static_cast<int>(w.k),
      static_cast<int>(w.group_size), static_cast<int>(tiles_m), static_cast<int>(tiles_n),
      pair_stores);
  return launch_status("int4_gemm");
}

}  // namespace

Status int4_gemm_large_m(const Context& ctx, DType dtype, void* out, const void* x, int64_t m,
                         const Int4Weight& w) {
  FIL_RETURN_IF_ERROR(set_device(ctx));
  return dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    // m < 2^31 is checked by the op's entry (int4_gemm in int4_gemm.cpp).
    return launch<T>(ctx, static_cast<T*>(out), static_cast<const T*>(x), static_cast<int>(m), w);
  });
}

}  // namespace cuda
}  // namespace fastinternlm
