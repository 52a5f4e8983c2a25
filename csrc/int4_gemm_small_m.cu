// int4_gemm for M <= 16 (decode) on CUDA: a tensor-core GEMV that streams the packed
// weights (format v1, include/fastinternlm/int4_gemm.h) once for all M rows of x.
// Design notes (mapping onto m16n8k16, nibble conversion, issue-slot and bytes-in-flight
// budgets): docs/kernels/int4_gemm.md.
//
// Numerics: per group, sum_k x_k (q_k s + m) = s * sum x_k q_k + m * sum x_k. The tensor
// cores see only the raw nibbles (exact in f16/bf16) and x (exact in its own type), so
// their products are exact in the fp32 accumulators; after each group the kernel folds
// out += s * acc + m * xsum in fp32 (xsum from one extra mma with an all-ones B). Same
// function as the reference; only where the fp32 roundings fall differs; one rounding to
// the output type at the end.
// Why tensor cores for a memory-bound GEMV: on CUDA cores each nibble costs more issue
// slots than an SM has per byte of DRAM bandwidth; one mma does 16 x 8 x 16 multiply-adds.
// One mma must not mix groups (one scale per sum), hence a lane's quarter of a group per
// mma and the kernel templated on the group size. Tokens past m and rows past n are loaded
// as copies of the last valid one (no masking in the hot loop) and not stored.
#include <cstdint>

#include "cuda_common.cuh"
#include "kernels_cuda.h"
#include "mma.cuh"

namespace fastinternlm {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
// n-blocks of 8 rows of W per block, NB. More reuse each x fragment, each xsum mma and
// each PRMT over more weights (group 128, f16: NB = 2 ~195 SASS instructions per KB of
// weights per warp, NB = 3 ~175), but give fewer blocks: with 2 a 4096-row layer has 256
// blocks, about two per SM on 132 SMs. So 3 only for layers of >= kWideN rows
// (InternLM2-7B's fused gate/up projection, 28672 rows, over half the weight bytes). Not
// 4: its group-128 kernel needs more than the 128 registers that two blocks per SM allow
// (ptxas spills), 3 fits in ~118.
constexpr int kWideN = 16384;

// Groups per pipeline step of the default configuration, for 16-32 bytes per lane and row
// per step in flight (x2 for the double buffer) within 128 registers: group 128 with
// NB = 2 streams two 128-bit loads per row and step, NB = 3 one, the smaller groups as
// many narrower ones.
template <int G, int NB>
constexpr int default_groups_per_step() {
  return (G == 32 ? 4 : 2) / (NB > 2 ? 2 : 1);
}

// One kernel configuration. The knobs trade bytes in flight, issue slots and grid shape
// against each other, and which balance is fastest was not measurable without a GPU, so
// a few are built (see kVariants below) and picked at run time for benchmarking.
//   NB      n-blocks of 8 rows of W per block (reuse of x fragments and xsum mmas)
//   WARPS   warps per block, each taking a contiguous range of the groups of k
//   U       groups per pipeline step
//   STAGES  register buffers of steps: STAGES - 1 steps of loads in flight while one computes
//   MINB    __launch_bounds__ minimum blocks per SM (caps registers at 65536 / (32 WARPS MINB))
template <int G, int NB_, int WARPS_, int U_, int STAGES_, int MINB_>
struct SmallMShape {
  static constexpr int kNB = NB_, kWarps = WARPS_, kStages = STAGES_, kMinBlocks = MINB_;
  static constexpr int kThreads = 32 * WARPS_;
  static constexpr int kLaneWords = G / 32;  // 32-bit words a lane streams per row and group
  static constexpr int kGroupsPerStep = U_;
  static constexpr int kRowsPerBlock = 8 * NB_;
  static_assert(NB_ >= 1 && NB_ <= 4, "a block's rows must fit one (s, m) pair per lane");
  static_assert(STAGES_ >= 2, "at least double buffering");
};

template <typename T>
struct MmaType;
template <>
struct MmaType<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;     // (1024, 1024)
  static constexpr uint32_t kNegMagic = 0xE400E400u;  // (-1024, -1024)
  static constexpr uint32_t kOnes = 0x3C003C00u;      // (1, 1)
};
template <>
struct MmaType<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;     // (128, 128)
  static constexpr uint32_t kNegMagic = 0xC300C300u;  // (-128, -128)
  static constexpr uint32_t kOnes = 0x3F803F80u;      // (1, 1)
};

// (bits & mask) | magic as one LOP3. Written in C++ the two constants become two LOP3s
// (SASS LOP3 takes one immediate); here ptxas keeps the magic in a register.
template <uint32_t kMask>
__device__ __forceinline__ uint32_t mask_or_magic(uint32_t bits, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(bits), "n"(kMask), "r"(magic));
  return r;
}

// a * b + c on a pair of halves; HFMA2 because sm_80 has no bf16x2 add/sub instruction.
template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c);
template <>
__device__ __forceinline__ uint32_t fma2<__half>(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
template <>
__device__ __forceinline__ uint32_t fma2<__nv_bfloat16>(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// The B registers of mma h (0 or 1) of a word: b0 = (q of nibble 2h, q of nibble 2h + 4),
// b1 = (nibble 2h + 1, nibble 2h + 5), each exact.
template <typename T>
__device__ __forceinline__ void nibble_pairs(uint32_t word, int h, uint32_t& b0, uint32_t& b1);
template <>
__device__ __forceinline__ void nibble_pairs<__half>(uint32_t word, int h, uint32_t& b0,
                                                     uint32_t& b1) {
  // f16 saves two shifts per word: the odd nibble is used in place, as 1024 + 16 q (ulp 1
  // at 1024, so exact), and (1024 + 16 q) / 16 - 64 = q is exact in one HFMA2.
  const uint32_t base = h ? word >> 8 : word;
  b0 = fma2<__half>(mask_or_magic<0x000F000Fu>(base, MmaType<__half>::kMagic),
                    MmaType<__half>::kOnes, MmaType<__half>::kNegMagic);
  b1 = fma2<__half>(mask_or_magic<0x00F000F0u>(base, MmaType<__half>::kMagic),
                    0x2C002C00u /* (1/16, 1/16) */, 0xD400D400u /* (-64, -64) */);
}
template <>
__device__ __forceinline__ void nibble_pairs<__nv_bfloat16>(uint32_t word, int h, uint32_t& b0,
                                                            uint32_t& b1) {
  // bf16 has 7 mantissa bits, too few to take a nibble in bits 4..7 in place.
  using M = MmaType<__nv_bfloat16>;
  b0 = fma2<__nv_bfloat16>(mask_or_magic<0x000F000Fu>(word >> (8 * h), M::kMagic), M::kOnes,
                           M::kNegMagic);
  b1 = fma2<__nv_bfloat16>(mask_or_magic<0x000F000Fu>(word >> (8 * h + 4), M::kMagic), M::kOnes,
                           M::kNegMagic);
}

// A lane's quarter of one group of one row. Streaming (evict-first) loads: every weight is
// read exactly once per call, and caching it would only evict x and the scales.
template <int W>
__device__ __forceinline__ void load_quarter(uint32_t (&dst)[W], const int32_t* p);
template <>
__device__ __forceinline__ void load_quarter<4>(uint32_t (&dst)[4], const int32_t* p) {
  const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
  dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
}
template <>
__device__ __forceinline__ void load_quarter<2>(uint32_t (&dst)[2], const int32_t* p) {
  const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
  dst[0] = v.x, dst[1] = v.y;
}
template <>
__device__ __forceinline__ void load_quarter<1>(uint32_t (&dst)[1], const int32_t* p) {
  dst[0] = __ldcs(reinterpret_cast<const unsigned int*>(p));
}

// Everything one pipeline step of a warp reads from DRAM: per group and n-block, the
// lane's quarter-row of nibbles; per group, the (s, m) pair of row `lane` of the block
// (8 * NB <= 32 rows, so one pair per lane covers them all). The fold takes the pairs of
// its C columns 2tig and 2tig + 1 of n-block nb from lanes 8 nb + 2tig and 8 nb + 2tig + 1
// with two shuffles: two 2-byte loads per lane and group, at fixed offsets from two
// pointers, instead of four per n-block with index arithmetic.
template <typename S>
struct Step {
  uint32_t w[S::kGroupsPerStep][S::kNB][S::kLaneWords];
  __half2 sm[S::kGroupsPerStep];
};

template <typename T, int G, typename S>
__global__ void __launch_bounds__(S::kThreads, S::kMinBlocks)
int4_gemm_small_m_kernel(T* __restrict__ out, const T* __restrict__ x, int m,
                         const int32_t* __restrict__ qweight, const __half* __restrict__ scales,
                         const __half* __restrict__ offsets, int n, int k) {
  constexpr int kNB = S::kNB, kWarps = S::kWarps, kThreads = S::kThreads;
  // The attention kernel after the wqkv GEMV may launch now and start on the cached keys
  // (it waits for this grid before reading our output; cuda_common.cuh, PDL).
  pdl_trigger();
  constexpr int LW = S::kLaneWords, U = S::kGroupsPerStep;
  __shared__ float partial[kWarps][kNB * 4][32];  // [warp][accumulator][lane]: conflict-free

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int n0 = blockIdx.x * S::kRowsPerBlock;  // < n < 2^31
  const int groups = k / G;
  // This warp's contiguous range of groups (sizes differ by at most one).
  const int g_begin = static_cast<int>(int64_t(groups) * warp / kWarps);
  const int g_end = static_cast<int>(int64_t(groups) * (warp + 1) / kWarps);

  // Rows of W past n and tokens past m are clamped to the last valid one instead of being
  // masked: a B column (row of W) reaches only its own C column and an A row (token) only
  // its own C row, and those outputs are never stored. So every read stays in bounds and
  // the hot loop spends no instructions on predicates or zero fill (only the last block
  // re-reads up to 7 rows).
  const int32_t* wp[kNB];  // lane's quarter of group g_begin in its row of each n-block
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb) {
    const int r = min(n0 + nb * 8 + gid, n - 1);
    wp[nb] = qweight + int64_t(r) * (k / 8) + int64_t(g_begin) * (G / 8) + tig * LW;
  }
  // Scale and offset of group g_begin of the block's row `lane` (rows repeat for NB = 2).
  const int srow = min(n0 + lane % S::kRowsPerBlock, n - 1);
  const __half* sp = scales + int64_t(srow) * groups + g_begin;
  const __half* mp = offsets + int64_t(srow) * groups + g_begin;
  // The lane's two tokens (A rows gid and gid + 8), at its quarter of group g_begin.
  const T* xp0 = x + int64_t(min(gid, m - 1)) * k + int64_t(g_begin) * G + tig * (G / 4);
  const T* xp1 = x + int64_t(min(gid + 8, m - 1)) * k + int64_t(g_begin) * G + tig * (G / 4);

  // Issues the loads of the U groups from g_load (the part of them inside this warp's
  // range; the rest of st is left as it was and never used) and moves the pointers on.
  auto load_step = [&](Step<S>& st, int g_load) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (g_load + u < g_end) {
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) load_quarter<LW>(st.w[u][nb], wp[nb] + u * (G / 8));
        st.sm[u] = __halves2half2(__ldg(sp + u), __ldg(mp + u));
      }
    }
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) wp[nb] += U * (G / 8);
    sp += U, mp += U;
  };

  float acc_out[kNB][4];
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc_out[nb][i] = 0.0f;

  // The groups g0 .. g0 + U - 1 (those inside the range), whose data st holds. (For
  // m <= 8 A's rows 8..15 could repeat rows 0..7 instead of being loaded, but the mma's
  // register quads then cost a MOV for each PRMT saved: no gain in SASS.)
  auto compute_step = [&](const Step<S>& st, int g0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (g0 + u >= g_end) break;  // warp-uniform: mma.sync needs the whole warp
      float acc[kNB][4], xsum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nb][i] = 0.0f;
#pragma unroll
      for (int j = 0; j < LW; ++j) {
        // 8 consecutive x values of each of the lane's two tokens; x is small and shared
        // by every block, so it comes through L1/L2 (cached loads).
        const uint4 xa = __ldg(reinterpret_cast<const uint4*>(xp0 + 8 * j));
        const uint4 xb = __ldg(reinterpret_cast<const uint4*>(xp1 + 8 * j));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // h = 0: k-slot pairs (x0, x4), (x1, x5) with nibble pairs word >> 0, >> 4;
          // h = 1: (x2, x6), (x3, x7) with word >> 8, >> 12.
          const uint32_t lo_a = h ? xa.y : xa.x, hi_a = h ? xa.w : xa.z;
          const uint32_t lo_b = h ? xb.y : xb.x, hi_b = h ? xb.w : xb.z;
          const uint32_t a[4] = {__byte_perm(lo_a, hi_a, 0x5410), __byte_perm(lo_b, hi_b, 0x5410),
                                 __byte_perm(lo_a, hi_a, 0x7632), __byte_perm(lo_b, hi_b, 0x7632)};
          mma_16816<T>(xsum, a, MmaType<T>::kOnes, MmaType<T>::kOnes);
#pragma unroll
          for (int nb = 0; nb < kNB; ++nb) {
            uint32_t b0, b1;
            nibble_pairs<T>(st.w[u][nb][j], h, b0, b1);
            mma_16816<T>(acc[nb], a, b0, b1);
          }
        }
      }
      xp0 += G, xp1 += G;
      // Fold the group: out += s * sum(x q) + m * sum(x), per accumulator column.
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        const uint32_t pair = *reinterpret_cast<const uint32_t*>(&st.sm[u]);
        const uint32_t p0 = __shfl_sync(kFullMask, pair, 8 * nb + 2 * tig);
        const uint32_t p1 = __shfl_sync(kFullMask, pair, 8 * nb + 2 * tig + 1);
        const float2 c0 = __half22float2(*reinterpret_cast<const __half2*>(&p0));  // (s, m)
        const float2 c1 = __half22float2(*reinterpret_cast<const __half2*>(&p1));
        acc_out[nb][0] = fmaf(c0.x, acc[nb][0], fmaf(c0.y, xsum[0], acc_out[nb][0]));
        acc_out[nb][1] = fmaf(c1.x, acc[nb][1], fmaf(c1.y, xsum[1], acc_out[nb][1]));
        acc_out[nb][2] = fmaf(c0.x, acc[nb][2], fmaf(c0.y, xsum[2], acc_out[nb][2]));
        acc_out[nb][3] = fmaf(c1.x, acc[nb][3], fmaf(c1.y, xsum[3], acc_out[nb][3]));
      }
    }
  };

  // kStages register buffers used as a ring: the loads of the step kStages - 1 ahead go
  // out before this step's math. The loops are unrolled over the ring, so every buffer
  // index is a constant and no registers are copied between buffers. Two stages keep the
  // original ping-pong loop, whose exit test ptxas schedules with fewer registers.
  constexpr int kStages = S::kStages;
  if constexpr (kStages == 2) {
    Step<S> sa, sb;
    load_step(sa, g_begin);
    pdl_wait();  // x comes from the previous kernel; the weights in flight do not
    for (int g0 = g_begin; g0 < g_end; g0 += 2 * U) {
      load_step(sb, g0 + U);
      compute_step(sa, g0);
      if (g0 + U >= g_end) break;
      load_step(sa, g0 + 2 * U);
      compute_step(sb, g0 + U);
    }
  } else {
    Step<S> st[kStages];
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) load_step(st[s], g_begin + s * U);
    pdl_wait();  // x comes from the previous kernel; the weights in flight do not
    for (int g0 = g_begin; g0 < g_end; g0 += kStages * U) {
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        load_step(st[(s + kStages - 1) % kStages], g0 + (s + kStages - 1) * U);
        compute_step(st[s], g0 + s * U);
        if (g0 + (s + 1) * U >= g_end) break;  // then the outer loop ends too
      }
    }
  }

  // Sum the warps' partial results (warps with no groups contribute zeros) in a fixed
  // order, so the result does not depend on scheduling.
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][nb * 4 + i][lane] = acc_out[nb][i];
  __syncthreads();
  for (int v = threadIdx.x; v < kNB * 4 * 32; v += kThreads) {
    const int reg = v / 32, l = v % 32;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][reg][l];
    const int nb = reg / 4, i = reg % 4;
    const int token = l / 4 + (i >= 2 ? 8 : 0);
    const int row = n0 + nb * 8 + 2 * (l % 4) + (i & 1);
    if (token < m && row < n) out[token * int64_t(n) + row] = from_float<T>(sum);
  }
}

template <typename T, int G, typename S>
Status launch_shape(const Context& ctx, T* out, const T* x, int m, const Int4Weight& w) {
  const unsigned blocks = ceil_div(w.n, S::kRowsPerBlock);  // <= 2^28
  // A PDL dependent (cuda_common.cuh): its first weight loads overlap the kernel before it.
  return launch_dependent(int4_gemm_small_m_kernel<T, G, S>, dim3(blocks), dim3(S::kThreads), 0, ctx,
                          "int4_gemm", out, x, m, w.qweight, static_cast<const __half*>(w.scales),
                          static_cast<const __half*>(w.offsets), static_cast<int>(w.n),
                          static_cast<int>(w.k));
}

template <typename T, int G, int NB>
Status launch_default_nb(const Context& ctx, T* out, const T* x, int m, const Int4Weight& w) {
  return launch_shape<T, G, SmallMShape<G, NB, 8, default_groups_per_step<G, NB>(), 2, 2>>(
      ctx, out, x, m, w);
}

// The default configuration: 8 warps, double buffering, two blocks per SM (128 registers).
template <typename T, int G>
Status launch(const Context& ctx, T* out, const T* x, int m, const Int4Weight& w) {
  return w.n >= kWideN ? launch_default_nb<T, G, 3>(ctx, out, x, m, w)
                       : launch_default_nb<T, G, 2>(ctx, out, x, m, w);
}

// The benchmarking variants (group 128 only; kInt4SmallMVariants in int4_gemm.h counts
// them with the default, variant 0). Each probes one hypothesis for why the default reads
// the weights well below copy bandwidth (the measured shares are in docs/benchmarks.md;
// sm_90a registers f16/bf16: the default has 122/118 for NB 2, 118/118 for NB 3):
//   1  NB 2, 8 warps, 1 group/step, 3 stages, 2 blocks/SM: the default's bytes in flight
//      as a finer ring, so loads are issued every group instead of every two (120/120)
//   2  NB 2, 4 warps, 2 groups/step, 2 stages, 4 blocks/SM: twice the k-range per warp
//      (a steady state of 4 steps at k = 4096), half the split-K reduction (122/118)
//   3  NB 2, 4 warps, 2 groups/step, 3 stages, 3 blocks/SM (168 registers): most bytes in
//      flight per warp, at 12 warps per SM (U 2 with 3 stages spills at 128 registers) (148/148)
//   4  NB 1, 8 warps, 2 groups/step, 2 stages, 3 blocks/SM (85 registers): 24 warps per
//      SM and twice the blocks: occupancy and grid shape instead of per-warp depth (80/80)
//   5  NB 4, 4 warps, 1 group/step, 2 stages, 3 blocks/SM (168 registers): fewest issue
//      slots per byte (x fragments and xsum mmas shared by 32 rows) (142/144)
template <typename T>
Status launch_variant(int variant, const Context& ctx, T* out, const T* x, int m,
                      const Int4Weight& w) {
  switch (variant) {
    case 1: return launch_shape<T, 128, SmallMShape<128, 2, 8, 1, 3, 2>>(ctx, out, x, m, w);
    case 2: return launch_shape<T, 128, SmallMShape<128, 2, 4, 2, 2, 4>>(ctx, out, x, m, w);
    case 3: return launch_shape<T, 128, SmallMShape<128, 2, 4, 2, 3, 3>>(ctx, out, x, m, w);
    case 4: return launch_shape<T, 128, SmallMShape<128, 1, 8, 2, 2, 3>>(ctx, out, x, m, w);
    case 5: return launch_shape<T, 128, SmallMShape<128, 4, 4, 1, 2, 3>>(ctx, out, x, m, w);
    default: return launch<T, 128>(ctx, out, x, m, w);
  }
}

}  // namespace

// The PDL switch of common.h lives here, beside its main user.
void set_programmatic_launch(bool enabled) { pdl_setting().store(enabled ? 1 : 0); }
bool programmatic_launch() { return pdl_setting().load() != 0; }

Status int4_gemm_small_m(const Context& ctx, DType dtype, void* out, const void* x, int64_t m,
                         const Int4Weight& w) {
  if (m < 1 || m > 16)
    return invalid_value("int4_gemm_small_m: m must be in [1, 16], got ", m);
  // Read once per call: the benchmarking hook may change it between calls.
  const int variant = int4_gemm_small_m_variant();
  if (variant < 0 || variant >= kInt4SmallMVariants)
    return invalid_value("int4_gemm_small_m: variant must be in [0, ", kInt4SmallMVariants,
                         "), got ", variant);
  if (variant != 0 && w.group_size != 128)
    return invalid_value("int4_gemm_small_m: variant ", variant,
                         " is built for group_size 128 only, got ", w.group_size);
  FIL_RETURN_IF_ERROR(set_device(ctx));
  const int mi = static_cast<int>(m);
  return dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* o = static_cast<T*>(out);
    const auto* xi = static_cast<const T*>(x);
    switch (w.group_size) {
      case 32: return launch<T, 32>(ctx, o, xi, mi, w);
      case 64: return launch<T, 64>(ctx, o, xi, mi, w);
      case 128: return launch_variant<T>(variant, ctx, o, xi, mi, w);
      default:
        return invalid_value("int4_gemm_small_m: group_size must be 32, 64 or 128, got ",
                             w.group_size);
    }
  });
}

}  // namespace cuda
}  // namespace fastinternlm
