// Group-wise int4 weight-only quantization and GEMM.
//
// A weight W [n, k] is stored as w = q * s + m with q in 0..15 and float16 s, m per group
// of `group_size` consecutive input channels of one output row. This form holds AWQ,
// GPTQ and GGUF Q4_0/Q4_1 weights without loss (an integer zero point z is m = -z * s).
//
// Packed format, version 1 (kInt4FormatVersion):
//   qweight  int32   [n, k / 8]  word j of row r holds k = 8j .. 8j+7, nibble i (bits
//                                4i .. 4i+3) is input channel 8j + i
//   scales   float16 [n, k / group_size]
//   offsets  float16 [n, k / group_size]
// Row-major by output channel so that one warp streams one row's nibbles, scales and
// offsets as contiguous bytes.
//
// Sizes: n >= 1; group_size is 32, 64 or 128; k is a positive multiple of group_size;
// n and k below 2^31. On CUDA, qweight and the activation x of int4_gemm must be 16-byte
// aligned (the kernels read them with 16-byte loads); scales, offsets, w and out need
// their element alignment everywhere. Outputs must not overlap inputs.
#pragma once

#include "fastinternlm/common.h"

namespace fastinternlm {

constexpr int kInt4FormatVersion = 1;

struct Int4Weight {
  const int32_t* qweight = nullptr;
  const void* scales = nullptr;   // float16
  const void* offsets = nullptr;  // float16
  int64_t n = 0;
  int64_t k = 0;
  int64_t group_size = 0;  // 32, 64 or 128; k must be a multiple of it
};

// Round-to-nearest asymmetric quantization of w [n, k] (of `dtype`: float32, float16 or
// bfloat16, on the CPU and on CUDA). Per group, with min and max its extreme values:
//   m = min rounded DOWN to float16,
//   s = (max - m) / 15 rounded UP to float16,
//   q = rint((w - m) / s)  (in float64; lies in 0..15 because m <= min and 15 s >= max - m),
// so every value lies within s/2 of its reconstruction q * s + m. A group whose values
// all equal one float16 number gets s = 0, q = 0 and reconstructs exactly; a constant
// group that is not a float16 number (float32 or tiny bfloat16 input) gets the smallest s
// that covers it and reconstructs within s/2, closer than float16 itself could hold it.
// Every value must be finite with |w| <= 65504 (the float16 range, where m and s live):
// otherwise kInvalidValue naming the first offending row and group, and the outputs are
// unspecified. On CUDA this reads a flag back from the device (a stream synchronisation),
// so it must not be called while the stream is being captured into a graph.
Status quantize_int4(const Context& ctx, DType dtype, const void* w, int64_t n, int64_t k,
                     int64_t group_size, int32_t* qweight, void* scales, void* offsets);

// out [n, k] of `dtype` (float32, float16 or bfloat16) = dtype(q * float(s) + float(m)),
// evaluated in float32 (one rounding there, then one to dtype).
Status dequantize_int4(const Context& ctx, DType dtype, void* out, const Int4Weight& w);

// out [m, n] = x [m, k] @ W^T for any m >= 1, x and out of `dtype` (float16/bfloat16;
// float32 too on the CPU), rounded to dtype once from a float32 accumulation. The paths
// differ in where the weight's rounding happens:
//  - CPU: each weight is dequantized in float32 exactly as by dequantize_int4 (before its
//    rounding to dtype) and the products are accumulated in float32.
//  - CUDA, m <= 16 (decode): the group's scale and offset are factored out of the dot
//    product, s * sum(x q) + m * sum(x), with both sums exact products accumulated in
//    float32 on the tensor cores: mathematically the same function, with float32
//    accumulation error relative to sum |x| (q |s| + |m|) rather than sum |x| |q s + m|.
//  - CUDA, m > 16 (prefill): tensor-core operands are float16/bfloat16, so each weight is
//    rounded once more, to dtype: exactly dequantize_int4(W, dtype) followed by a
//    float32-accumulated matmul of x with it.
// The tensor cores' float32 additions are not IEEE round-to-nearest, and the summation
// order is unspecified on every path; tests/test_int4_gemm.py derives the bounds.
Status int4_gemm(const Context& ctx, DType dtype, void* out, const void* x, int64_t m,
                 const Int4Weight& w);

// Benchmarking hook, not for production use: which build of the CUDA m <= 16 kernel
// int4_gemm runs (process-wide; 0, the default, is the tuned configuration;
// 1 .. kInt4SmallMVariants - 1 are alternative configurations for group_size 128 only,
// described in int4_gemm_small_m.cu). Each int4_gemm call reads it once. The CPU path and
// the m > 16 path ignore it. An out-of-range value is refused (InvalidValue) and the
// current one kept.
constexpr int kInt4SmallMVariants = 6;
Status set_int4_gemm_small_m_variant(int variant);
int int4_gemm_small_m_variant();

}  // namespace fastinternlm
