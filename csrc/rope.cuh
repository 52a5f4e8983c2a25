// The rotary angle arithmetic, written once for every kernel that rotates (rotary.cu's
// rotary_embedding and attention.cu's fused decode), so the two give bit-identical
// rotations and the fused decode stores exactly the k the unfused ops would.
#pragma once

#include <cuda_runtime.h>

namespace fastinternlm {
namespace cuda {

// cos and sin of pair i's angle for a token at `pos` with rotary base `base`, as float32
// (the callers round them to the activation dtype, as HF does). HF's float32 steps,
// inv_freq = 1 / base^(2i/D) and angle = pos * inv_freq, except that the power is
// evaluated in double and rounded once: powf is only good to 2 ulp, and one ulp of
// inv_freq moves the angle by 1e-3 rad at 32K positions. Precise sincosf: angles reach
// 1e6 rad at long contexts, where __sinf is wrong.
// base is taken as double (a float32 base converts exactly), so a caller can convert once
// outside its loop over i.
// pos: any integer or float type, converted to float32 (exact below 2^24) as HF does.
template <typename P>
__device__ __forceinline__ void rope_cos_sin(double base, P pos, int i, int head_dim, float* c, float* s) {
  const float power = static_cast<float>(pow(base, static_cast<double>(2 * i) / head_dim));
  const float inv_freq = 1.0f / power;
  sincosf(static_cast<float>(pos) * inv_freq, s, c);
}

}  // namespace cuda
}  // namespace fastinternlm
