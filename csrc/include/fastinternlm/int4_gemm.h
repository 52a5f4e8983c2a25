// Group-wise int4 weight-only quantization and GEMM.
//
// A weight W [n, k] is stored as w = q * s + m with q in 0..15 and float16 s, m per group
// of `group_size` consecutive input channels of one output row. This form holds AWQ,
// GPTQ and GGUF Q4_0/Q4_1 weights without loss.
//
// Packed format, version 1 (kInt4FormatVersion):
//   qweight  int32   [n, k / 8]  word j of row r holds k = 8j .. 8j+7, nibble i (bits
//                                4i .. 4i+3) is input channel 8j + i
//   scales   float16 [n, k / group_size]
//   offsets  float16 [n, k / group_size]
// Row-major by output channel so that one warp streams one row's nibbles, scales and
// offsets as contiguous bytes.
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

// Round-to-nearest asymmetric quantization of w [n, k] (of `dtype`): per group the offset
// m is the minimum and s = (max - min) / 15, both rounded to float16 so that every value
// stays within s/2 of its reconstruction.
Status quantize_int4(const Context& ctx, DType dtype, const void* w, int64_t n, int64_t k,
                     int64_t group_size, int32_t* qweight, void* scales, void* offsets);

// out [n, k] of `dtype` = q * s + m.
Status dequantize_int4(const Context& ctx, DType dtype, void* out, const Int4Weight& w);

// out [m, n] = x [m, k] @ W^T, x and out of `dtype`, float32 accumulation.
Status int4_gemm(const Context& ctx, DType dtype, void* out, const void* x, int64_t m,
                 const Int4Weight& w);

}  // namespace fastinternlm
