// Attention over the KV cache on CUDA: decode. Prefill (tensor cores) is in
// attention_prefill.cu.
//
// Design notes and measurements: docs/kernels/attention.md.
//
// Decode (one token per sequence): flash-decoding. A sequence's context is cut into up to
// `splits` chunks; block (split, kv head, sequence) computes an unnormalised partial
// softmax (max, sum, acc[D]) for all query heads of the KV group, so every K/V byte is
// loaded once for the whole group, and a second kernel merges the partials. The number of
// splits depends on sizes only (batch, kv_heads, max_seq), never on positions, so the
// workspace size is known on the host and the step can be captured in a CUDA graph; each
// sequence divides its own length over the splits and splits past its end return at once.
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "kernels_cuda.h"
#include "kv_quant.cuh"
#include "rope.cuh"

namespace fastinternlm {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

// ---------------------------------------------------------------------------------------
// Decode

constexpr int kDecodeThreads = 128;
constexpr int kMaxSplits = 256;
// The split sizing (defaults in attention.h):
// - kDecodeMinChunk, 64 tokens: below it a block's fixed costs (q load, merge of its row
//   groups, the partial's store) dominate.
// - kDecodeTargetBlocks, 264: about two 4-warp blocks per SM of a 132-SM H100; fewer,
//   longer splits pay each block's fixed cost (q and the merge) less often. The sweep that
//   chose it is in docs/kernels/attention.md.
// Both can be changed for benchmark sweeps (set_decode_split_tuning); they are read on the
// host at every launch and passed to the kernels.
std::atomic<int> g_min_chunk{static_cast<int>(kDecodeMinChunk)};
std::atomic<int64_t> g_target_blocks{kDecodeTargetBlocks};

int decode_splits(int64_t batch, int64_t kv_heads, int64_t max_seq) {
  const int64_t min_chunk = g_min_chunk.load(std::memory_order_relaxed);
  const int64_t by_len = (max_seq + min_chunk - 1) / min_chunk;
  const int64_t target = g_target_blocks.load(std::memory_order_relaxed);
  const int64_t by_grid = (target + batch * kv_heads - 1) / (batch * kv_heads);
  int64_t s = by_len < by_grid ? by_len : by_grid;
  if (s > kMaxSplits) s = kMaxSplits;
  return static_cast<int>(s < 1 ? 1 : s);
}

// Tokens per split for a sequence of `len` tokens: all splits busy when the context is
// long, a multiple of 16 (the block's token stride for head_dim 64), never below min_chunk.
// ceil(len / chunk) <= splits always holds.
__device__ __forceinline__ int decode_chunk(int len, int splits, int min_chunk) {
  int64_t per = (int64_t{len} + splits - 1) / splits;
  per = (per + 15) / 16 * 16;
  return static_cast<int>(per < min_chunk ? min_chunk : per);
}

__device__ __forceinline__ bool decode_valid(int slot, int pos, int num_slots, int max_seq) {
  return slot >= 0 && slot < num_slots && pos >= 0 && pos < max_seq;
}

// RoPE of one head row held as 8 dims per lane (lane l of a row group has dims 8l..8l+7):
// dim i pairs with i + D/2, which sits in lane l ^ (L/2) of the same row group, so one
// shuffle of the raw 16 bytes brings the partner's values. The arithmetic and its roundings
// are rotary.cu's (HF's order: each product rounded to T, then the sum), so the fused
// decode stores exactly the k that rotary_embedding + attention_decode would.
template <typename T, int D>
__device__ __forceinline__ uint4 rope_lane(const uint4& own, int lane, const float* cos_t, const float* sin_t) {
  constexpr int L = D / 8;
  uint4 other;
  other.x = __shfl_xor_sync(0xffffffffu, own.x, L / 2);
  other.y = __shfl_xor_sync(0xffffffffu, own.y, L / 2);
  other.z = __shfl_xor_sync(0xffffffffu, own.z, L / 2);
  other.w = __shfl_xor_sync(0xffffffffu, own.w, L / 2);
  float a[8], o[8], r[8];
  unpack<T, 8>(a, own);
  unpack<T, 8>(o, other);
  const bool first = lane < L / 2;  // holds x1 (dims < D/2); the partner holds x2
  const int i0 = (first ? lane : lane - L / 2) * 8;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float c = cos_t[i0 + j], sn = sin_t[i0 + j];
    r[j] = first ? round_to<T>(a[j] * c) - round_to<T>(o[j] * sn)   // x1' = x1 c - x2 s
                 : round_to<T>(a[j] * c) + round_to<T>(o[j] * sn);  // x2' = x2 c + x1 s
  }
  uint4 out;
  auto* h = reinterpret_cast<typename Half2Of<T>::type*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = from_float2<T>(r[2 * i], r[2 * i + 1]);
  return out;
}

// Where a sequence's new q, k and v rows live: separate [batch, heads, D] tensors, or the
// grouped output of InternLM2's fused wqkv ([batch, kv_heads, G + 2, D]: per KV head its G
// query rows, then k, then v). Strides in elements; the G query rows of a group are
// always consecutive rows of D.
template <typename T>
struct DecodeRows {
  const T* q;
  const T* k;
  const T* v;
  int64_t q_batch, q_group;    // q row of (b, kv head, i) = q + b*q_batch + kvh*q_group + i*D
  int64_t kv_batch, kv_group;  // k/v row of (b, kv head) = k + b*kv_batch + kvh*kv_group
  const float* bases;          // nullptr: q and k are already rotated; else RoPE them here
};

// Block (split, kv head, sequence). Threads form row groups of L = D/8 lanes; a row group
// takes one token at a time, each lane 8 of its dims (a 16-byte load), so a warp reads
// 32/L whole rows of 2*D bytes: fully coalesced. U tokens per row group are loaded before
// any is used, which keeps 2*U 16-byte loads in flight per thread.
// Occupancy: at most 128 registers for groups up to 4 (the 7B model's), so 4 blocks (16
// warps) fit an SM and keep enough loads in flight; larger groups need more registers for
// q and acc and settle for 2.
// F: the cache format (CacheLane). The quantized formats' parameters come last so that the
// F = 0 kernel's parameter layout, and with it its code, is what it was before they existed.
template <typename T, int D, int G, int F>
__global__ void __launch_bounds__(kDecodeThreads, G <= 4 ? 4 : 2)
decode_split_kernel(T* __restrict__ out, float2* __restrict__ ws_ml, float* __restrict__ ws_acc,
                    const DecodeRows<T> in, CacheElem<T, F>* k_cache, CacheElem<T, F>* v_cache, int num_slots, int kv_heads, int max_seq,
                    const int32_t* __restrict__ slots, const int32_t* __restrict__ positions,
                    float scale_log2, int splits, int min_chunk, KVParam<T>* k_params, KVParam<T>* v_params) {
  using C = CacheLane<T, F>;
  using Raw = typename C::Raw;
  using Elem = CacheElem<T, F>;
  constexpr int kRow = F == 0 ? D : D * kv_cache_bits(static_cast<KVCacheFormat>(F)) / 8;
  constexpr int kLane = kRow / (D / 8);
  // (scale, zero) pairs per row, and the one of this lane's 8 values (kv_quant.cuh).
  constexpr int kPairs = F == 0 ? 1 : CacheLaneQuantized<T, F == 0 ? 1 : F>::template kGroups<D>;
  constexpr int kPairLanes = (D / 8) / kPairs;
  // With one split there is no merge: the wo GEMV follows this kernel directly and may
  // launch now (cuda_common.cuh, PDL); with a merge after it this has no effect.
  pdl_trigger();
  constexpr int L = D / 8;
  constexpr int R = kDecodeThreads / L;
  constexpr int U = G <= 4 ? 4 : 2;  // the q and acc registers grow with G; fewer tokens
                                     // in flight keep large groups from spilling
  __shared__ __align__(16) float sm_acc[R][G][D];  // written as float4
  __shared__ float sm_m[R][G], sm_l[R][G];

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % L, rg = tid / L;
  const int q_heads = kv_heads * G;
  const int slot = slots[b], pos = positions[b];
  const bool direct = splits == 1;  // no merge pass: normalise and store here
  const int64_t out_row0 = int64_t{b} * q_heads + kvh * G;

  if (!decode_valid(slot, pos, num_slots, max_seq)) {
    pdl_wait();  // no write before the predecessor is done (out may reuse its memory)
    if (direct)
      for (int idx = tid; idx < G * D; idx += kDecodeThreads) out[out_row0 * D + idx] = from_float<T>(nan_f());
    return;  // with splits > 1 the merge kernel writes the NaNs
  }
  const int len = pos + 1;
  const int chunk = decode_chunk(len, splits, min_chunk);
  const int64_t begin = int64_t{split} * chunk;
  if (begin >= len) return;
  const int end = static_cast<int>(begin + chunk < len ? begin + chunk : len);

  // Rows of the cache in int64: slots x kv_heads x max_seq x head_dim passes 2^31 at long
  // contexts (t * kRow below is int64 too).
  const int64_t head = (int64_t{slot} * kv_heads + kvh) * max_seq;
  const Elem* kc = k_cache + head * kRow + lane * kLane;
  const Elem* vc = v_cache + head * kRow + lane * kLane;
  // A PDL dependent of the wqkv GEMV (cuda_common.cuh): the cached keys and values were
  // written by earlier steps, not by it, so the first two iterations' rows are fetched
  // into L2 before the wait (prefetches hold no registers: loading them into registers
  // here made the kernel spill); q and the new token's k and v are read after it.
#pragma unroll
  for (int i = 0; i < 2 * U; ++i) {
    const int t = static_cast<int>(begin) + i * R + rg;
    if (t < end && t != pos) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(kc + int64_t{t} * kRow));
      asm volatile("prefetch.global.L2 [%0];" ::"l"(vc + int64_t{t} * kRow));
    }
  }
  pdl_wait();
  const T* qg = in.q + int64_t{b} * in.q_batch + int64_t{kvh} * in.q_group + lane * 8;
  const T* vn = in.v + int64_t{b} * in.kv_batch + int64_t{kvh} * in.kv_group + lane * 8;
  uint4 kn = *reinterpret_cast<const uint4*>(in.k + int64_t{b} * in.kv_batch + int64_t{kvh} * in.kv_group + lane * 8);
  uint4 qr[G];
#pragma unroll
  for (int g = 0; g < G; ++g) qr[g] = *reinterpret_cast<const uint4*>(qg + g * D);
  if (in.bases != nullptr) {
    // Fused RoPE: every block of the sequence rotates its q and the new k itself (D/2
    // angles, a few hundred cycles) rather than waiting on another launch; the whole block
    // takes this branch, so the barrier is safe.
    __shared__ float cos_t[D / 2], sin_t[D / 2];
    const double base = in.bases[b];
    for (int i = tid; i < D / 2; i += kDecodeThreads) {
      float sn, c;
      rope_cos_sin(base, pos, i, D, &c, &sn);  // rotary.cu's arithmetic
      cos_t[i] = round_to<T>(c);
      sin_t[i] = round_to<T>(sn);
    }
    __syncthreads();
    kn = rope_lane<T, D>(kn, lane, cos_t, sin_t);
#pragma unroll
    for (int g = 0; g < G; ++g) qr[g] = rope_lane<T, D>(qr[g], lane, cos_t, sin_t);
  }
  // The block whose chunk holds the new token stores it; it uses that token from kn / vn
  // below, so no other block and no ordering is involved.
  if constexpr (F == 0) {
    if (pos < end && rg == 0) {
      *reinterpret_cast<uint4*>(k_cache + (head + pos) * D + lane * 8) = kn;
      *reinterpret_cast<uint4*>(v_cache + (head + pos) * D + lane * 8) = *reinterpret_cast<const uint4*>(vn);
    }
  }
  // Quantized: that block quantizes the new k (rotated, in registers) and v on the way into
  // the cache, and then reads them back like every other cached token (after the barrier,
  // which makes the block's global writes visible to the block), so it attends to them as
  // stored. Keeping the codes in registers through the loop instead made the int8 kernel
  // spill at G = 4 (the 7B model's group).
  if constexpr (F != 0) {
    if (pos < end) {  // uniform over the block: every row group joins the shuffles
      float x[8];
      float2 knp, vnp;
      unpack<T, 8>(x, kn);
      const Raw knq = C::template quantize<D>(x, knp);
      unpack<T, 8>(x, *reinterpret_cast<const uint4*>(vn));
      const Raw vnq = C::template quantize<D>(x, vnp);
      if (rg == 0) {
        *reinterpret_cast<Raw*>(k_cache + (head + pos) * kRow + lane * kLane) = knq;
        *reinterpret_cast<Raw*>(v_cache + (head + pos) * kRow + lane * kLane) = vnq;
        if (lane % kPairLanes == 0) {
          k_params[(head + pos) * kPairs + lane / kPairLanes] = param_store<T>(knp);
          v_params[(head + pos) * kPairs + lane / kPairLanes] = param_store<T>(vnp);
        }
      }
      __syncthreads();
    }
  }

  float qf[G][8], acc[G][8], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    unpack<T, 8>(qf[g], qr[g]);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      qf[g][e] *= scale_log2;
      acc[g][e] = 0.0f;
    }
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }

  // The trip count is the same for every thread (the shuffles need the whole warp).
  for (int base = static_cast<int>(begin); base < end; base += R * U) {
    Raw kr[U], vr[U];
    float2 kp[U], vp[U];  // (scale, zero) of quantized rows; unused (and removed) for F = 0
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = base + u * R + rg;
      // Zeros for tokens past the end: their probability is 0, and 0 * stale data could
      // be NaN (quantized: zero codes and parameters dequantize to exact zeros).
      kr[u] = vr[u] = Raw{};
      kp[u] = vp[u] = make_float2(0.0f, 0.0f);
      // The new token comes from registers for F = 0; a quantized cache reads it back
      // from the cache like the others (the else branch).
      if (F == 0 && t == pos) {
        if constexpr (F == 0) {
          kr[u] = kn;
          vr[u] = *reinterpret_cast<const uint4*>(vn);
        }
      } else if (t < end) {
        kr[u] = *reinterpret_cast<const Raw*>(kc + int64_t{t} * kRow);
        vr[u] = *reinterpret_cast<const Raw*>(vc + int64_t{t} * kRow);
        if constexpr (F != 0) {
          kp[u] = param_to_float2(k_params[(head + t) * kPairs + lane / kPairLanes]);
          vp[u] = param_to_float2(v_params[(head + t) * kPairs + lane / kPairLanes]);
        }
      }
    }
    float s[G][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      C::unpack(kf, kr[u], kp[u]);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float x = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) x = fmaf(qf[g][e], kf[e], x);
        s[g][u] = x;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int off = L / 2; off > 0; off >>= 1) s[g][u] += __shfl_xor_sync(0xffffffffu, s[g][u], off);
        if (base + u * R + rg >= end) s[g][u] = -INFINITY;
      }
    // Token u = 0 of a row group with any token at all is valid, so m_new is finite
    // whenever the row group has seen a token; rows groups that never do keep
    // m = -inf, l = 0, acc = 0 and are weighted 0 in the merge below.
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[g][u]);
      if (mx == -INFINITY) continue;
      const float alpha = exp2f(m[g] - mx);
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
      m[g] = mx;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float p = exp2f(s[g][u] - mx);
        l[g] += p;
        float vf[8];
        C::unpack(vf, vr[u], vp[u]);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
      }
    }
  }

#pragma unroll
  for (int g = 0; g < G; ++g) {
    *reinterpret_cast<float4*>(&sm_acc[rg][g][lane * 8]) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
    *reinterpret_cast<float4*>(&sm_acc[rg][g][lane * 8 + 4]) = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    if (lane == 0) {
      sm_m[rg][g] = m[g];
      sm_l[rg][g] = l[g];
    }
  }
  __syncthreads();
  // Row group 0 always holds the chunk's first token, so mx below is finite.
  for (int idx = tid; idx < G * D; idx += kDecodeThreads) {
    const int g = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < R; ++r) mx = fmaxf(mx, sm_m[r][g]);
    float sum = 0.0f, a = 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float w = exp2f(sm_m[r][g] - mx);
      sum += sm_l[r][g] * w;
      a += sm_acc[r][g][d] * w;
    }
    const int64_t row = out_row0 + g;
    if (direct) {
      out[row * D + d] = from_float<T>(a / sum);
    } else {
      ws_acc[(row * splits + split) * D + d] = a;
      if (d == 0) ws_ml[row * splits + split] = make_float2(mx, sum);
    }
  }
}

// Block (query head, sequence), one thread per dim: rescale each split's partial to the
// common maximum and normalise.
template <typename T, int D>
__global__ void __launch_bounds__(D)
decode_merge_kernel(T* __restrict__ out, const float2* __restrict__ ws_ml, const float* __restrict__ ws_acc,
                    int num_slots, int max_seq, int q_heads, const int32_t* __restrict__ slots,
                    const int32_t* __restrict__ positions, int splits, int min_chunk) {
  pdl_trigger();  // the wo GEMV may launch and start on its weights (cuda_common.cuh, PDL)
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const int64_t row = int64_t{b} * q_heads + h;
  const int slot = slots[b], pos = positions[b];
  if (!decode_valid(slot, pos, num_slots, max_seq)) {
    out[row * D + d] = from_float<T>(nan_f());
    return;
  }
  const int len = pos + 1;
  const int chunk = decode_chunk(len, splits, min_chunk);
  const int n = (len + chunk - 1) / chunk;
  const float2* ml = ws_ml + row * splits;
  const float* acc = ws_acc + row * splits * D + d;
  float mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = fmaxf(mx, ml[i].x);
  float sum = 0.0f, a = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float w = exp2f(ml[i].x - mx);
    sum += ml[i].y * w;
    a += acc[int64_t{i} * D] * w;
  }
  out[row * D + d] = from_float<T>(a / sum);
}

// ---------------------------------------------------------------------------------------
// Compile-time dispatch over head_dim and group size: both fix register arrays and loop
// trip counts, which is what lets the kernels keep everything in registers.

template <typename F>
Status dispatch_head_dim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return invalid_value("head_dim must be one of {64, 128}, got ", head_dim);
  }
}

template <typename F>
Status dispatch_format(KVCacheFormat format, F&& f) {
  switch (format) {
    case KVCacheFormat::kActivation: return f(std::integral_constant<int, 0>{});
    case KVCacheFormat::kInt8: return f(std::integral_constant<int, 1>{});
    case KVCacheFormat::kInt4: return f(std::integral_constant<int, 2>{});
    default: return invalid_value("unknown KV cache format ", static_cast<int>(format));
  }
}

template <typename F>
Status dispatch_group(int64_t group, F&& f) {
  switch (group) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return invalid_value("the group size q_heads / kv_heads must be in [1, 8], got ", group);
  }
}

}  // namespace

int64_t attention_decode_workspace_bytes(int64_t batch, int64_t q_heads, const KVCache& cache) {
  const int splits = decode_splits(batch, cache.kv_heads, cache.max_seq);
  if (splits == 1) return 0;
  return batch * q_heads * splits * (cache.head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

namespace {

template <typename T>
Status launch_decode(const Context& ctx, T* out, const DecodeRows<T>& rows, const KVCache& cache,
                     int64_t batch, int64_t q_heads, const int32_t* slots, const int32_t* positions,
                     float scale, void* workspace, int64_t workspace_bytes) {
  const int splits = decode_splits(batch, cache.kv_heads, cache.max_seq);
  const int min_chunk = g_min_chunk.load(std::memory_order_relaxed);
  if (workspace_bytes < attention_decode_workspace_bytes(batch, q_heads, cache))
    return invalid_value("workspace is too small for attention_decode");
  auto* ws_ml = static_cast<float2*>(workspace);
  float* ws_acc = splits > 1 ? reinterpret_cast<float*>(ws_ml + batch * q_heads * splits) : nullptr;
  const cudaStream_t stream = stream_of(ctx);
  const int num_slots = static_cast<int>(cache.num_slots < INT32_MAX ? cache.num_slots : INT32_MAX);
  const int kv_heads = static_cast<int>(cache.kv_heads), max_seq = static_cast<int>(cache.max_seq);
  return dispatch_head_dim(cache.head_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    return dispatch_group(q_heads / cache.kv_heads, [&](auto grp) {
      constexpr int G = decltype(grp)::value;
      return dispatch_format(cache.format, [&](auto fmt) {
        constexpr int F = decltype(fmt)::value;
        const dim3 grid(splits, kv_heads, static_cast<unsigned>(batch));
        FIL_RETURN_IF_ERROR(launch_dependent(
            decode_split_kernel<T, D, G, F>, grid, dim3(kDecodeThreads), 0, ctx, "attention_decode (split)",
            out, ws_ml, ws_acc, rows, static_cast<CacheElem<T, F>*>(cache.k),
            static_cast<CacheElem<T, F>*>(cache.v), num_slots, kv_heads, max_seq, slots, positions,
            scale * kLog2e, splits, min_chunk, static_cast<KVParam<T>*>(cache.k_params),
            static_cast<KVParam<T>*>(cache.v_params)));
        if (splits == 1) return Status::Ok();
        const dim3 merge_grid(static_cast<unsigned>(q_heads), static_cast<unsigned>(batch));
        decode_merge_kernel<T, D><<<merge_grid, D, 0, stream>>>(
            out, ws_ml, ws_acc, num_slots, max_seq, static_cast<int>(q_heads), slots, positions, splits,
            min_chunk);
        return launch_status("attention_decode (merge)");
      });
    });
  });
}

}  // namespace

Status attention_decode(const Context& ctx, DType dtype, void* out, const void* q, const void* k,
                        const void* v, const KVCache& cache, int64_t batch, int64_t q_heads,
                        const int32_t* slots, const int32_t* positions, float scale,
                        void* workspace, int64_t workspace_bytes) {
  FIL_RETURN_IF_ERROR(set_device(ctx));
  const int64_t D = cache.head_dim, group = q_heads / cache.kv_heads;
  return dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    const DecodeRows<T> rows{static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                             q_heads * D, group * D, cache.kv_heads * D, D, nullptr};
    return launch_decode(ctx, static_cast<T*>(out), rows, cache, batch, q_heads, slots, positions, scale,
                         workspace, workspace_bytes);
  });
}

Status attention_decode_qkv(const Context& ctx, DType dtype, void* out, const void* qkv,
                            const KVCache& cache, int64_t batch, int64_t q_heads,
                            const int32_t* slots, const int32_t* positions, const float* bases,
                            float scale, void* workspace, int64_t workspace_bytes) {
  FIL_RETURN_IF_ERROR(set_device(ctx));
  const int64_t D = cache.head_dim, group = q_heads / cache.kv_heads;
  const int64_t row = (group + 2) * D;  // one KV group of the fused projection
  return dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(qkv);
    const DecodeRows<T> rows{base, base + group * D, base + (group + 1) * D,
                             cache.kv_heads * row, row, cache.kv_heads * row, row, bases};
    return launch_decode(ctx, static_cast<T*>(out), rows, cache, batch, q_heads, slots, positions, scale,
                         workspace, workspace_bytes);
  });
}

Status set_decode_split_tuning(int64_t min_chunk, int64_t target_blocks) {
  if (min_chunk < 16 || min_chunk > 65536 || min_chunk % 16 != 0)
    return invalid_value("min_chunk must be a multiple of 16 in [16, 65536], got ", min_chunk);
  if (target_blocks < 1 || target_blocks > (int64_t{1} << 20))
    return invalid_value("target_blocks must be in [1, 2^20], got ", target_blocks);
  g_min_chunk.store(static_cast<int>(min_chunk));
  g_target_blocks.store(target_blocks);
  return Status::Ok();
}

}  // namespace cuda
}  // namespace fastinternlm
