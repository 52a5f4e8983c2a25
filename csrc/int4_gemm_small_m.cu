// int4_gemm for M <= 16 (decode) on CUDA: a tensor-core GEMV that streams the packed
// weights (format v1, include/fastinternlm/int4_gemm.h) once for all M rows of x.
//
// Why tensor cores for a memory-bound GEMV: on the CUDA cores every nibble costs an
// extract, a dequantizing FMA and M accumulating FMAs, which is more issue slots than an
// SM has per byte of DRAM bandwidth. One mma.sync m16n8k16 does 16 x 8 x 16 multiply-adds
// in one instruction, so the per-nibble work drops to converting it to f16/bf16 (about one
// instruction per two nibbles) and the kernel is left bound by the weight stream.
//
// The arithmetic. Each output is sum_k x_k (q_k s_g + m_g) over the groups g of its row.
// The group affine is factored out of the dot product:
//     sum_{k in g} x_k (q_k s + m) = s * sum_{k in g} x_k q_k  +  m * sum_{k in g} x_k,
// so the tensor cores see only the raw nibbles q (0..15), which f16 and bf16 hold exactly,
// and x, which is exact in its own type. Their products are exact in the fp32
// accumulators; only the fp32 sums round. After each group the kernel folds
//     out += s * acc_group + m * xsum_group          (fp32, two FMAs)
// where xsum_group comes from one extra mma per k16-step whose B is all ones (it is the
// same for every row of W, so a warp computes it once for all its n-blocks). This is the
// same function as the reference (dequantize, multiply, sum); it differs only in where
// the fp32 roundings fall. The result is rounded to the output type once.
//
// Mapping onto m16n8k16 (row.col): A = x (16 rows = tokens; rows >= m are zero registers
// and never loaded), B = W^T (n = 8 rows of W per mma), C fp32. Fragment layout (PTX ISA,
// "Matrix Fragments for mma.m16n8k16"), with lane = 4 * gid + tig:
//   A  reg0: row gid,   k 2tig, 2tig+1     reg1: row gid+8, k 2tig, 2tig+1
//      reg2: row gid,   k 2tig+8, 2tig+9   reg3: row gid+8, k 2tig+8, 2tig+9
//   B  reg0: k 2tig, 2tig+1, n gid         reg1: k 2tig+8, 2tig+9, n gid
//   C  c0, c1: row gid, n 2tig, 2tig+1     c2, c3: row gid+8, n 2tig, 2tig+1
// (the lower k of a pair in the low 16 bits). A lane's k-slots are the same in A and B,
// and the mma sums over all 16 of them, so any assignment of real input channels to the
// slots gives the same dot product as long as A and B use the same one. The kernel
// assigns them so that each lane streams contiguous bytes of ONE row of W: the 4 lanes of
// a quad (same gid) read consecutive quarters of a group of that row (lane tig the
// quarter tig), and feed their own nibbles into their own slots. x is then loaded for
// exactly the channels the lane holds.
//
// One mma must not mix groups (its sum gets one scale), and a quad covers 4 quarters of
// one group per mma, so a lane's quarter is group_size / 4 channels = group_size / 8
// bytes: 16 B (one 128-bit load) for group 128, 8 B for 64, 4 B for 32. Hence the kernel
// is templated on the group size; group 128 (the 7B checkpoints) is the case tuned for.
//
// Nibbles to f16/bf16 without conversions: (word >> 4j) & 0x000F000F puts nibbles j and
// j + 4 in the low bits of each 16-bit half. OR-ing the exponent of 1024 (f16, 0x6400,
// ulp 1 there) or 128 (bf16, 0x4300, ulp 1 there) makes the pair (1024 + q, 1024 + q')
// exactly, and one HFMA2 (times 1, minus the magic) gives (q, q') exactly. So word >> 0
// feeds k-pair (n0, n4), >> 4 (n1, n5), >> 8 (n2, n6), >> 12 (n3, n7): two mmas per word,
// and the matching x pairs (x0, x4), (x1, x5), ... come from a 16-byte load of 8
// consecutive x values with one PRMT each.
//
// Bytes in flight: a block of kWarps warps owns kNB n-blocks of 8 rows and splits the
// groups of k across its warps (contiguous ranges, so each lane still streams contiguous
// bytes); the partial sums meet in shared memory at the end. Each warp loads the weights
// and scales of its next step before computing the current one (register double
// buffering), so a warp has two steps of loads in flight while it computes.
#include <cstdint>

#include "cuda_common.cuh"
#include "kernels_cuda.h"

namespace fastinternlm {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
// n-blocks of 8 rows of W per block. Two reuse each x fragment (and each xsum mma) twice
// and give a 4096-row layer 256 blocks, enough to put about two on each of 132 SMs; four
// would leave an H100 with fewer blocks than SMs on that shape.
constexpr int kNB = 2;
constexpr int kRowsPerBlock = 8 * kNB;

template <int G>
struct SmallMShape {
  static constexpr int kLaneWords = G / 32;  // 32-bit words a lane streams per row and group
  // Groups per pipeline step: group 128 streams 32 bytes per lane and row per step (two
  // 128-bit loads); the smaller groups 16 bytes in narrower loads, more of them.
  static constexpr int kGroupsPerStep = G == 32 ? 4 : 2;
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

// (q, q') from bits = (word >> 4j) & 0x000F000F: (magic + q) * 1 - magic, exact. HFMA2
// rather than a subtraction because sm_80 has no bf16x2 add/sub instruction.
template <typename T>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t word, int shift);
template <>
__device__ __forceinline__ uint32_t nibble_pair<__half>(uint32_t word, int shift) {
  const uint32_t biased = ((word >> shift) & 0x000F000Fu) | MmaType<__half>::kMagic;
  uint32_t r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;"
      : "=r"(r)
      : "r"(biased), "r"(MmaType<__half>::kOnes), "r"(MmaType<__half>::kNegMagic));
  return r;
}
template <>
__device__ __forceinline__ uint32_t nibble_pair<__nv_bfloat16>(uint32_t word, int shift) {
  const uint32_t biased = ((word >> shift) & 0x000F000Fu) | MmaType<__nv_bfloat16>::kMagic;
  uint32_t r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;"
      : "=r"(r)
      : "r"(biased), "r"(MmaType<__nv_bfloat16>::kOnes),
        "r"(MmaType<__nv_bfloat16>::kNegMagic));
  return r;
}

// d += A * B on the tensor cores, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1);
template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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
// lane's quarter-row of nibbles and the scales and offsets of its two accumulator columns.
template <int G>
struct Step {
  uint32_t w[SmallMShape<G>::kGroupsPerStep][kNB][SmallMShape<G>::kLaneWords];
  __half2 s[SmallMShape<G>::kGroupsPerStep][kNB];  // (s of column 2tig, s of 2tig + 1)
  __half2 m[SmallMShape<G>::kGroupsPerStep][kNB];
};

template <typename T, int G>
__global__ void __launch_bounds__(kThreads, 2)
int4_gemm_small_m_kernel(T* __restrict__ out, const T* __restrict__ x, int m,
                         const int32_t* __restrict__ qweight, const __half* __restrict__ scales,
                         const __half* __restrict__ offsets, int n, int k) {
  using S = SmallMShape<G>;
  constexpr int LW = S::kLaneWords, U = S::kGroupsPerStep;
  __shared__ float partial[kWarps][kNB * 4][32];  // [warp][accumulator][lane]: conflict-free

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int64_t n0 = int64_t(blockIdx.x) * kRowsPerBlock;
  const int groups = k / G;
  // This warp's contiguous range of groups (sizes differ by at most one).
  const int g_begin = static_cast<int>(int64_t(groups) * warp / kWarps);
  const int g_end = static_cast<int>(int64_t(groups) * (warp + 1) / kWarps);

  // Rows this lane streams (B column gid of each n-block) and the rows whose scales it
  // needs (its C columns 2tig, 2tig + 1). Rows past n are never read.
  const int32_t* wrow[kNB];
  bool wvalid[kNB], svalid0[kNB], svalid1[kNB];
  int64_t srow[kNB];
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb) {
    const int64_t r = n0 + nb * 8 + gid;
    wvalid[nb] = r < n;
    wrow[nb] = qweight + (wvalid[nb] ? r : 0) * (k / 8) + tig * LW;
    const int64_t sr = n0 + nb * 8 + 2 * tig;
    svalid0[nb] = sr < n;
    svalid1[nb] = sr + 1 < n;
    srow[nb] = sr * groups;
  }
  // The two rows of x (tokens gid and gid + 8) this lane feeds to A; rows past m are zero.
  const bool xvalid0 = gid < m, xvalid1 = gid + 8 < m;
  const T* xrow0 = x + (xvalid0 ? gid : 0) * int64_t(k) + tig * (G / 4);
  const T* xrow1 = x + (xvalid1 ? gid + 8 : 0) * int64_t(k) + tig * (G / 4);

  auto load_step = [&](Step<G>& st, int gi0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int gi = gi0 + u;
      const bool gv = gi < g_end;
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        if (gv && wvalid[nb]) {
          load_quarter<LW>(st.w[u][nb], wrow[nb] + int64_t(gi) * (G / 8));
        } else {
#pragma unroll
          for (int j = 0; j < LW; ++j) st.w[u][nb][j] = 0u;
        }
        const __half zero = __float2half_rn(0.0f);
        const __half s0 = gv && svalid0[nb] ? __ldg(scales + srow[nb] + gi) : zero;
        const __half m0 = gv && svalid0[nb] ? __ldg(offsets + srow[nb] + gi) : zero;
        const __half s1 = gv && svalid1[nb] ? __ldg(scales + srow[nb] + groups + gi) : zero;
        const __half m1 = gv && svalid1[nb] ? __ldg(offsets + srow[nb] + groups + gi) : zero;
        st.s[u][nb] = __halves2half2(s0, s1);
        st.m[u][nb] = __halves2half2(m0, m1);
      }
    }
  };

  float acc_out[kNB][4];
#pragma unroll
  for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc_out[nb][i] = 0.0f;

  Step<G> cur;
  load_step(cur, g_begin);
  for (int gi0 = g_begin; gi0 < g_end; gi0 += U) {
    // The next step's loads go out before this step's math (predicated off past g_end).
    Step<G> next;
    load_step(next, gi0 + U);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int gi = gi0 + u;
      if (gi >= g_end) break;  // warp-uniform: mma.sync needs the whole warp
      float acc[kNB][4], xsum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nb][i] = 0.0f;
#pragma unroll
      for (int j = 0; j < LW; ++j) {
        // 8 consecutive x values of each of the lane's two token rows; x is small and
        // shared by every block, so it comes through L1/L2 (cached loads).
        const int64_t kx = int64_t(gi) * G + 8 * j;
        const uint4 xa = xvalid0 ? __ldg(reinterpret_cast<const uint4*>(xrow0 + kx))
                                 : make_uint4(0u, 0u, 0u, 0u);
        const uint4 xb = xvalid1 ? __ldg(reinterpret_cast<const uint4*>(xrow1 + kx))
                                 : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // h = 0: k-slot pairs (x0, x4), (x1, x5) with nibble pairs word >> 0, >> 4;
          // h = 1: (x2, x6), (x3, x7) with word >> 8, >> 12.
          const uint32_t lo_a = h ? xa.y : xa.x, hi_a = h ? xa.w : xa.z;
          const uint32_t lo_b = h ? xb.y : xb.x, hi_b = h ? xb.w : xb.z;
          const uint32_t a[4] = {__byte_perm(lo_a, hi_a, 0x5410), __byte_perm(lo_b, hi_b, 0x5410),
                                 __byte_perm(lo_a, hi_a, 0x7632), __byte_perm(lo_b, hi_b, 0x7632)};
          mma<T>(xsum, a, MmaType<T>::kOnes, MmaType<T>::kOnes);
#pragma unroll
          for (int nb = 0; nb < kNB; ++nb) {
            const uint32_t word = cur.w[u][nb][j];
            mma<T>(acc[nb], a, nibble_pair<T>(word, 8 * h), nibble_pair<T>(word, 8 * h + 4));
          }
        }
      }
      // Fold the group: out += s * sum(x q) + m * sum(x), per accumulator column.
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        const float2 s = __half22float2(cur.s[u][nb]);
        const float2 mo = __half22float2(cur.m[u][nb]);
        acc_out[nb][0] = fmaf(s.x, acc[nb][0], fmaf(mo.x, xsum[0], acc_out[nb][0]));
        acc_out[nb][1] = fmaf(s.y, acc[nb][1], fmaf(mo.y, xsum[1], acc_out[nb][1]));
        acc_out[nb][2] = fmaf(s.x, acc[nb][2], fmaf(mo.x, xsum[2], acc_out[nb][2]));
        acc_out[nb][3] = fmaf(s.y, acc[nb][3], fmaf(mo.y, xsum[3], acc_out[nb][3]));
      }
    }
    cur = next;
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
    const int64_t row = n0 + nb * 8 + 2 * (l % 4) + (i & 1);
    if (token < m && row < n) out[token * int64_t(n) + row] = from_float<T>(sum);
  }
}

template <typename T, int G>
Status launch(const Context& ctx, T* out, const T* x, int m, const Int4Weight& w) {
  const unsigned blocks = ceil_div(w.n, kRowsPerBlock);  // n < 2^31: at most 2^27 blocks
  int4_gemm_small_m_kernel<T, G><<<blocks, kThreads, 0, stream_of(ctx)>>>(
      out, x, m, w.qweight, static_cast<const __half*>(w.scales),
      static_cast<const __half*>(w.offsets), static_cast<int>(w.n), static_cast<int>(w.k));
  return launch_status("int4_gemm");
}

}  // namespace

Status int4_gemm_small_m(const Context& ctx, DType dtype, void* out, const void* x, int64_t m,
                         const Int4Weight& w) {
  if (m < 1 || m > 16)
    return invalid_value("int4_gemm_small_m: m must be in [1, 16], got ", m);
  FIL_RETURN_IF_ERROR(set_device(ctx));
  const int mi = static_cast<int>(m);
  return dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* o = static_cast<T*>(out);
    const auto* xi = static_cast<const T*>(x);
    switch (w.group_size) {
      case 32: return launch<T, 32>(ctx, o, xi, mi, w);
      case 64: return launch<T, 64>(ctx, o, xi, mi, w);
      case 128: return launch<T, 128>(ctx, o, xi, mi, w);
      default:
        return invalid_value("int4_gemm_small_m: group_size must be 32, 64 or 128, got ",
                             w.group_size);
    }
  });
}

}  // namespace cuda
}  // namespace fastinternlm
