// float16 / bfloat16 storage types for the CPU reference path, with round-to-nearest-even
// conversions written out bit by bit so the CPU oracle does not depend on compiler
// extensions (_Float16) that not every toolchain enables, nor on the CPU's instruction set.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastinternlm/common.h"

namespace fastinternlm {

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// Both conversions are branch-free: every case (normal, subnormal, infinity/NaN, overflow)
// is computed and the right one selected, so a loop over an array compiles to SIMD code
// (the CPU paths convert every activation this way; a branchy version ran at ~0.5 GB/s).
// Results are bit-identical to the case-by-case definitions in the comments.

// float16 -> float32, exact for every input. Normal numbers only re-bias the exponent.
// Subnormals (exponent 0): mantissa * 2^-24 is formed as (2^-14 + mantissa * 2^-24) - 2^-14,
// both steps exact in float32; zero falls out as +0 (the sign is or-ed in last, giving -0).
// Infinity/NaN (exponent 31) keep their mantissa bits (NaN payloads are preserved).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent and mantissa
  const uint32_t exponent = em & 0x0f800000u;
  const uint32_t normal = em + 0x38000000u;                        // bias 15 -> 127
  const uint32_t special = em | 0x7f800000u;                       // infinity / NaN
  const uint32_t subnormal =
      float_to_bits(bits_to_float(em + 0x38800000u) - 6.103515625e-05f);  // minus 2^-14
  const uint32_t magnitude =
      exponent == 0 ? subnormal : (exponent == 0x0f800000u ? special : normal);
  return bits_to_float(sign | magnitude);
}

// float32 -> float16, round to nearest even.
//   NaN -> sign | 0x7e00 (a quiet NaN); |f| >= 65520 -> infinity;
//   |f| < 2^-14 -> subnormal: adding 0.5f puts the value's bits at the float16 subnormal
//     grid (ulp(0.5) = 2^-24), so the float32 addition itself rounds to nearest even
//     (default floating-point environment), and the low bits are the float16 mantissa
//     (1024 when it rounds up to the smallest normal, which is its correct encoding);
//   otherwise: round to nearest even on the 13 dropped mantissa bits, a carry moving into
//     the exponent, and re-bias.
inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  const uint32_t normal = (ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u) >> 13;
  const uint32_t subnormal = float_to_bits(bits_to_float(ax) + 0.5f) - 0x3f000000u;
  uint32_t magnitude = ax < 0x38800000u ? subnormal : normal;
  magnitude = ax >= 0x477ff000u ? 0x7c00u : magnitude;
  magnitude = ax > 0x7f800000u ? 0x7e00u : magnitude;
  return static_cast<uint16_t>(sign | magnitude);
}

inline float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// float32 -> bfloat16, round to nearest even; NaN stays NaN (its quiet bit set).
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = (x >> 16) | 0x40u;
  return static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

inline float to_float(float v) { return v; }
inline float to_float(half_t v) { return half_bits_to_float(v.bits); }
inline float to_float(bf16_t v) { return bf16_bits_to_float(v.bits); }

template <typename T>
T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline half_t from_float<half_t>(float v) { return half_t{float_to_half_bits(v)}; }
template <>
inline bf16_t from_float<bf16_t>(float v) { return bf16_t{float_to_bf16_bits(v)}; }

// Round a float32 to the precision of T and back: how a torch op in dtype T stores an
// intermediate result.
template <typename T>
inline float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Call f(T{}) with T the CPU storage type of an activation dtype.
template <typename F>
Status dispatch_activation(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(half_t{});
    case DType::kBFloat16: return f(bf16_t{});
    default: return Status(StatusCode::kInvalidType, "not an activation dtype");
  }
}

}  // namespace fastinternlm
