// RMSNorm over the last dimension, and the fused "residual add + RMSNorm" step that
// sits between every two sub-layers of a decoder.
//
// Numerics follow HF InternLM2/Llama: the row's mean square is taken in float32,
// y = dtype(x * rsqrt(mean(x^2) + eps)), then out = dtype(y * weight).
#pragma once

#include "fastinternlm/common.h"

namespace fastinternlm {

// out, x: [rows, hidden] contiguous; weight: [hidden]; all of `dtype`.
// out may alias x.
Status rms_norm(const Context& ctx, DType dtype, void* out, const void* x, const void* weight,
                int64_t rows, int64_t hidden, float eps);

// residual[r] = dtype(residual[r] + x[r]) in place, then out = rms_norm(residual).
// out may alias x (not residual).
Status add_rms_norm(const Context& ctx, DType dtype, void* out, void* residual, const void* x,
                    const void* weight, int64_t rows, int64_t hidden, float eps);

}  // namespace fastinternlm
