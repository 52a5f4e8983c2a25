// Prefill attention on CUDA tensor cores, flash-attention-2 style. The derivation of the
// choices below, with the numbers, is in docs/kernels/attention.md.
//
// A small kernel first writes the chunk's k, v into the cache; the attention kernel then
// reads every key/value from the cache, so earlier chunks' keys and this chunk's are one
// contiguous range [0, kv_end).
// - A block (8 warps) owns 128 query rows of ONE KV group (row = (token, query head)), so
//   each K/V tile staged in shared memory serves all G query heads: G times fewer K/V bytes
//   from L2 per FLOP. 128 rows rather than 64 halve L2 traffic again.
// - A warp owns 16 rows (the M of mma.m16n8k16); Q fragments, S = Q K^T and O stay in
//   registers, row statistics need only quad shuffles, and P goes from the S accumulators
//   straight into the A operand of P V (the C layout of two n-blocks is the A layout of
//   one k-block), never through shared memory.
// - K/V tiles of 64 keys arrive by cp.async into a double buffer (the next tile's loads
//   overlap this tile's math). Shared rows are padded by 16 B: with a pitch that is a
//   multiple of 128 B the 8 rows one ldmatrix reads would hit the same 4 banks.
// - Numerics: scores and softmax in float32, max-subtracted; the scale is folded into
//   exp2's argument (one FFMA) rather than into q, which would add a rounding of q. P is
//   rounded once to the activation dtype for the P V mma (as FA2 and SDPA do); the
//   normaliser sums the unrounded float32 values.
// - Causal schedule: the longest query tiles are issued first, so the grid's tail is short
//   blocks; a block loads only key tiles up to its last query and masks only those past
//   its first.
#include <cstdint>

#include "cuda_common.cuh"
#include "kernels_cuda.h"
#include "kv_quant.cuh"
#include "mma.cuh"

namespace fastinternlm {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kPrefillWarps = 8;
constexpr int kPrefillThreads = kPrefillWarps * 32;
constexpr int kTileRows = kPrefillWarps * 16;  // query rows per block, 16 per warp (mma M)
constexpr int kTileKeys = 64;                  // keys per shared-memory K/V tile

template <int D>
struct PrefillLayout {
  static constexpr int kPitch = D + 8;  // halves per smem row: +16 B against ldmatrix conflicts
  static constexpr int kQ = 0;          // offsets in halves
  static constexpr int kK = kQ + kTileRows * kPitch;
  static constexpr int kV = kK + 2 * kTileKeys * kPitch;  // two stages each of K and V
  static constexpr int kHalves = kV + 2 * kTileKeys * kPitch;
  static constexpr int kBytes = kHalves * 2;
};

// A quantized cache (F = 1 int8, 2 int4): the K/V tiles arrive as codes (cp.async, double
// buffered like the activation-dtype tiles, at a half or a quarter of the bytes) and are
// dequantized in shared memory into one activation-dtype K and V tile, which the mma loop
// reads as it reads the F = 0 tiles. Only the tile in use is ever in T: no copy of the
// cache is made.
template <int D, int F>
struct PrefillQuantLayout {
  static constexpr int kPitch = D + 8;
  static constexpr int kQ = 0;  // offsets in halves
  static constexpr int kK = kQ + kTileRows * kPitch;
  static constexpr int kV = kK + kTileKeys * kPitch;
  static constexpr int kHalves = kV + kTileKeys * kPitch;
  static constexpr int kCodeRow = D * kv_cache_bits(static_cast<KVCacheFormat>(F)) / 8;  // bytes
  static constexpr int kCodeStage = 2 * kTileKeys * kCodeRow;                           // K, then V
  static constexpr int kCodes = kHalves * 2;                                            // in bytes
  static constexpr int kBytes = kCodes + 2 * kCodeStage;
};

template <int D, int F>
constexpr int prefill_smem_bytes() {
  if constexpr (F == 0)
    return PrefillLayout<D>::kBytes;
  else
    return PrefillQuantLayout<D, F>::kBytes;
}

// 2^x by the MUFU unit alone. exp2f adds a compare, a select and two multiplies per call to
// return denormal results exactly; here results below 2^-126 flush to 0, an absolute error
// far below anything that survives the normalisation by l >= 1, and the 32 exponentials
// per thread per tile are a visible share of the issue slots next to 128 mma per warp.
// -inf (masked scores) still gives +0.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats rounded to T, the first in the low half (the lower column of an mma fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// ---------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(256)
prefill_write_kv_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k,
                        const T* __restrict__ v, int64_t tokens, int kv_heads, int head_dim,
                        int64_t max_seq, int64_t slot, int64_t start) {
  const int vecs_per_row = head_dim / 8;  // 16-byte vectors
  const int64_t total = tokens * kv_heads * vecs_per_row;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = idx / vecs_per_row;  // t * kv_heads + h, the layout of k and v
    const int c = static_cast<int>(idx % vecs_per_row);
    const int64_t t = row / kv_heads, h = row % kv_heads;
    const int64_t dst = ((slot * kv_heads + h) * max_seq + start + t) * head_dim + c * 8;
    const int64_t src = row * head_dim + c * 8;
    *reinterpret_cast<uint4*>(k_cache + dst) = *reinterpret_cast<const uint4*>(k + src);
    *reinterpret_cast<uint4*>(v_cache + dst) = *reinterpret_cast<const uint4*>(v + src);
  }
}

// The quantized cache's write: a row group of L = D/8 lanes per (token, KV head) row, each
// lane 8 values (16 bytes) of k and of v; each group's minimum and maximum come from
// shuffles within its lanes (kv_quant.cuh). Rows and offsets in int64.
template <typename T, int D, int F>
__global__ void __launch_bounds__(256)
prefill_write_kv_quant_kernel(uint8_t* __restrict__ k_cache, uint8_t* __restrict__ v_cache,
                              KVParam<T>* __restrict__ k_params, KVParam<T>* __restrict__ v_params,
                              const T* __restrict__ k, const T* __restrict__ v, int64_t tokens, int kv_heads,
                              int64_t max_seq, int64_t slot, int64_t start) {
  using C = CacheLane<T, F>;
  using Raw = typename C::Raw;
  constexpr int L = D / 8, kRowsPerBlock = 256 / L;
  constexpr int kRow = D * kv_cache_bits(static_cast<KVCacheFormat>(F)) / 8, kLane = kRow / L;
  constexpr int kPairs = C::template kGroups<D>, kPairLanes = L / kPairs;
  const int64_t rows = tokens * kv_heads;
  const int lane = threadIdx.x % L;
  // The trip count is uniform over the block (the shuffles need whole warps).
  for (int64_t r0 = blockIdx.x * int64_t{kRowsPerBlock}; r0 < rows; r0 += int64_t{gridDim.x} * kRowsPerBlock) {
    const int64_t row = r0 + threadIdx.x / L;  // t * kv_heads + h, the layout of k and v
    const bool valid = row < rows;
    uint4 kr = make_uint4(0, 0, 0, 0), vr = kr;
    if (valid) {
      kr = *reinterpret_cast<const uint4*>(k + row * D + lane * 8);
      vr = *reinterpret_cast<const uint4*>(v + row * D + lane * 8);
    }
    float x[8];
    float2 kp, vp;
    unpack<T, 8>(x, kr);
    const Raw kq = C::template quantize<D>(x, kp);
    unpack<T, 8>(x, vr);
    const Raw vq = C::template quantize<D>(x, vp);
    if (valid) {
      const int64_t t = row / kv_heads, h = row % kv_heads;
      const int64_t dst = (slot * kv_heads + h) * max_seq + start + t;  // cache row
      *reinterpret_cast<Raw*>(k_cache + dst * kRow + lane * kLane) = kq;
      *reinterpret_cast<Raw*>(v_cache + dst * kRow + lane * kLane) = vq;
      if (lane % kPairLanes == 0) {
        k_params[dst * kPairs + lane / kPairLanes] = param_store<T>(kp);
        v_params[dst * kPairs + lane / kPairLanes] = param_store<T>(vp);
      }
    }
  }
}

// Fragment layouts of mma.m16n8k16 used below (g = lane / 4, t = lane % 4):
//   A (16x16): a0 = (row g, col 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16x8):  c0, c1 = (row g, n 2t, 2t+1), c2, c3 = (row g+8, n 2t, 2t+1)
// ldmatrix.x4: lanes 8j..8j+7 address the 8 rows of matrix j; register j then holds, in
// lane l, elements (l / 4, 2 (l % 4) .. +1) of matrix j (of its transpose with .trans).
// One block per SM is asked for: Q (D/16 x 4), O (D/8 x 4) and S (32) fragments need ~200
// registers at D = 128, and capping D = 64 at 128 registers (2 blocks per SM) made ptxas
// spill (8-16 bytes, sm_80); 8 warps with double-buffered cp.async loads still overlap
// memory and math.
// F: the cache format. For F = 0 k_cache, v_cache are the cache and the trailing four
// arguments unused; for a quantized cache k_cache, v_cache are unused and the codes and
// parameters come last (so the F = 0 kernel's parameters and code are as before).
template <typename T, int D, int F>
__global__ void __launch_bounds__(kPrefillThreads, 1)
prefill_attention_kernel(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,
                         const T* __restrict__ v_cache, int tokens, int q_heads, int group,
                         int tile_tokens, int kv_heads, int64_t max_seq, int64_t slot,
                         int64_t start, float scale_log2, const uint8_t* __restrict__ k_codes,
                         const uint8_t* __restrict__ v_codes, const KVParam<T>* __restrict__ k_params,
                         const KVParam<T>* __restrict__ v_params) {
  using L = PrefillLayout<D>;
  using LQ = PrefillQuantLayout<D, F == 0 ? 1 : F>;
  constexpr int P = L::kPitch;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ uint4 smem_raw[];
  T* const sm = reinterpret_cast<T*>(smem_raw);

  // Blocks are dispatched in index order: the KV head varies fastest and the query tile
  // goes from the last (most keys) to the first, so the longest blocks start first.
  const int kvh = static_cast<int>(blockIdx.x % kv_heads);
  const int tile = static_cast<int>(gridDim.x / kv_heads - 1 - blockIdx.x / kv_heads);
  const int q0 = tile * tile_tokens;
  const int nq = min(tile_tokens, tokens - q0);
  const int rows = nq * group;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  const int64_t head = (slot * kv_heads + kvh) * max_seq;  // int64: cache offsets pass 2^31
  const T* const kc = k_cache + head * D;
  const T* const vc = v_cache + head * D;
  // Positions fit int, even a key tile past the end: start + tokens <= max_seq <= 2^31 - 1
  // - kTileKeys (checked by the launcher), and 32-bit math takes half the registers.
  const int first_pos = static_cast<int>(start) + q0;
  const int kv_end = first_pos + nq;  // one past the block's last query position
  const int n_tiles = (kv_end + kTileKeys - 1) / kTileKeys;

  // Q: padded rows (i >= rows) are zero-filled and never stored.
  // Fixed trip counts, unrolled: the loads issue back to back without loop branches.
  static_assert(kTileRows * kChunks % kPrefillThreads == 0 && kTileKeys * kChunks % kPrefillThreads == 0,
                "every thread copies the same number of 16-byte chunks");
#pragma unroll
  for (int it = 0; it < kTileRows * kChunks / kPrefillThreads; ++it) {
    const int idx = tid + it * kPrefillThreads;
    const int i = idx / kChunks, c = idx % kChunks;  // consecutive lanes, consecutive chunks
    const bool valid = i < rows;
    const int ti = valid ? i / group : 0, gi = valid ? i % group : 0;
    cp_async16(smem_address(sm + L::kQ + i * P + c * 8),
                q + (int64_t{q0 + ti} * q_heads + kvh * group + gi) * D + c * 8, valid);
  }
  // Keys past kv_end (the last tile's tail, at most max_seq) are zero-filled: their scores
  // are masked, but V must be exact zeros, since 0 * (stale inf/NaN) would poison O.
  auto load_kv = [&](int tile_idx, int stage) {
    const int k0 = tile_idx * kTileKeys;  // < max_seq <= 2^31 - 1 - kTileKeys
    T* const ks = sm + L::kK + stage * kTileKeys * P;
    T* const vs = sm + L::kV + stage * kTileKeys * P;
#pragma unroll
    for (int it = 0; it < kTileKeys * kChunks / kPrefillThreads; ++it) {
      const int idx = tid + it * kPrefillThreads;
      const int j = idx / kChunks, c = idx % kChunks;
      const bool valid = k0 + j < kv_end;
      const int64_t off = int64_t{valid ? k0 + j : 0} * D + c * 8;
      cp_async16(smem_address(ks + j * P + c * 8), kc + off, valid);
      cp_async16(smem_address(vs + j * P + c * 8), vc + off, valid);
    }
  };
  // Quantized: a tile's codes to code stage `stage` (zero-filled past kv_end like F = 0's
  // rows), then, once landed, dequantized into the T tiles with the keys' parameters.
  constexpr int kCodeChunks = LQ::kCodeRow / 16;  // 16-byte chunks per row of codes
  auto load_codes = [&](int tile_idx, int stage) {
    const int k0 = tile_idx * kTileKeys;
    uint8_t* const cs = reinterpret_cast<uint8_t*>(smem_raw) + LQ::kCodes + stage * LQ::kCodeStage;
#pragma unroll
    for (int idx = tid; idx < kTileKeys * kCodeChunks; idx += kPrefillThreads) {
      const int j = idx / kCodeChunks, c = idx % kCodeChunks;
      const bool valid = k0 + j < kv_end;
      const int64_t off = (head + (valid ? k0 + j : 0)) * LQ::kCodeRow + c * 16;
      cp_async16(smem_address(cs + j * LQ::kCodeRow + c * 16), k_codes + off, valid);
      cp_async16(smem_address(cs + (kTileKeys + j) * LQ::kCodeRow + c * 16), v_codes + off, valid);
    }
  };
  auto dequantize_tile = [&](int tile_idx, int stage) {
    using C = CacheLane<T, F == 0 ? 1 : F>;
    using Raw = typename C::Raw;
    constexpr int kLane = LQ::kCodeRow / (D / 8);  // bytes of codes per 8 values
    constexpr int kPairs = C::template kGroups<D>, kPairLanes = (D / 8) / kPairs;
    const int k0 = tile_idx * kTileKeys;
    const uint8_t* const cs = reinterpret_cast<const uint8_t*>(smem_raw) + LQ::kCodes + stage * LQ::kCodeStage;
#pragma unroll
    for (int idx = tid; idx < kTileKeys * (D / 8); idx += kPrefillThreads) {
      const int j = idx / (D / 8), c = idx % (D / 8);
      // Past kv_end: zero codes (zero-filled) and zero parameters give exact zeros.
      const bool valid = k0 + j < kv_end;
      const int64_t pair = (head + k0 + j) * kPairs + c / kPairLanes;  // of these 8 values
      const float2 kp = valid ? param_to_float2(k_params[pair]) : make_float2(0.0f, 0.0f);
      const float2 vp = valid ? param_to_float2(v_params[pair]) : make_float2(0.0f, 0.0f);
      float f[8];
      uint4 packed;
      C::unpack(f, *reinterpret_cast<const Raw*>(cs + j * LQ::kCodeRow + c * kLane), kp);
      packed = make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
      *reinterpret_cast<uint4*>(sm + LQ::kK + j * P + c * 8) = packed;
      C::unpack(f, *reinterpret_cast<const Raw*>(cs + (kTileKeys + j) * LQ::kCodeRow + c * kLane), vp);
      packed = make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
      *reinterpret_cast<uint4*>(sm + LQ::kV + j * P + c * 8) = packed;
    }
  };
  cp_async_commit();  // group: Q
  if constexpr (F == 0)
    load_kv(0, 0);
  else
    load_codes(0, 0);
  cp_async_commit();  // group: the first K/V tile, still in flight while Q goes to registers

  // The two rows this lane holds in every accumulator, and their query positions. Padded
  // rows take the last real row's position: finite statistics, never stored.
  const int r0 = warp * 16 + lane / 4, r1 = r0 + 8;
  const int pos0 = first_pos + min(r0, rows - 1) / group;
  const int pos1 = first_pos + min(r1, rows - 1) / group;
  const int t2 = 2 * (lane % 4);

  cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    // Matrices: rows 0-7 / 8-15 of the warp's 16, at columns kk*16 + 0 / + 8.
    const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int col = kk * 16 + (lane >> 4) * 8;
    ldmatrix_x4(qf[kk], smem_address(sm + L::kQ + row * P + col));
  }
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // m in raw score units (scaled by scale_log2 at use); l is this lane's partial sum over
  // its columns, reduced over the quad once at the end (every rescale factor is uniform
  // across the quad, so partial sums rescale consistently).
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_tiles) {
      if constexpr (F == 0)
        load_kv(it + 1, stage ^ 1);  // that stage was last read in iteration it - 1, before
      else                           // the barrier that ended it
        load_codes(it + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();  // this tile's group has landed (the next may be in flight)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies of this tile are visible

    const T* ks;
    const T* vs;
    if constexpr (F == 0) {
      ks = sm + L::kK + stage * kTileKeys * P;
      vs = sm + L::kV + stage * kTileKeys * P;
    } else {
      // The T tiles were last read in iteration it - 1, before the barrier that ended it.
      dequantize_tile(it, stage);
      __syncthreads();
      ks = sm + LQ::kK;
      vs = sm + LQ::kV;
    }

    // S = Q K^T: 16 rows x 64 keys per warp, as 8 n-blocks of 8 keys.
    float s[kTileKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kTileKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int n = 0; n < kTileKeys / 8; n += 2) {
        // K[key][d] is B^T row-major, i.e. B in "col" layout: no transpose. Matrices:
        // (keys n*8.., d kk*16..), (keys n*8.., d +8), (keys n*8+8.., d ..), (.., d +8).
        uint32_t b[4];
        const int key = n * 8 + (lane & 7) + (lane >> 4) * 8;
        const int col = kk * 16 + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(b, smem_address(ks + key * P + col));
        mma_16816<T>(s[n], qf[kk], b[0], b[1]);
        mma_16816<T>(s[n + 1], qf[kk], b[2], b[3]);
      }
    }

    // Causal mask, only where the tile reaches past the block's first query position.
    // Every row sees key 0 in tile 0 (positions are >= 0), so m is finite from then on
    // and exp2(m_old - m_new) never meets -inf - (-inf).
    const int k0 = it * kTileKeys;
    if (k0 + kTileKeys - 1 > first_pos) {
#pragma unroll
      for (int n = 0; n < kTileKeys / 8; ++n) {
        const int key = k0 + n * 8 + t2;
        if (key > pos0) s[n][0] = -INFINITY;
        if (key + 1 > pos0) s[n][1] = -INFINITY;
        if (key > pos1) s[n][2] = -INFINITY;
        if (key + 1 > pos1) s[n][3] = -INFINITY;
      }
    }

    // Online softmax for the lane's two rows; a row's 64 scores live in one quad.
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int n = 0; n < kTileKeys / 8; ++n) {
      mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
      mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float ms0 = mn0 * scale_log2, ms1 = mn1 * scale_log2;
    const float alpha0 = exp2_ftz(m0 * scale_log2 - ms0), alpha1 = exp2_ftz(m1 * scale_log2 - ms1);
    m0 = mn0;
    m1 = mn1;
    float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
    for (int n = 0; n < kTileKeys / 8; ++n) {
      s[n][0] = exp2_ftz(fmaf(s[n][0], scale_log2, -ms0));
      s[n][1] = exp2_ftz(fmaf(s[n][1], scale_log2, -ms0));
      s[n][2] = exp2_ftz(fmaf(s[n][2], scale_log2, -ms1));
      s[n][3] = exp2_ftz(fmaf(s[n][3], scale_log2, -ms1));
      sum0 += s[n][0] + s[n][1];
      sum1 += s[n][2] + s[n][3];
    }
    l0 = l0 * alpha0 + sum0;
    l1 = l1 * alpha1 + sum1;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= alpha0;
      o[n][1] *= alpha0;
      o[n][2] *= alpha1;
      o[n][3] *= alpha1;
    }

    // O += P V. The C fragments of key n-blocks 2kk and 2kk+1 are the A fragment of key
    // k-block kk (see the layouts above), so P is only rounded to T and repacked.
#pragma unroll
    for (int kk = 0; kk < kTileKeys / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        // V[key][d] is B row-major (k = key): .trans gives the col layout. Matrices:
        // (keys kk*16.., d n*8..), (keys +8, d n*8..), (keys .., d n*8+8..), (keys +8, d +8).
        uint32_t b[4];
        const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int col = n * 8 + (lane >> 4) * 8;
        ldmatrix_x4_trans(b, smem_address(vs + key * P + col));
        mma_16816<T>(o[n], a, b[0], b[1]);
        mma_16816<T>(o[n + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // this stage is free for the loads issued next iteration
  }

#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
  // Direct 4-byte stores: the output is written once per block, a negligible share of the
  // time next to the O(keys) loop, so staging it for 16-byte stores is not worth the smem.
  if (r0 < rows) {
    T* const dst = out + (int64_t{q0 + r0 / group} * q_heads + kvh * group + r0 % group) * D + t2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2<T>(o[n][0] * inv0, o[n][1] * inv0);
  }
  if (r1 < rows) {
    T* const dst = out + (int64_t{q0 + r1 / group} * q_heads + kvh * group + r1 % group) * D + t2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2<T>(o[n][2] * inv1, o[n][3] * inv1);
  }
}

// Over the 48 KiB default, the dynamic shared memory is an opt-in per kernel (and device),
// cheap to repeat. Done before the cache write: a device whose opt-in maximum is smaller
// (sm_86 and sm_89 allow 99 KiB; head_dim 128 with a float16 or int8 cache needs more)
// refuses the call with the cache untouched, not after the new rows are in it.
template <typename T, int D, int F>
Status opt_in_prefill_smem(const Context& ctx) {
  constexpr int smem = prefill_smem_bytes<D, F>();
  int limit = 0;
  FIL_RETURN_IF_ERROR(cuda_status(
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, ctx.device_index),
      "attention_prefill: cudaDeviceGetAttribute"));
  if (smem > limit)
    return invalid_value("attention_prefill: head_dim ", D, " with this cache format needs ", smem,
                         " bytes of shared memory per block, the device allows ", limit);
  return cuda_status(
      cudaFuncSetAttribute(prefill_attention_kernel<T, D, F>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
      "attention_prefill: cudaFuncSetAttribute");
}

template <typename T, int D, int F>
Status launch_prefill(const Context& ctx, T* out, const T* q, const T* kc, const T* vc,
                      const KVCache& cache, int64_t tokens, int64_t q_heads, int64_t slot,
                      int64_t start, float scale) {
  const int64_t group = q_heads / cache.kv_heads;
  const int tile_tokens = static_cast<int>(kTileRows / group);
  const int64_t blocks = (tokens + tile_tokens - 1) / tile_tokens * cache.kv_heads;
  auto kernel = prefill_attention_kernel<T, D, F>;
  constexpr int smem = prefill_smem_bytes<D, F>();
  kernel<<<static_cast<unsigned>(blocks), kPrefillThreads, smem, stream_of(ctx)>>>(
      out, q, kc, vc, static_cast<int>(tokens), static_cast<int>(q_heads), static_cast<int>(group),
      tile_tokens, static_cast<int>(cache.kv_heads), cache.max_seq, slot, start, scale * kLog2e,
      static_cast<const uint8_t*>(F == 0 ? nullptr : cache.k), static_cast<const uint8_t*>(F == 0 ? nullptr : cache.v),
      static_cast<const KVParam<T>*>(cache.k_params), static_cast<const KVParam<T>*>(cache.v_params));
  return launch_status("attention_prefill");
}

}  // namespace

Status attention_prefill(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                         const void* v, const KVCache& cache, int64_t tokens, int64_t q_heads,
                         int64_t slot, int64_t start, float scale) {
  // Refused before anything is written. The 1-D grid has ceil(tokens / tile tokens) *
  // kv_heads blocks. (tokens, kv_heads and max_seq, whose bound keeps a key tile past the
  // last position in int32, are validated by the caller; these are far above any model's
  // sizes.)
  static_assert(kTileKeys <= 256, "the caller's max_seq bound leaves 256 positions of headroom");
  if (tokens * cache.kv_heads > 0x7fffffff)  // a block has at least one token
    return invalid_value("attention_prefill: tokens * kv_heads must be <= ", 0x7fffffff,
                         " on CUDA, got ", tokens, " * ", cache.kv_heads);
  FIL_RETURN_IF_ERROR(set_device(ctx));
  const cudaStream_t stream = stream_of(ctx);
  return dispatch_half(dtype, [&](auto tag) -> Status {
    using T = decltype(tag);
    T* o = static_cast<T*>(out);
    const T* qq = static_cast<const T*>(q);
    if (cache.format == KVCacheFormat::kActivation) {
      T* kc = static_cast<T*>(cache.k);
      T* vc = static_cast<T*>(cache.v);
      FIL_RETURN_IF_ERROR((cache.head_dim == 64 ? opt_in_prefill_smem<T, 64, 0>(ctx)
                                                : opt_in_prefill_smem<T, 128, 0>(ctx)));
      const int64_t vecs = tokens * cache.kv_heads * (cache.head_dim / 8);
      const unsigned write_blocks = static_cast<unsigned>(vecs / 256 + 1 < 8192 ? vecs / 256 + 1 : 8192);
      prefill_write_kv_kernel<T><<<write_blocks, 256, 0, stream>>>(
          kc, vc, static_cast<const T*>(k), static_cast<const T*>(v), tokens,
          static_cast<int>(cache.kv_heads), static_cast<int>(cache.head_dim), cache.max_seq, slot, start);
      FIL_RETURN_IF_ERROR(launch_status("attention_prefill (cache write)"));
      switch (cache.head_dim) {
        case 64: return launch_prefill<T, 64, 0>(ctx, o, qq, kc, vc, cache, tokens, q_heads, slot, start, scale);
        case 128: return launch_prefill<T, 128, 0>(ctx, o, qq, kc, vc, cache, tokens, q_heads, slot, start, scale);
        default: return invalid_value("head_dim must be one of {64, 128}, got ", cache.head_dim);
      }
    }
    auto quantized = [&](auto dim, auto fmt) -> Status {
      constexpr int D = decltype(dim)::value, F = decltype(fmt)::value;
      FIL_RETURN_IF_ERROR((opt_in_prefill_smem<T, D, F>(ctx)));
      const int64_t rows = tokens * cache.kv_heads;
      constexpr int kRowsPerBlock = 256 / (D / 8);
      const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
      prefill_write_kv_quant_kernel<T, D, F><<<static_cast<unsigned>(blocks < 8192 ? blocks : 8192), 256, 0, stream>>>(
          static_cast<uint8_t*>(cache.k), static_cast<uint8_t*>(cache.v), static_cast<KVParam<T>*>(cache.k_params),
          static_cast<KVParam<T>*>(cache.v_params), static_cast<const T*>(k), static_cast<const T*>(v), tokens,
          static_cast<int>(cache.kv_heads), cache.max_seq, slot, start);
      FIL_RETURN_IF_ERROR(launch_status("attention_prefill (quantized cache write)"));
      return launch_prefill<T, D, F>(ctx, o, qq, nullptr, nullptr, cache, tokens, q_heads, slot, start, scale);
    };
    using I8 = std::integral_constant<int, 1>;
    using I4 = std::integral_constant<int, 2>;
    const bool int8 = cache.format == KVCacheFormat::kInt8;
    switch (cache.head_dim) {
      case 64: return int8 ? quantized(std::integral_constant<int, 64>{}, I8{}) : quantized(std::integral_constant<int, 64>{}, I4{});
      case 128: return int8 ? quantized(std::integral_constant<int, 128>{}, I8{}) : quantized(std::integral_constant<int, 128>{}, I4{});
      default: return invalid_value("head_dim must be one of {64, 128}, got ", cache.head_dim);
    }
  });
}

}  // namespace cuda
}  // namespace fastinternlm
