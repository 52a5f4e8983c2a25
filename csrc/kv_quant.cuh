// The KV cache formats of attention.h as the CUDA kernels read and write them: 16-byte
// vectors of the activation dtype, and the int8 / int4 codes with their (scale, zero) per
// group of channels (format v3: the row for int8, 16 channels for int4; the pair float16
// for float16 activations, float32 for bfloat16), quantized and dequantized with exactly
// the CPU reference's arithmetic.
// Shared by decode (attention.cu) and prefill (attention_prefill.cu).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "fastinternlm/attention.h"

namespace fastinternlm {
namespace cuda {

// ---------------------------------------------------------------------------------------
// Vector loads: 16 bytes (8 halves) per access, the width at which a warp's loads reach
// full DRAM bandwidth with the fewest instructions.

template <typename T> struct Half2Of;
template <> struct Half2Of<__half> { using type = __half2; };
template <> struct Half2Of<__nv_bfloat16> { using type = __nv_bfloat162; };

__device__ __forceinline__ float2 to_float2(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 h) { return __bfloat1622float2(h); }

template <typename T>
__device__ __forceinline__ typename Half2Of<T>::type from_float2(float a, float b);
template <>
__device__ __forceinline__ __half2 from_float2<__half>(float a, float b) { return __floats2half2_rn(a, b); }
template <>
__device__ __forceinline__ __nv_bfloat162 from_float2<__nv_bfloat16>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}

// A quantized cache's (scale, zero) pair as stored (attention.h kv_cache_params_dtype):
// half2 for __half activations, float2 for bfloat16 (whose values exceed half's range).
template <typename T> struct KVParamOf { using type = float2; };
template <> struct KVParamOf<__half> { using type = __half2; };
template <typename T>
using KVParam = typename KVParamOf<T>::type;

__device__ __forceinline__ float2 param_to_float2(float2 p) { return p; }
__device__ __forceinline__ float2 param_to_float2(__half2 p) { return __half22float2(p); }

// The stored pair of (scale, zero) as quantize() returns them: both are float16 values
// already for __half (exact conversion).
template <typename T>
__device__ __forceinline__ KVParam<T> param_store(float2 p) {
  if constexpr (std::is_same<T, __half>::value)
    return __floats2half2_rn(p.x, p.y);
  else
    return p;
}

template <int N> struct RawVec;
template <> struct RawVec<8> { using type = uint4; };
template <> struct RawVec<4> { using type = uint2; };

template <typename T, int N>
__device__ __forceinline__ void unpack(float (&f)[N], const typename RawVec<N>::type& raw) {
  const auto* h = reinterpret_cast<const typename Half2Of<T>::type*>(&raw);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float2 x = to_float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// How one lane of a row group reads and writes its 8 dims of a cached row, per cache format
// (attention.h). F = 0: 16 bytes of T. F = 1 (int8): 8 bytes of codes; F = 2 (int4): 4
// bytes, value 2j in the low nibble of byte j; both with the (scale, zero) of the lane's
// group as one float2 (converted from the stored KVParam<T>). A group is a whole number of lanes (kGroupLanes: D/8 for int8, 2 for
// int4's 16 channels), so a lane's 8 values share one pair: pair lane / kGroupLanes of the
// row. Dequantization is one fma per value into float32 registers, where the math needs it
// anyway: no separate pass and no T copy of the cache.
template <typename T, int F> struct CacheLane;

template <typename T>
struct CacheLane<T, 0> {
  using Raw = uint4;
  __device__ static void unpack(float (&f)[8], const Raw& raw, float2) { cuda::unpack<T, 8>(f, raw); }
};

template <typename T, int F>
struct CacheLaneQuantized {
  static constexpr int kBits = F == 1 ? 8 : 4;
  // Lanes per (scale, zero) group and groups per row (attention.h kv_cache_group).
  template <int D>
  static constexpr int kGroupLanes = static_cast<int>(kv_cache_group(static_cast<KVCacheFormat>(F), D)) / 8;
  template <int D>
  static constexpr int kGroups = D / 8 / kGroupLanes<D>;
  using Raw = typename std::conditional<F == 1, uint2, uint32_t>::type;
  __device__ static int code(const Raw& raw, int e) {
    if constexpr (F == 1) {
      const uint32_t w = e < 4 ? raw.x : raw.y;
      return (w >> (8 * (e % 4))) & 0xff;
    } else {
      return (raw >> (4 * e)) & 0xf;
    }
  }
  __device__ static void unpack(float (&f)[8], const Raw& raw, float2 p) {
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = __fmaf_rn(static_cast<float>(code(raw, e)), p.x, p.y);
  }
  // Quantizes the row whose 8 dims this lane holds in `x` (the L = D/8 lanes of a row group
  // hold one row; all 32 lanes of the warp must call): the format's arithmetic, each step
  // rounded as the CPU reference rounds it. Returns the lane's codes and its group's
  // (scale, zero) in p as float values of KVParam<T> (the same in every lane of the group;
  // lane % kGroupLanes == 0 stores param_store<T>(p)).
  template <int D>
  __device__ static Raw quantize(const float (&x)[8], float2& p) {
    constexpr int L = kGroupLanes<D>;  // a group's lanes are adjacent and aligned: xor
                                       // offsets below L stay inside it
    float lo = x[0], hi = x[0];
#pragma unroll
    for (int e = 1; e < 8; ++e) {
      lo = fminf(lo, x[e]);
      hi = fmaxf(hi, x[e]);
    }
#pragma unroll
    for (int off = L / 2; off > 0; off >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    constexpr float qmax = static_cast<float>((1 << kBits) - 1);
    float scale = __fdiv_rn(__fsub_rn(hi, lo), qmax);
    // Float16 parameters: the least float16 >= scale, so that the largest value's code stays
    // <= qmax; the codes are computed from the stored scale (and lo, a half already).
    if constexpr (std::is_same<T, __half>::value) scale = __half2float(__float2half_ru(scale));
    // Below FLT_MIN 1 / scale could overflow; such a row is constant to within 1e-35.
    const float inv = scale >= 1.17549435e-38f ? __frcp_rn(scale) : 0.0f;
    p = make_float2(scale, lo);
    uint32_t w[2] = {0, 0};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float q = fminf(qmax, rintf(__fmul_rn(__fsub_rn(x[e], lo), inv)));
      const uint32_t c = static_cast<uint32_t>(q);
      if constexpr (F == 1)
        w[e / 4] |= c << (8 * (e % 4));
      else
        w[0] |= c << (4 * e);
    }
    if constexpr (F == 1)
      return make_uint2(w[0], w[1]);
    else
      return w[0];
  }
};
template <typename T> struct CacheLane<T, 1> : CacheLaneQuantized<T, 1> {};
template <typename T> struct CacheLane<T, 2> : CacheLaneQuantized<T, 2> {};

// Elements of the cache arrays: T, or bytes of codes.
template <typename T, int F>
using CacheElem = typename std::conditional<F == 0, T, uint8_t>::type;

}  // namespace cuda
}  // namespace fastinternlm
