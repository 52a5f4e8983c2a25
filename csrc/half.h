// float16 / bfloat16 storage types for the CPU reference path, with round-to-nearest-even
// conversions written out bit by bit so the CPU oracle does not depend on compiler
// extensions (_Float16) that not every toolchain enables.
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

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;   // NaN stays NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {
    // Below 2^-14: a float16 subnormal. Scaling by 2^24 is exact; nearbyint rounds to
    // nearest even in the default floating-point environment.
    return sign | static_cast<uint16_t>(std::nearbyint(bits_to_float(ax) * 16777216.0f));
  }
  // Round to nearest even on the 13 dropped mantissa bits; a carry moves into the exponent.
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

inline float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
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
